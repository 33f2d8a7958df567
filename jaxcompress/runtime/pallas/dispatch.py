"""The two entry points the router calls: :func:`kernel_for` (which kernel, and why) and
:func:`matmul` (run it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.arrays.clustered import Clustered
from jaxcompress.arrays.quantized import Quantized
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix
from jaxcompress.runtime.pallas.clustered import clustered_matmul, plan_clustered
from jaxcompress.runtime.pallas.common import target_of
from jaxcompress.runtime.pallas.quantized import plan_quantized, quantized_matmul
from jaxcompress.runtime.pallas.quantized_mgpu import (
    MosaicTiles,
    mosaic_quantized_matmul,
    plan_mosaic_quantized,
)

__all__ = ["kernel_for", "matmul"]


def kernel_for(
    leaf: object,
    rows: int,
    platform: str,
    *,
    dtype: jnp.dtype | None = None,
    stable_only: bool = False,
) -> tuple[str | None, str]:
    """``(kernel name, reason)`` for ``x @ leaf`` with ``rows`` rows, or ``(None, why not)``.

    On ``"cuda"`` a :class:`QuantizedMatrix` takes the Mosaic GPU kernel (Hopper
    ``wgmma``, exportable without disabled checks) where it fits, else the Triton one,
    whose reason then says why Mosaic GPU did not take it.

    Args:
        leaf: a weight leaf; kernels exist for :class:`QuantizedMatrix` and
            :class:`ClusteredMatrix` (the serving layout ``prepare`` makes).
        rows: rows of the activation (batch dimensions folded in).
        platform: the target, as :func:`jax.export.export` names it.
        dtype: the activation's dtype; ``None`` when not known yet (the choice is then
            the one for bfloat16 activations).
        stable_only: only kernels ``jax.export`` can serialize (Mosaic GPU and Mosaic
            TPU; not Triton), as ``accelerate``'s default ``kernels="stable"`` asks.

    Returns:
        A name such as ``"pallas_int4_g128_mgpu"`` (Mosaic GPU), ``"pallas_int4_g128_gpu"``
        (Triton) or ``"pallas_int4_g128_tpu"`` and what it does, or ``None`` and why
        no kernel fits (a platform without kernels, a leaf not in the serving layout,
        AWQ input scales, a layout the tiles cannot follow).

    Raises:
        ValueError: when ``rows`` is below 1.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> leaf = jc.quantize(bits=8, axis=-1)({"w": jnp.ones((64, 32))})[0]["w"]
        >>> kernel_for(to_serving(leaf), 4, "cuda")[0], kernel_for(leaf, 4, "cuda")[0]
        ('pallas_int8_pc_mgpu', None)
        >>> kernel_for(to_serving(leaf), 4, "cuda", dtype=jnp.float32)[0]
        'pallas_int8_pc_gpu'
        >>> kernel_for(to_serving(leaf), 4, "cpu")
        (None, 'no Pallas kernel for platform cpu (only interpret mode runs there)')
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if target_of(platform) is None:
        return None, f"no Pallas kernel for platform {platform} (only interpret mode runs there)"
    if isinstance(leaf, Quantized) and leaf.input_scale is not None:
        return None, "AWQ input scales: no serving layout, the leaf is materialized"
    if isinstance(leaf, (Quantized, Clustered)):
        return None, "not in the serving layout (prepare the tree first)"
    if isinstance(leaf, QuantizedMatrix):
        mosaic = _mosaic_plan(leaf, rows, platform, dtype)
        if isinstance(mosaic, MosaicTiles):
            groups = "per channel" if mosaic.group is None else f"groups of {mosaic.group}"
            return mosaic.name, (
                f"weight-only int{4 if mosaic.packed else 8}, {groups}, on Mosaic GPU: "
                f"({mosaic.bn}, {mosaic.bk}) tiles dequantized to shared memory for wgmma, "
                f"{mosaic.bm} rows a block"
            )
        plan = plan_quantized(leaf, rows, platform)
        if isinstance(plan, str):
            return None, plan if mosaic is None else f"{plan}; Mosaic GPU: {mosaic}"
        if stable_only and _triton(platform):
            why = "" if mosaic is None else f" (not Mosaic GPU: {mosaic})"
            return None, f"{_UNSTABLE}{why}"
        groups = "per channel" if plan.group is None else f"groups of {plan.group}"
        why = "" if mosaic is None else f" (not Mosaic GPU: {mosaic})"
        return plan.name, (
            f"weight-only int{4 if plan.packed else 8}, {groups}: tiles of "
            f"({plan.bm}, {plan.bn}, {plan.bk}) dequantized in the kernel{why}"
        )
    if isinstance(leaf, ClusteredMatrix):
        cplan = plan_clustered(leaf, rows, platform)
        if isinstance(cplan, str):
            return None, cplan
        if stable_only and _triton(platform):
            return None, f"{_UNSTABLE} (no Mosaic GPU codebook kernel yet)"
        book = "per-channel" if cplan.per_channel else "shared"
        return cplan.name, (
            f"{cplan.entries}-entry {book} codebook looked up in the kernel: tiles of "
            f"({cplan.bm}, {cplan.bn}, {cplan.bk})"
        )
    return None, f"no Pallas kernel for a {type(leaf).__name__} leaf"


