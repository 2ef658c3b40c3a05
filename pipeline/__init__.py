"""The stages of `edgeq build`, in order: export, optimize, calibrate, quantize, evaluate, benchmark,
package. Each module has one entry point, `run(ctx) -> StageResult`, and never imports another stage."""
