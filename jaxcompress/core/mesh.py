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

import math
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec


def is_concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def named_sharding_of(x: Any) -> NamedSharding | None:
    """The ``NamedSharding`` of a concrete array, or ``None`` for anything else.

    Example:
        >>> import jax.numpy as jnp
        >>> named_sharding_of(jnp.zeros(3)) is None
        True
    """
    if not is_concrete(x):
        return None
    sharding = x.sharding
    return sharding if isinstance(sharding, NamedSharding) else None


def axis_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def devices_along(mesh: Any, entry: Any) -> int:
    """How many devices a spec entry (``None``, an axis name or a tuple of them) spans.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh
        >>> devices_along(Mesh(jax.devices()[:1], ("x",)), ("x",)), devices_along(None, None)
        (1, 1)
    """
    return math.prod(mesh.shape[name] for name in axis_names(entry))


def fitting(mesh: Any, entry: Any, size: int) -> Any:
    """``entry`` if it splits a dimension of ``size`` evenly over ``mesh``, else ``None``.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> fitting(mesh, "x", 4), fitting(mesh, None, 4)
        ('x', None)
    """
    return entry if entry is not None and size % devices_along(mesh, entry) == 0 else None


def merged_entry(entries: Any) -> str | tuple[str, ...] | None:
    """One spec entry holding every mesh axis named in ``entries``, in order.

    It shards a dimension that flattens the dimensions ``entries`` sharded.

    Example:
        >>> merged_entry(("x", None, ("y", "z"))), merged_entry((None,))
        (('x', 'y', 'z'), None)
    """
    names = [name for entry in entries for name in axis_names(entry)]
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def named_like(reference: NamedSharding, spec: PartitionSpec) -> NamedSharding:
    """``spec`` on ``reference``'s mesh and memory kind.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> named_like(NamedSharding(mesh, P("x")), P()).spec
        P()
    """
    return NamedSharding(reference.mesh, spec, memory_kind=reference.memory_kind)


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
        kept = [fitting(mesh, entry, dim) for dim, entry in zip(shape, spec, strict=True)]
        return PartitionSpec(*kept)
    names = tuple(name for entry in spec for name in axis_names(entry))
    if len(shape) == 1 and names and shape[0] % math.prod(mesh.shape[n] for n in names) == 0:
        return PartitionSpec(names if len(names) > 1 else names[0])
    return PartitionSpec()


def sharding_for(shape: tuple[int, ...], reference: NamedSharding) -> NamedSharding:
    """The ``NamedSharding`` of a child of ``shape`` by :func:`spec_for`, on ``reference``'s mesh.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> sharding_for((4, 1), NamedSharding(mesh, P(None, "x"))).spec
        P(None, 'x')
    """
    return named_like(reference, spec_for(tuple(shape), reference))


def place_like(child: Any, reference: NamedSharding | None) -> Any:
    """Puts a concrete ``child`` on ``reference``'s mesh by :func:`spec_for`.

    Tracers and arrays without a named reference pass through unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> place_like(jnp.zeros(3), None).shape
        (3,)
    """
    if reference is None or not is_concrete(child):
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
    mesh: Any = getattr(sharding, "mesh", None)  # only NamedSharding has one
    explicit = mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)
    if explicit and any(entry is not None for entry in sharding.spec):
        return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
    return x


# ------------------------------------------------ dense specs -> compressed children

DenseSpec = PartitionSpec | NamedSharding | None


def is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def checked_reference(
    path: str, shape: tuple[int, ...], spec: DenseSpec, mesh: Mesh | AbstractMesh | None
) -> NamedSharding:
    """``spec`` as a ``NamedSharding`` after checking it fits a dense leaf of ``shape``."""
    given = spec if isinstance(spec, NamedSharding) else None
    if isinstance(spec, NamedSharding):
        mesh, spec = spec.mesh, spec.spec
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
        for name in axis_names(entry):
            if name not in mesh.shape:
                raise ValueError(
                    f"{path}: spec {spec} names mesh axis {name!r}, which is not one of the "
                    f"mesh's axes {tuple(mesh.axis_names)}"
                )
            if name in seen:
                raise ValueError(f"{path}: spec {spec} uses mesh axis {name!r} twice")
            seen.add(name)
        devices = devices_along(mesh, entry)
        if shape[axis] % devices:
            raise ValueError(
                f"{path}: axis {axis} of size {shape[axis]} does not divide evenly over mesh "
                f"axis {entry!r} of size {devices} (spec {spec}, shape {shape})"
            )
    return given or NamedSharding(mesh, spec)


def scale_spec(
    shape: tuple[int, ...], axis: int | None, scale_shape: tuple[int, ...], ref: NamedSharding
) -> PartitionSpec:
    """Spec of a ``(G, C)`` scale: ``C`` follows the channel axis, ``G`` the leading other axis.

    Groups are contiguous runs of the row-major flattened non-channel axes, so a shard
    of the leading one holds whole groups exactly when ``G`` divides by its devices.
    """
    spec = tuple(ref.spec) + (None,) * (len(shape) - len(ref.spec))
    others = [i for i in range(len(shape)) if i != axis]
    entries = (spec[others[0]] if others else None, None if axis is None else spec[axis])
    kept = [fitting(ref.mesh, entry, dim) for dim, entry in zip(scale_shape, entries, strict=True)]
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
        fitting(reference.mesh, entry, dim) for dim, entry in zip(scale_shape, spec, strict=False)
    ]
    return PartitionSpec(*kept)
