"""Layer 8: the ``jaxcompress`` command."""
