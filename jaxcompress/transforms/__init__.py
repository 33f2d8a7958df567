"""Layer 2: the transform calling convention, filters, combinators and the per-leaf engine."""
