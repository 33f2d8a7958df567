"""Layer 4: the compression transforms (prune, quantize, cluster, low rank, ...)."""
