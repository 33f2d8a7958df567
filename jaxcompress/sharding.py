"""Placing compressed children on a mesh the way their dense weight was placed.

The rule: a child laid out like the dense array (same rank, for example a
bit-packed mask) keeps the dense array's ``PartitionSpec`` on every axis it can
still divide evenly; a flat child (kept values, codebooks) is split over the
same mesh axes when its length divides, and replicated otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


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
