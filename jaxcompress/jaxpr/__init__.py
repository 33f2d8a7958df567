"""Layer 2: the only code that reads jaxprs of a user's apply function."""
