"""Running (compressed) models over several devices: tensor- and data-parallel specs, pmap.

:func:`tensor_parallel_specs` and :func:`data_parallel` choose dense shardings;
:func:`jaxcompress.sharding.place` maps them onto compressed children.
:func:`pmap_apply` runs a forward pass with ``jax.pmap``, batch split over devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress.arrays import is_compressed
from jaxcompress.core.paths import path_to_str
from jaxcompress.transforms.filters import kernels

_STYLES = ("column", "row", "alternate")


def _check_axes(mesh: Mesh, axis: str | tuple[str, ...]) -> None:
    for name in (axis,) if isinstance(axis, str) else axis:
        if name not in mesh.shape:
            raise ValueError(f"mesh axis {name!r} is not one of {tuple(mesh.axis_names)}")


def tensor_parallel_specs(
    params: Any, mesh: Mesh, *, axis: str = "model", style: str = "column"
) -> Any:
    """Dense ``PartitionSpec``s that split each kernel over the ``axis`` mesh axis.

    Kernels are floating leaves of two or more dimensions (Dense ``(in, out)``, conv
    ``(h, w, in, out)``; compressed leaves count by their dense shape), the fan-out
    being the last axis and the fan-in the one before it.

    * ``"column"``: every kernel is split on its output features (last axis), and
      its bias with it;
    * ``"row"``: every kernel is split on its input features (axis ``-2``); biases
      are replicated, as the layer's output is whole after the partial sums are added;
    * ``"alternate"``: Megatron style, column, row, column, ... in tree-flatten order
      of the kernels (sorted keys), so a column layer's split output feeds the next
      row layer without a gather.

    A bias is a 1-D leaf under the same parent path as exactly one kernel, of that
    kernel's output size. An axis whose size does not divide over ``axis`` is left
    unsplit (these specs are always valid), and every other leaf is replicated.

    Args:
        params: the dense or compressed params pytree (linen dict, ``nnx.State``, ...).
        mesh: the mesh whose ``axis`` size decides what divides.
        axis: the mesh axis to split over.
        style: ``"column"``, ``"row"`` or ``"alternate"``.

    Returns:
        A pytree laid out like ``params`` (compressed leaves as one leaf) of
        ``PartitionSpec``, for :func:`jaxcompress.sharding.shardings_like`.

    Raises:
        ValueError: an unknown ``style`` or an ``axis`` the mesh lacks.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
        >>> params = {"a": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
        ...           "b": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
        >>> specs = tensor_parallel_specs(params, mesh, style="alternate")
        >>> specs["a"]["kernel"], specs["a"]["bias"], specs["b"]["kernel"], specs["b"]["bias"]
        (P(None, 'model'), P('model',), P('model', None), P())
    """
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")
    _check_axes(mesh, axis)
    size = mesh.shape[axis]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
    paths = [path_to_str(key_path) for key_path, _ in flat]
    specs: list[PartitionSpec] = [PartitionSpec()] * len(flat)
    layers: dict[str, list[tuple[int, bool]]] = {}  # parent path -> (out size, split out?)
    kernel_count = 0
    for i, (path, (_, leaf)) in enumerate(zip(paths, flat, strict=True)):
        if not kernels(path, leaf):
            continue
        column = style == "column" or (style == "alternate" and kernel_count % 2 == 0)
        kernel_count += 1
        dim = len(leaf.shape) - (1 if column else 2)
        entries: list[str | None] = [None] * len(leaf.shape)
        if leaf.shape[dim] % size == 0:
            entries[dim] = axis
        specs[i] = PartitionSpec(*entries)
        split_out = entries[-1] is not None
        layers.setdefault(path.rpartition("/")[0], []).append((leaf.shape[-1], split_out))
    for i, (path, (_, leaf)) in enumerate(zip(paths, flat, strict=True)):
        layer = layers.get(path.rpartition("/")[0], [])
        shape: tuple[int, ...] = getattr(leaf, "shape", ())
        if len(layer) == 1 and len(shape) == 1 and layer[0] == (shape[0], True):
            specs[i] = PartitionSpec(axis)
    return jax.tree_util.tree_unflatten(treedef, specs)


def data_parallel(mesh: Mesh, *, axis: str | tuple[str, ...] = "data") -> NamedSharding:
    """The sharding of an input whose leading (batch) axis is split over ``axis``.

    Args:
        mesh: the mesh.
        axis: the mesh axis (or a tuple of axes) to split the batch over.

    Returns:
        ``NamedSharding(mesh, PartitionSpec(axis))``.

    Raises:
        ValueError: an ``axis`` the mesh lacks.

    Example:
        >>> import jax
        >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
        >>> data_parallel(mesh).spec
        P('data',)
    """
    _check_axes(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(axis))


def pmap_apply(
    apply_fn: Callable[..., Any], *, devices: Sequence[jax.Device] | None = None
) -> Callable[..., Any]:
    """Wraps ``apply_fn(params, x, *args)`` to run with ``jax.pmap`` over ``devices``.

    ``params`` and ``args`` (compressed or not) are broadcast to every device and
    ``x``'s leading batch axis is split over them: the batch is padded with zeros to
    a multiple of the device count and the padding is sliced off the result. Every
    output leaf must be batch-leading; it comes back as ``(batch, ...)``, equal to
    ``jax.jit(apply_fn)(params, x, *args)``. Compressed leaves stay compressed unless
    ``apply_fn`` materializes them (:func:`jaxcompress.materialize`).

    Args:
        apply_fn: the forward function ``apply_fn(params, x, *args)``.
        devices: the devices to split over; by default the local devices.

    Returns:
        ``f(params, x, *args)``; ``x`` is an array or a pytree of arrays sharing their
        leading batch size.

    Raises:
        ValueError: (from ``f``) an ``x`` without a batch axis, or leaves whose batch
            sizes differ.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> pruned, _ = jc.prune(0.5)({"w": jnp.arange(8.0).reshape(2, 4)})
        >>> forward = lambda params, x: x @ jc.materialize(params)["w"]
        >>> f = pmap_apply(forward, devices=jax.devices()[:1])
        >>> f(pruned, jnp.ones((3, 2))).tolist()
        [[4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0, 7.0]]
    """
    devices = list(jax.local_devices() if devices is None else devices)
    count = len(devices)
    # One pmap for every call; `args` travels as one broadcast tuple.
    mapped = jax.pmap(
        lambda x, params, args: apply_fn(params, x, *args),
        in_axes=(0, None, None),
        devices=devices,
    )

    def run(params: Any, x: Any, *args: Any) -> Any:
        leaves = jax.tree.leaves(x)
        if any(jnp.ndim(leaf) == 0 for leaf in leaves):
            raise ValueError("every leaf of x needs a leading batch axis; got a scalar")
        sizes = {jnp.shape(leaf)[0] for leaf in leaves}
        if len(sizes) != 1:
            raise ValueError(f"x needs one batch size over its leaves, got {sorted(sizes)}")
        batch = sizes.pop()
        per_device = -(-batch // count)

        def split(a: jax.Array) -> jax.Array:
            a = jnp.asarray(a)
            padding = jnp.zeros((per_device * count - batch, *a.shape[1:]), a.dtype)
            return jnp.concatenate([a, padding]).reshape(count, per_device, *a.shape[1:])

        out = mapped(jax.tree.map(split, x), params, args)
        return jax.tree.map(lambda y: y.reshape(count * per_device, *y.shape[2:])[:batch], out)

    return run
