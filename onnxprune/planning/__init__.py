"""Plans under a budget: per-layer sparsities (rules, search), channels to remove, blocks to remove;
every method is registered in onnxprune.planning.registry."""
