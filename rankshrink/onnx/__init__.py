"""The ONNX boundary: export, onnxruntime sessions, verification and its quality gates."""