# jax.export refuses Triton's custom call (its IR has no compatibility guarantee).
_UNSTABLE = "only a Triton kernel fits, and jax.export cannot serialize it (kernels='all')"


def _triton(platform: str) -> bool:
    """Whether this platform's GPU kernels (other than Mosaic GPU's) lower to Triton."""
    return platform in ("cuda", "rocm")


def _mosaic_plan(
    leaf: QuantizedMatrix, rows: int, platform: str, dtype: jnp.dtype | None
) -> MosaicTiles | str | None:
    """The Mosaic GPU plan on ``"cuda"``, why it does not fit, or ``None`` elsewhere."""
    if platform != "cuda":
        return None
    return plan_mosaic_quantized(leaf, rows, platform, dtype=dtype)


def matmul(
    x: jax.Array,
    leaf: QuantizedMatrix | ClusteredMatrix,
    *,
    platform: str,
    interpret: bool = False,
) -> jax.Array:
    """``x`` times the leaf's ``(K, N)`` matrix (its ``matrix_shape``) in a Pallas kernel.

    The kernel is the one :func:`kernel_for` names for ``x``'s rows and dtype.

    For a leaf laid out inputs first that is ``x @ dense.reshape(K, N)``; for an
    ``outputs_first`` :class:`QuantizedMatrix` (an ``(out, in)`` weight used as
    ``x @ W.T``) it is ``x @ dense.reshape(N, K).T``. Batch dimensions are folded
    into the rows by the caller.

    Args:
        x: ``(M, K)`` floating activations.
        leaf: a :class:`QuantizedMatrix` or :class:`ClusteredMatrix`.
        platform: ``"cuda"``, ``"rocm"`` or ``"tpu"``: whose kernel is built (on
            this backend or, through :func:`jax.export.export`, for another).
        interpret: run the kernel in Pallas's interpreter (any backend, slow; the
            Mosaic GPU one runs on CPU).

    Returns:
        ``(M, N)`` in ``x``'s dtype.

    Raises:
        TypeError: for another kind of leaf.
        ValueError: when :func:`kernel_for` finds no kernel, or ``x`` does not match.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 64 * 16).reshape(64, 16)
        >>> leaf = to_serving(jc.quantize(bits=8, axis=-1)({"w": w})[0]["w"])
        >>> x = jnp.ones((2, 64))
        >>> y = matmul(x, leaf, platform="tpu", interpret=True)
        >>> y.shape, bool(jnp.allclose(y, x @ leaf.materialize(), atol=1e-4))
        ((2, 16), True)
    """
    if isinstance(leaf, QuantizedMatrix):
        if x.ndim == 2 and isinstance(
            _mosaic_plan(leaf, x.shape[0], platform, x.dtype), MosaicTiles
        ):
            return mosaic_quantized_matmul(x, leaf, platform=platform, interpret=interpret)
        return quantized_matmul(x, leaf, platform=platform, interpret=interpret)
    if isinstance(leaf, ClusteredMatrix):
        return clustered_matmul(x, leaf, platform=platform, interpret=interpret)
    raise TypeError(
        f"leaf must be a QuantizedMatrix or ClusteredMatrix (prepare the tree first), "
        f"got {type(leaf).__name__}"
    )
