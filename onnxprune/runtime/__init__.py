"""Running models with ONNX Runtime: sessions and providers, evaluation data, metrics."""
