"""Layer 8: example models, data and training loops; never imported by the library layers."""
