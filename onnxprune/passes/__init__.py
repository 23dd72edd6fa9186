"""Graph rewrites, each an onnx-ir pass."""
