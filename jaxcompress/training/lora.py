"""LoRA / QLoRA: low-rank adapters trained on top of frozen compressed leaves.

The adapters live in their own pytree, a dict from a leaf's ``a/b/kernel`` path to an
:class:`Adapter`, beside the compressed parameters rather than inside them. Training
differentiates the adapters only, with any optax optimizer as it is, so the frozen
base (codes, indices, masks, scales, codebooks) never enters the optimizer and stays
bit-identical by construction:

* :func:`lora_init` makes the adapters (``B = 0``, so the adapted model starts equal
  to the compressed one);
* :func:`lora_apply` gives the parameters the model runs with: each adapted leaf is
  ``materialize(base) + scale * (A @ B)``, dense, the base behind ``stop_gradient``
  (this is also how adapters kept beside a compressed tree are served);
* :func:`lora_merge` folds the adapters back into the same compressed format: the
  same scales and zero points (codes rounded again) or the same codebook (indices
  assigned again), the same keep-mask, and reports the error that re-rounding adds.

:func:`lora_apply` builds one dense weight per adapted leaf per call, so its backward
forms each ``(in, out)`` weight gradient. :func:`jaxcompress.training.lora_model`
runs the same model factored (``x @ W_base + scale * (x @ A) @ B``, faster to train),
and :func:`jaxcompress.accelerate_lora` serves adapters kept beside a prepared tree
with the compressed kernels for the base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.arrays import Clustered, Quantized, Sparse
from jaxcompress.arrays.base import as_dense, is_compressed
from jaxcompress.arrays.quantized import requantize
from jaxcompress.core.bitpack import pack
from jaxcompress.numerics.kmeans1d import assign
from jaxcompress.transforms.base import select_leaves
from jaxcompress.transforms.filters import Filter, kernels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """One low-rank adapter: the leaf's update is ``scale * (a @ b)`` over its matrix view.

    The matrix view flattens the first ``fan_in_axes`` axes of the weight into ``m``
    rows and the rest into ``n`` columns, as :class:`~jaxcompress.LowRank` does (a
    Dense ``(in, out)`` kernel is ``fan_in_axes=1``).

    Attributes:
        a: the input-side factor ``(m, rank)``, random at the start.
        b: the output-side factor ``(rank, n)``, zero at the start.
        scale: ``alpha / rank`` (static).
        shape: the weight's dense shape (static).
        fan_in_axes: how many leading axes of ``shape`` are inputs (static).

    Example:
        >>> import jax.numpy as jnp
        >>> ad = Adapter(jnp.ones((2, 1)), jnp.ones((1, 3)), scale=0.5, shape=(2, 3),
        ...              fan_in_axes=1)
        >>> ad.delta().tolist()
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    fan_in_axes: int = dataclasses.field(default=1, metadata={"static": True})

    @property
    def rank(self) -> int:
        """The adapter's rank (static)."""
        return int(self.a.shape[-1])

    def delta(self) -> jax.Array:
        """The dense update ``scale * (a @ b)`` in the weight's shape, float32.

        Example:
            >>> import jax.numpy as jnp
            >>> Adapter(jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0, shape=(2, 2)).delta().sum()
            Array(0., dtype=float32)
        """
        product = jnp.matmul(
            self.a.astype(jnp.float32),
            self.b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return (product * self.scale).reshape(self.shape)


def _check_leaf(path: str, leaf: Any, fan_in_axes: int) -> None:
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"lora_init: leaf {path!r} is not a floating-point weight")
    if not 1 <= fan_in_axes < len(shape):
        raise ValueError(
            f"lora_init: leaf {path!r} of shape {shape} has no matrix view with "
            f"fan_in_axes={fan_in_axes} (needs 1 <= fan_in_axes < ndim)"
        )


