"""Layer 2: compression algorithms on plain arrays (no pytrees)."""
