"""Layer 3: input statistics of each weight, collected by tracing."""