def lora_init(
    params: Any,
    rank: int,
    *,
    key: jax.Array,
    alpha: float | None = None,
    where: Filter = kernels,
    fan_in_axes: int = 1,
    dtype: Any = jnp.float32,
) -> dict[str, Adapter]:
    """Makes rank-``rank`` adapters for the leaves ``where`` selects.

    As in the LoRA paper (and Hugging Face PEFT), ``B`` starts at zero, so the adapted
    model equals the base model before training, and ``A`` is uniform in
    ``±1/sqrt(m)`` (Kaiming-uniform with ``a = sqrt(5)``, PEFT's default); the update
    is scaled by ``alpha / rank``. Selected leaves may be dense or compressed
    (:class:`~jaxcompress.Quantized`, :class:`~jaxcompress.Clustered`,
    :class:`~jaxcompress.Sparse` with either inside, :class:`~jaxcompress.LowRank`).

    Args:
        params: the (compressed) parameter tree; it is read, not changed.
        rank: the adapters' rank, at least 1 and at most ``min(m, n)``.
        key: a PRNG key for ``A``.
        alpha: the LoRA scaling numerator; ``None`` means ``rank`` (scale 1).
        where: which leaves get adapters; by default
            :func:`jaxcompress.filters.kernels`.
        fan_in_axes: how many leading axes of each selected weight are its inputs
            (1 for Dense kernels, 3 for HWIO convolutions).
        dtype: the adapters' dtype.

    Returns:
        ``{path: Adapter}``, a pytree to train with any optax optimizer.

    Raises:
        ValueError: a bad rank, or a leaf with no matrix view for ``fan_in_axes``.
        TypeError: a selected leaf that is not floating point.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> dense = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
        >>> params, _ = jc.quantize(4)(dense)
        >>> adapters = jc.training.lora_init(params, 2, key=jax.random.key(0))
        >>> list(adapters), adapters["dense/kernel"].a.shape, adapters["dense/kernel"].b.shape
        (['dense/kernel'], (8, 2), (2, 4))
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_init: rank must be a positive integer, got {rank!r}")
    scale = 1.0 if alpha is None else float(alpha) / rank
    selected, _, _ = select_leaves(params, where, name=f"lora_init({rank})")
    keys = jax.random.split(key, max(len(selected), 1))
    adapters = {}
    for entry, leaf_key in zip(selected, keys, strict=False):
        _check_leaf(entry.path, entry.leaf, fan_in_axes)
        shape = tuple(entry.leaf.shape)
        m, n = math.prod(shape[:fan_in_axes]), math.prod(shape[fan_in_axes:])
        if rank > min(m, n):
            raise ValueError(
                f"lora_init: rank {rank} exceeds min(m, n) = {min(m, n)} of leaf "
                f"{entry.path!r} (matrix view {m} x {n})"
            )
        bound = 1.0 / math.sqrt(m)
        a = jax.random.uniform(leaf_key, (m, rank), dtype, -bound, bound)
        adapters[entry.path] = Adapter(a, jnp.zeros((rank, n), dtype), scale, shape, fan_in_axes)
    return adapters


def _adapted_entries(params: Any, adapters: dict[str, Adapter], name: str):
    """The flattened entries of ``params``, each adapter matched to its leaf, checked."""
    selected, entries, treedef = select_leaves(params, lambda path, leaf: path in adapters)
    found = {entry.path: entry for entry in selected}
    missing = sorted(set(adapters) - set(found))
    if missing:
        raise KeyError(f"{name}: no leaf at the adapter paths {missing}")
    for path, entry in found.items():
        if tuple(entry.leaf.shape) != adapters[path].shape:
            raise ValueError(
                f"{name}: adapter {path!r} is for shape {adapters[path].shape}, "
                f"the leaf is {tuple(entry.leaf.shape)}"
            )
    return found, entries, treedef


def _keep_mask(leaf: Any) -> jax.Array | None:
    return leaf.keep_mask() if isinstance(leaf, Sparse) else None


def lora_apply(params: Any, adapters: dict[str, Adapter]) -> Any:
    """The parameters with each adapted leaf replaced by ``base + scale * (A @ B)``.

    An adapted leaf comes back dense, in its own dtype, computed in float32: the
    base materialized behind ``jax.lax.stop_gradient`` (so differentiating with
    respect to ``adapters`` never touches it) plus the adapter's update. For a
    :class:`~jaxcompress.Sparse` leaf the update is masked to the kept entries, so
    pruned weights stay zero (and :func:`lora_merge` keeps the mask). Other leaves
    come back as they are; call :func:`jaxcompress.materialize` on the result as
    for any compressed tree. Works under ``jax.jit`` and ``jax.grad``.

    Args:
        params: the compressed parameter tree the adapters were made for.
        adapters: the adapters from :func:`lora_init` (trained or not).

    Returns:
        A tree with ``params``' structure.

    Raises:
        KeyError: an adapter path with no leaf in ``params``.
        ValueError: an adapter made for another shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params, _ = jc.quantize(4)({"w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)})
        >>> adapters = jc.training.lora_init(params, 2, key=jax.random.key(0))
        >>> same = jc.training.lora_apply(params, adapters)["w"]  # B = 0: the base exactly
        >>> bool((same == jc.materialize(params)["w"]).all())
        True
        >>> loss = lambda ad: jnp.sum(jc.training.lora_apply(params, ad)["w"] ** 2)
        >>> grads = jax.grad(loss)(adapters)
        >>> grads["w"].b.shape, bool(jnp.abs(grads["w"].b).sum() > 0)
        ((2, 4), True)
    """
    found, entries, treedef = _adapted_entries(params, adapters, "lora_apply")
    leaves = [entry.leaf for entry in entries]
    for path, entry in found.items():
        leaf, adapter = entry.leaf, adapters[path]
        base = jax.lax.stop_gradient(as_dense(leaf)).astype(jnp.float32)
        delta = adapter.delta()
        keep = _keep_mask(leaf)
        if keep is not None:
            delta = jnp.where(keep, delta, 0.0)
        leaves[entry.index] = (base + delta).astype(leaf.dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _requantize(leaf: Quantized, target: jax.Array) -> Quantized:
    """``target`` coded on ``leaf``'s own grid: its scales and zero points, codes rounded again."""
    if leaf.input_scale is not None:
        raise ValueError(
            "lora_merge: a Quantized leaf with AWQ input scales cannot be re-rounded on its "
            "own grid here; keep the adapters beside it (lora_apply) or quantize the "
            "materialized lora_apply result again"
        )
    return requantize(leaf, target)


def _recluster(leaf: Clustered, target: jax.Array) -> Clustered:
    """``target`` on ``leaf``'s own codebook: each entry's nearest centroid."""
    codebook = leaf.codebook
    if leaf.per_channel:
        columns = target.reshape(-1, leaf.shape[-1]).T
        codes = jax.vmap(assign)(columns, codebook).T.reshape(leaf.shape)
    else:
        codes = assign(target.reshape(leaf.shape), codebook)
    return dataclasses.replace(leaf, indices=pack(codes, leaf.bits))


def _recompress(leaf: Any, target: jax.Array) -> Any:
    """``target`` (the leaf's dense shape) stored in ``leaf``'s own compressed format."""
    if isinstance(leaf, Sparse):
        keep = leaf.keep_mask().reshape(-1)
        (kept,) = jnp.nonzero(keep, size=leaf.nnz)
        values = target.reshape(-1)[kept]
        return dataclasses.replace(leaf, values=_recompress(leaf.values, values))
    if isinstance(leaf, Quantized):
        return _requantize(leaf, target)
    if isinstance(leaf, Clustered):
        return _recluster(leaf, target)
    if is_compressed(leaf):
        raise TypeError(
            f"lora_merge: cannot fold an adapter into a {type(leaf).__name__} leaf; keep "
            "the adapters beside it (lora_apply)"
        )
    return target.astype(leaf.dtype)


def lora_merge(params: Any, adapters: dict[str, Adapter]) -> tuple[Any, dict[str, dict]]:
    """Folds trained adapters back into the compressed tree, in the same format.

    Each adapted leaf is stored again as ``base + scale * (A @ B)`` in its own format
    with its own grid: a :class:`~jaxcompress.Quantized` leaf keeps its scales and
    zero points and its codes are rounded again (clipped to the code range); a
    :class:`~jaxcompress.Clustered` leaf keeps its codebook and each entry takes the
    nearest centroid; a :class:`~jaxcompress.Sparse` leaf keeps its mask and its kept
    values are re-compressed the same way; a dense leaf just adds the update. So the
    file size does not change, but the merged model is not the trained one: an update
    smaller than half a grid step rounds away. The stats say by how much, per leaf.

    Args:
        params: the compressed parameter tree the adapters were trained on.
        adapters: the trained adapters.

    Returns:
        ``(merged, stats)``; ``stats[path]`` has ``"delta_rms"`` (the adapter's update),
        ``"merge_error_rms"`` (merged minus ``base + update``, the error re-rounding
        adds) and ``"changed"`` (the fraction of entries whose stored value changed).

    Raises:
        KeyError: an adapter path with no leaf in ``params``.
        ValueError: an adapter made for another shape, or a Quantized leaf with AWQ
            input scales.
        TypeError: a compressed leaf of a kind that cannot be re-rounded (LowRank).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params, _ = jc.quantize(4, axis=None)({"w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)})
        >>> adapters = jc.training.lora_init(params, 1, key=jax.random.key(0))
        >>> ad = adapters["w"]
        >>> step = abs(params["w"].scale.item())  # 1/7: this grid's step
        >>> small = Adapter(jnp.ones((8, 1)), jnp.full((1, 4), 0.05), ad.scale, ad.shape)
        >>> merged, stats = jc.training.lora_merge(params, {"w": small})
        >>> merged["w"].scale.tolist() == params["w"].scale.tolist()  # same grid
        True
        >>> stats["w"]["changed"]  # an update under half a step rounds away entirely
        0.0
        >>> big = Adapter(jnp.ones((8, 1)), jnp.array([[0.1, -0.1, 0.1, -0.1]]), ad.scale, ad.shape)
        >>> stats = jc.training.lora_merge(params, {"w": big})[1]["w"]
        >>> stats["changed"] > 0.9, stats["merge_error_rms"] < step / 2
        (True, True)
    """
    found, entries, treedef = _adapted_entries(params, adapters, "lora_merge")
    leaves = [entry.leaf for entry in entries]
    stats = {}
    for path, entry in found.items():
        leaf, adapter = entry.leaf, adapters[path]
        trained = lora_apply({"w": leaf}, {"w": adapter})["w"].astype(jnp.float32)
        merged = _recompress(leaf, trained)
        merged_dense = as_dense(merged).astype(jnp.float32)
        base = as_dense(leaf).astype(jnp.float32)
        stats[path] = {
            "delta_rms": float(jnp.sqrt(jnp.mean(jnp.square(trained - base)))),
            "merge_error_rms": float(jnp.sqrt(jnp.mean(jnp.square(merged_dense - trained)))),
            "changed": float(jnp.mean(merged_dense != base)),
        }
        leaves[entry.index] = merged
    return jax.tree_util.tree_unflatten(treedef, leaves), stats
