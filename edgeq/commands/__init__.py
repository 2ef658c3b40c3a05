"""Post-build commands: each reads a finished build directory (its manifest.json) and never runs a
stage. report, parity (QEMU aarch64), remote (`edgeq bench --host`), publish/verify, inspect and
generate (causal LMs)."""
