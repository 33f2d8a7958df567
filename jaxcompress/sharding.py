"""Placing compressed children on a mesh the way their dense weight was placed.

The rule: a child laid out like the dense array (same rank, for example a
bit-packed mask) keeps the dense array's ``PartitionSpec`` on every axis it can
still divide evenly; a flat child (kept values, codebooks) is split over the
same mesh axes when its length divides, and replicated otherwise.
:func:`shardings_like` applies the rule (and the scale, codebook and low-rank
factor rules) to a whole compressed tree from specs for the dense params, and
:func:`place` puts the tree there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def _is_concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def named_sharding_of(x: Any) -> NamedSharding | None:
    """The ``NamedSharding`` of a concrete array, or ``None`` for anything else.

    Example:
        >>> import jax.numpy as jnp
        >>> named_sharding_of(jnp.zeros(3)) is None
        True
    """
    if not _is_concrete(x):
        return None
    sharding = x.sharding
    return sharding if isinstance(sharding, NamedSharding) else None


def _axis_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _devices_along(mesh: Any, entry: Any) -> int:
    return math.prod(mesh.shape[name] for name in _axis_names(entry))


def spec_for(shape: tuple[int, ...], reference: NamedSharding) -> PartitionSpec:
    """The spec a child of ``shape`` gets when its dense weight is placed by ``reference``.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> spec_for((4, 1), NamedSharding(mesh, P(None, "x")))
        P(None, 'x')
    """
    mesh = reference.mesh
    spec = tuple(reference.spec) + (None,) * (len(shape) - len(reference.spec))
    if len(shape) == len(spec):
        kept = [
            entry if entry is not None and dim % _devices_along(mesh, entry) == 0 else None
            for dim, entry in zip(shape, spec, strict=True)
        ]
        return PartitionSpec(*kept)
    names = tuple(name for entry in spec for name in _axis_names(entry))
    if len(shape) == 1 and names and shape[0] % math.prod(mesh.shape[n] for n in names) == 0:
        return PartitionSpec(names if len(names) > 1 else names[0])
    return PartitionSpec()


def place_like(child: Any, reference: NamedSharding | None) -> Any:
    """Puts a concrete ``child`` on ``reference``'s mesh by :func:`spec_for`.

    Tracers and arrays without a named reference pass through unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> place_like(jnp.zeros(3), None).shape
        (3,)
    """
    if reference is None or not _is_concrete(child):
        return child
    return jax.device_put(child, NamedSharding(reference.mesh, spec_for(child.shape, reference)))


def unsharded(x: jax.Array) -> jax.Array:
    """``x`` replicated, where its type carries an explicit sharding; else ``x`` itself.

    With ``Explicit`` mesh axes, jax refuses a sort or flatten across a sharded
    dimension; whole-leaf algorithms (magnitude ranking) need the leaf in one piece.
    ``Auto`` meshes and unsharded arrays pass through untouched.

    Example:
        >>> import jax.numpy as jnp
        >>> unsharded(jnp.ones(3)).shape
        (3,)
    """
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    explicit = mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)
    if explicit and any(entry is not None for entry in sharding.spec):
        return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
    return x


# ------------------------------------------------ dense specs -> compressed children

DenseSpec = PartitionSpec | NamedSharding | None


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _checked(
    path: str, shape: tuple[int, ...], spec: DenseSpec, mesh: Mesh | None
) -> NamedSharding:
    """``spec`` as a ``NamedSharding`` after checking it fits a dense leaf of ``shape``."""
    given = spec if isinstance(spec, NamedSharding) else None
    if given is not None:
        mesh, spec = given.mesh, given.spec
    elif mesh is None:
        raise ValueError(f"{path}: a PartitionSpec needs mesh=; got spec {spec} and no mesh")
    spec = PartitionSpec() if spec is None else spec
    if len(spec) > len(shape):
        raise ValueError(
            f"{path}: spec {spec} has {len(spec)} entries but the leaf has rank {len(shape)} "
            f"(shape {shape})"
        )
    seen: set[str] = set()
    for axis, entry in enumerate(spec):
        for name in _axis_names(entry):
            if name not in mesh.shape:
                raise ValueError(
                    f"{path}: spec {spec} names mesh axis {name!r}, which is not one of the "
                    f"mesh's axes {tuple(mesh.axis_names)}"
                )
            if name in seen:
                raise ValueError(f"{path}: spec {spec} uses mesh axis {name!r} twice")
            seen.add(name)
        devices = _devices_along(mesh, entry)
        if shape[axis] % devices:
            raise ValueError(
                f"{path}: axis {axis} of size {shape[axis]} does not divide evenly over mesh "
                f"axis {entry!r} of size {devices} (spec {spec}, shape {shape})"
            )
    return given or NamedSharding(mesh, spec)


def _scale_spec(
    shape: tuple[int, ...], axis: int | None, scale_shape: tuple[int, ...], ref: NamedSharding
) -> PartitionSpec:
    """Spec of a ``(G, C)`` scale: ``C`` follows the channel axis, ``G`` the leading other axis.

    Groups are contiguous runs of the row-major flattened non-channel axes, so a shard
    of the leading one holds whole groups exactly when ``G`` divides by its devices.
    """
    spec = tuple(ref.spec) + (None,) * (len(shape) - len(ref.spec))
    others = [i for i in range(len(shape)) if i != axis]
    entries = (spec[others[0]] if others else None, None if axis is None else spec[axis])
    kept = [
        entry if entry is not None and dim % _devices_along(ref.mesh, entry) == 0 else None
        for dim, entry in zip(scale_shape, entries, strict=True)
    ]
    return PartitionSpec(*kept)


def input_scale_spec(scale_shape: tuple[int, ...], reference: NamedSharding) -> PartitionSpec:
    """Spec of a ``Quantized`` leaf's ``input_scale``: the weight's spec on its leading axes.

    The scales (AWQ's, one per input feature) are shaped like the weight's first
    ``len(scale_shape)`` axes, so each keeps the mesh axes of its weight axis where
    its length divides, and rows of the weight and their scales sit together.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> input_scale_spec((4,), NamedSharding(mesh, P("x", None)))
        P('x',)
    """
    spec = tuple(reference.spec) + (None,) * len(scale_shape)
    kept = [
        entry if entry is not None and dim % _devices_along(reference.mesh, entry) == 0 else None
        for dim, entry in zip(scale_shape, spec, strict=False)
    ]
    return PartitionSpec(*kept)


def _child_shardings(leaf: Any, ref: NamedSharding) -> Any:
    """``leaf`` with each array child replaced by its ``NamedSharding``."""
    # Imported here: the array types import this module for `unsharded`.
    from jaxcompress.arrays import Clustered, LowRank, Quantized, Sparse, is_compressed
    from jaxcompress.arrays.lowrank import factor_shardings
    from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix

    def named(spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(ref.mesh, spec, memory_kind=ref.memory_kind)

    def like(child: Any, reference: NamedSharding = ref) -> NamedSharding:
        return named(spec_for(tuple(child.shape), reference))

    if isinstance(leaf, Sparse):
        # Nested values stand for a flat dense vector placed like plain kept values.
        values = like(leaf.values)
        if is_compressed(leaf.values):
            values = _child_shardings(leaf.values, values)
        return dataclasses.replace(leaf, values=values, mask=like(leaf.mask))
    if isinstance(leaf, Quantized):
        scale = named(_scale_spec(leaf.shape, leaf.axis, tuple(leaf.scale.shape), ref))
        zero = None if leaf.zero_point is None else scale
        inputs = leaf.input_scale
        if inputs is not None:
            inputs = named(input_scale_spec(tuple(inputs.shape), ref))
        return dataclasses.replace(
            leaf, codes=like(leaf.codes), scale=scale, zero_point=zero, input_scale=inputs
        )
    if isinstance(leaf, Clustered):
        return dataclasses.replace(
            leaf, indices=like(leaf.indices), codebook=named(PartitionSpec())
        )
    if isinstance(leaf, LowRank):
        u_ref, v_ref = factor_shardings(ref, leaf.shape, leaf.fan_in_axes)
        return dataclasses.replace(leaf, u=like(leaf.u, u_ref), v=like(leaf.v, v_ref))
    if isinstance(leaf, QuantizedMatrix | ClusteredMatrix):
        return _serving_shardings(leaf, ref, named)
    if is_compressed(leaf):
        # A leaf type without its own rule: every child by the generic `spec_for` rule.
        return jax.tree.map(like, leaf)
    return ref


def _serving_shardings(leaf: Any, ref: NamedSharding, named: Any) -> Any:
    """Output-major ``(N, K)`` codes: rows take the weight's last-axis spec, columns the
    mesh axes of its leading (fan-in) axes; ``(G, N)`` scales follow the rows."""
    from jaxcompress.arrays.serving import QuantizedMatrix

    spec = tuple(ref.spec) + (None,) * (len(leaf.shape) - len(ref.spec))
    names = [name for entry in spec[:-1] for name in _axis_names(entry)]
    fan_in = None if not names else names[0] if len(names) == 1 else tuple(names)

    def fits(entry: Any, size: int) -> Any:
        return entry if entry is not None and size % _devices_along(ref.mesh, entry) == 0 else None

    codes = leaf.codes if isinstance(leaf, QuantizedMatrix) else leaf.indices
    rows, columns = codes.shape
    code_spec = named(PartitionSpec(fits(spec[-1], rows), fits(fan_in, columns)))
    if isinstance(leaf, QuantizedMatrix):
        scale = named(PartitionSpec(None, fits(spec[-1], leaf.scale.shape[1])))
        offset = None if leaf.offset is None else scale
        return dataclasses.replace(leaf, codes=code_spec, scale=scale, offset=offset)
    per_row = leaf.codebook.ndim == 2
    book = (
        PartitionSpec(fits(spec[-1], leaf.codebook.shape[0]), None) if per_row else PartitionSpec()
    )
    return dataclasses.replace(leaf, indices=code_spec, codebook=named(book))


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
    from jaxcompress.arrays import is_compressed
    from jaxcompress.filters import path_to_str

    flat, treedef = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=is_compressed)
    if _is_spec(dense_specs_or_shardings):
        specs = [dense_specs_or_shardings] * len(flat)
    else:
        try:
            specs = treedef.flatten_up_to(dense_specs_or_shardings)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"the specs are not laid out like the params (one spec per dense leaf): {error}"
            ) from None
    out = []
    for (key_path, leaf), spec in zip(flat, specs, strict=True):
        path = path_to_str(key_path)
        if not _is_spec(spec):
            raise ValueError(f"{path}: expected a PartitionSpec or NamedSharding, got {spec!r}")
        ref = _checked(path, tuple(getattr(leaf, "shape", ())), spec, mesh)
        out.append(_child_shardings(leaf, ref))
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
