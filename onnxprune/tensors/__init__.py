"""Layer weights as arrays: reading and writing them wherever they live, and masks of which to zero."""
