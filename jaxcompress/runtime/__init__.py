"""Layer 6: running compressed trees: materialize routes, kernels, sharding, reports."""
