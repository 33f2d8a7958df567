"""Pallas kernels for compressed matrix products: GPU (Mosaic GPU, Triton) and TPU (Mosaic).

One module per kernel family: :mod:`.quantized` (weight-only int8 and packed int4,
per channel or in scale groups; Triton and TPU bodies) with its Hopper body in
:mod:`.quantized_mgpu` (Mosaic GPU ``wgmma``, cuda's first choice for bfloat16 and
float16 activations), and :mod:`.clustered` (k-means codebook lookup, 3- and 4-bit
indices, shared or per-channel codebooks); :mod:`.common` holds what they share. The
router calls :func:`kernel_for` and :func:`matmul`. 2:4 sparse kernels are not here
yet.

On a machine without the accelerator the kernels run in Pallas's interpreters
(``interpret=True``) and lower for their platform through :func:`jax.export.export`.
The Mosaic GPU kernel lowers to ``mosaic_gpu_v2``, which export accepts as it is; the
Triton kernels lower to Triton's custom call, which export accepts only with
:func:`export_disabled_checks`.
"""

from jaxcompress.runtime import routes
from jaxcompress.runtime.pallas.common import export_disabled_checks
from jaxcompress.runtime.pallas.dispatch import kernel_for, matmul

__all__ = ["FAMILY", "export_disabled_checks", "kernel_for", "matmul"]

# accelerate's router asks this family for GPU and TPU products (routes.py imports this
# package on first use).
FAMILY = routes.register_kernels(kernel_for, matmul)
