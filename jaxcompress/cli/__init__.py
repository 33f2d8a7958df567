"""Layer 9: the ``jaxcompress`` command."""
