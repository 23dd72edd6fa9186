"""Per-layer importance: data-free capacity (from the weights) and measured sensitivity, compactness and
SR-init (on data); every method is registered in onnxprune.scoring.registry."""
