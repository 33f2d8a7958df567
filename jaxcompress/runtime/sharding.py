"""Shardings for whole compressed trees: :func:`shardings_like` and :func:`place`."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from jaxcompress.arrays import is_compressed
from jaxcompress.core.mesh import checked_reference, is_spec
from jaxcompress.core.mesh import named_sharding_of as named_sharding_of
from jaxcompress.core.mesh import place_like as place_like
from jaxcompress.core.mesh import spec_for as spec_for
from jaxcompress.core.mesh import unsharded as unsharded
from jaxcompress.core.paths import path_to_str


def shardings_like(
    compressed: Any, dense_specs_or_shardings: Any, *, mesh: Mesh | None = None
) -> Any:
    """Shardings for every array child of ``compressed``, from specs for the dense params.

    You say how each dense weight would be sharded; this says where each compressed
    child goes so that it sits with the part of the weight it encodes:

    * children laid out like the weight (``Sparse`` masks, ``Quantized`` codes,
      ``Clustered`` indices) keep the weight's spec (:func:`spec_for`);
    * ``Sparse`` kept values (a flat vector) are split over the same mesh axes when
      their length divides, else replicated; nested ``Quantized``/``Clustered``
      values follow that vector's spec by these same rules;
    * codebooks and per-tensor scales are replicated; per-channel and per-group
      ``(G, C)`` scales (and zero points) put ``C`` on the channel axis' mesh axes
      and ``G`` on those of the leading non-channel axis, where they divide; AWQ's
      ``input_scale`` (shaped like the weight's leading axes) keeps the weight's
      spec on those axes (:func:`input_scale_spec`);
    * ``LowRank`` ``u`` takes the mesh axes of the weight's fan-in axes on its rows
      and ``v`` those of its fan-out axes on its columns (see
      :func:`jaxcompress.arrays.lowrank.factor_shardings`);
    * serving layouts (``QuantizedMatrix``, ``ClusteredMatrix``, from
      :func:`jaxcompress.accelerate`'s ``prepare``) hold ``(N, K)`` codes: their rows
      take the weight's last-axis spec and their columns its fan-in axes' spec; their
      ``(G, N)`` scales and per-channel codebooks follow the rows;
    * plain arrays get their spec unchanged.

    A packed child (codes, indices, masks are bit-packed along the last axis) whose
    packed length no longer divides over the last axis' mesh axes is replicated on
    that axis only; a ``u`` or ``v`` whose flattened length does not divide likewise.
    The dense spec itself must fit: it is checked against the dense shape.

    Args:
        compressed: a pytree of arrays and compressed leaves (``Sparse``,
            ``Quantized``, ``Clustered``, ``LowRank``, ``Sparse`` of
            ``Quantized``/``Clustered``), for example a linen params dict or an
            ``nnx.State``.
        dense_specs_or_shardings: one ``PartitionSpec`` or ``NamedSharding`` for every
            leaf, or a pytree of them laid out like the dense params (the structure of
            ``compressed`` with each compressed leaf as one leaf). ``None`` in the tree
            means replicated.
        mesh: the mesh for ``PartitionSpec`` entries; not needed for ``NamedSharding``.

    Returns:
        A pytree with the structure of ``compressed`` whose leaves are
        ``NamedSharding``: pass it to ``jax.device_put(compressed, ...)`` or use it as
        ``jax.jit``'s ``in_shardings``.

    Raises:
        ValueError: a spec entry that does not divide the dense leaf's dimension,
            a spec longer than the leaf's rank, a mesh axis the mesh lacks, a
            ``PartitionSpec`` without ``mesh``, or a spec tree that is not laid out
            like ``compressed``. The leaf's path is named.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
        >>> params = {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}
        >>> q, _ = jc.quantize(8)(params)
        >>> specs = {"kernel": P(None, "model"), "bias": P("model")}
        >>> out = shardings_like(q, specs, mesh=mesh)
        >>> out["kernel"].codes.spec, out["kernel"].scale.spec, out["bias"].spec
        (P(None, 'model'), P(None, 'model'), P('model',))
        >>> shardings_like(q, P("model", None), mesh=mesh)
        Traceback (most recent call last):
        ...
        ValueError: bias: spec P('model', None) has 2 entries but the leaf has rank 1 (shape (8,))
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=is_compressed)
    if is_spec(dense_specs_or_shardings):
        specs = [dense_specs_or_shardings] * len(flat)
    else:
        try:
            # jaxlib ships no stub for its pytree module, so mypy cannot see this method.
            specs = treedef.flatten_up_to(dense_specs_or_shardings)  # type: ignore[attr-defined]
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"the specs are not laid out like the params (one spec per dense leaf): {error}"
            ) from None
    out = []
    for (key_path, leaf), spec in zip(flat, specs, strict=True):
        path = path_to_str(key_path)
        if not is_spec(spec):
            raise ValueError(f"{path}: expected a PartitionSpec or NamedSharding, got {spec!r}")
        ref = checked_reference(path, tuple(getattr(leaf, "shape", ())), spec, mesh)
        # Each leaf type knows where its children go (CompressedArray.child_shardings).
        out.append(leaf.child_shardings(ref) if is_compressed(leaf) else ref)
    return jax.tree_util.tree_unflatten(treedef, out)


def place(compressed: Any, mesh: Mesh | None, specs: Any) -> Any:
    """Puts ``compressed`` on ``mesh`` by :func:`shardings_like` of the dense ``specs``.

    Works with several processes too: each one passes the same host values and
    keeps the shards of its own devices.

    Args:
        compressed: a pytree of arrays and compressed leaves.
        mesh: the mesh for ``PartitionSpec`` entries (``None`` if ``specs`` holds
            ``NamedSharding`` only).
        specs: one ``PartitionSpec``/``NamedSharding`` or a pytree of them laid out
            like the dense params.

    Returns:
        ``compressed`` with every array child placed.

    Raises:
        ValueError: as :func:`shardings_like`.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
        >>> pruned, _ = jc.prune(0.5)({"kernel": jnp.ones((4, 16))})
        >>> placed = place(pruned, mesh, {"kernel": P(None, "model")})
        >>> placed["kernel"].mask.sharding.spec
        P(None, 'model')
    """
    return jax.device_put(compressed, shardings_like(compressed, specs, mesh=mesh))
