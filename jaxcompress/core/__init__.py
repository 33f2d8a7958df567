"""Layer 0: helpers on plain jax and numpy arrays that every other layer uses."""
