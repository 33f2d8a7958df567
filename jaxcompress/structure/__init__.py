"""Layer 5: structured pruning: coupled axes, thinning, units, sensitivity."""
