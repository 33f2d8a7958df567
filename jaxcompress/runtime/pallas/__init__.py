"""Pallas kernels for compressed matrix products, for GPU (Triton) and TPU (Mosaic).

One module per kernel family: :mod:`.quantized` (weight-only int8 and packed int4,
per channel or in scale groups) and :mod:`.clustered` (k-means codebook lookup,
3- and 4-bit indices, shared or per-channel codebooks); :mod:`.common` holds what
they share. The router calls :func:`kernel_for` and :func:`matmul`. 2:4 sparse
kernels are not here yet.

On a machine without the accelerator the kernels run in Pallas's interpreter
(``interpret=True``) and lower for their platform through :func:`jax.export.export`;
the GPU kernels lower to Triton's custom call, which export accepts only with
:func:`export_disabled_checks`.
"""

from jaxcompress.runtime import routes
from jaxcompress.runtime.pallas.common import export_disabled_checks
from jaxcompress.runtime.pallas.dispatch import kernel_for, matmul

__all__ = ["FAMILY", "export_disabled_checks", "kernel_for", "matmul"]

# accelerate's router asks this family for GPU and TPU products (routes.py imports this
# package on first use).
FAMILY = routes.register_kernels(kernel_for, matmul)
