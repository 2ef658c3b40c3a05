"""Graph operations: functions from ONNX models (and measured statistics) to ONNX models, with no
build context. Stages call them; they never import a stage."""
