"""edgeq: turn trained models into small, fast, measured ONNX artifacts for edge and mobile devices."""
__version__ = "0.1.0"
