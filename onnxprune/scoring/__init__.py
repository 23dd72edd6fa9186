"""Per-layer importance: data-free capacity (from the weights) and, later, measured sensitivity."""
