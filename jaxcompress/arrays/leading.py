"""Weights stored output first, as equinox's ``(out, in)``, seen inputs first.

The data-aware methods (GPTQ, AWQ, Wanda, SparseGPT, codebook GPTQ, whitened low
rank) work on a weight whose leading axes are its inputs, as a linen ``(in, out)``
kernel. A weight contracted over its trailing axes is moved into that layout with
:func:`to_leading`, compressed there, and its compressed leaf is put back into the
weight's own layout with :func:`from_leading`, so it materializes to the ``(out, in)``
array the model uses.

The data-free methods learn the layout from the tree itself: :func:`output_first_inputs`
finds the weights of equinox's ``Linear``, ``Conv`` and ``ConvTranspose`` layers, and
:func:`jaxcompress.transforms.base.flatten_leaves` marks them on each leaf entry.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.clustered import Clustered
from jaxcompress.arrays.lowrank import LowRank
from jaxcompress.arrays.quantized import Quantized, group_layout
from jaxcompress.arrays.sparse import Sparse
from jaxcompress.core.bitpack import pack, unpack
from jaxcompress.core.mesh import unsharded
from jaxcompress.core.paths import path_to_str


def is_equinox_module(tree: Any) -> bool:
    """Whether ``tree`` is an equinox module (equinox loads only when the user uses it).

    Example:
        >>> is_equinox_module({"w": 1})
        False
    """
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(tree, eqx.Module)


def _output_first_layer(node: Any) -> int:
    """The trailing input axes of an equinox layer's weight stored output first, else 0."""
    eqx = sys.modules["equinox"]
    if isinstance(node, eqx.nn.Linear):
        return 1
    if isinstance(node, eqx.nn.Conv | eqx.nn.ConvTranspose):
        # (out, in // groups, *kernel): the input channels and the kernel are contracted.
        return node.num_spatial_dims + 1
    return 0


def output_first_inputs(tree: Any) -> dict[str, int]:
    """``path -> trailing input axes`` of each weight in ``tree`` stored output first.

    Those are the ``weight`` arrays of equinox's ``Linear`` ``(out, in)``, ``Conv`` and
    ``ConvTranspose`` ``(out, in, *kernel)`` layers, paths as the filters see them. A
    weight of another rank (layers stacked by ``vmap``, a compressed or hidden leaf)
    is left out: its axes are not known here. Without equinox loaded, or without such
    layers, the dict is empty, so other trees are untouched.

    Example:
        >>> import jax, equinox as eqx
        >>> mlp = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
        >>> output_first_inputs({"mlp": mlp})
        {'mlp/layers/0/weight': 1, 'mlp/layers/1/weight': 1}
    """
    if "equinox" not in sys.modules:
        return {}
    found, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda node: is_equinox_module(node) and _output_first_layer(node) > 0
    )
    inputs = {}
    for path, node in found:
        trailing = _output_first_layer(node) if is_equinox_module(node) else 0
        shape = getattr(getattr(node, "weight", None), "shape", None)
        if trailing and shape is not None and len(shape) == trailing + 1:
            inputs["/".join(filter(None, (path_to_str(path), "weight")))] = trailing
    return inputs


def leading_shape(shape: tuple[int, ...], inputs: int) -> tuple[int, ...]:
    """``shape`` with its trailing ``inputs`` axes moved first.

    Example:
        >>> leading_shape((8, 3, 5, 5), 3)
        (3, 5, 5, 8)
    """
    cut = len(shape) - inputs
    return tuple(shape[cut:]) + tuple(shape[:cut])


def to_leading(weight: jax.Array, inputs: int) -> jax.Array:
    """``weight`` with its trailing ``inputs`` (contracted) axes moved first.

    Example:
        >>> import jax.numpy as jnp
        >>> to_leading(jnp.zeros((4, 3)), 1).shape
        (3, 4)
    """
    cut = weight.ndim - inputs
    return jnp.transpose(weight, tuple(range(cut, weight.ndim)) + tuple(range(cut)))


def _back(x: jax.Array, inputs: int) -> jax.Array:
    """Inverse of :func:`to_leading` for an array in the leading layout."""
    return jnp.transpose(x, tuple(range(inputs, x.ndim)) + tuple(range(inputs)))


def leading_axis(axis: int, ndim: int, inputs: int) -> int:
    """Where axis ``axis`` (non-negative) of a weight lands in its leading layout.

    With ``inputs`` replaced by ``ndim - inputs`` it maps the leading layout back.

    Example:
        >>> leading_axis(0, 2, 1)  # an (out, in) weight's outputs: last of (in, out)
        1
    """
    cut = ndim - inputs
    return axis + inputs if axis < cut else axis - cut


def groups_transpose(shape: tuple[int, ...], inputs: int, axis: int | None, group_size) -> bool:
    """Whether scales laid out over the leading layout of ``shape`` fit ``shape`` too.

    ``axis`` is the channel axis in the leading layout. A scale group runs over the
    non-channel axes flattened row-major; the two layouts flatten them in the same
    order only when the channel axis leaves inputs or outputs alone (an ``(out, in)``
    weight per output channel), or there is one group.

    Example:
        >>> groups_transpose((8, 16), 1, 1, 4), groups_transpose((8, 16), 1, None, 4)
        (True, False)
    """
    view = leading_shape(shape, inputs)
    if group_layout(view, axis, group_size)[0] == 1:
        return True
    if axis is None:
        return False
    rest_inputs = inputs - (axis < inputs)
    rest_outputs = len(shape) - inputs - (axis >= inputs)
    return rest_inputs == 0 or rest_outputs == 0


def from_leading(leaf, inputs: int):
    """A leaf computed on :func:`to_leading` ``(weight, inputs)``, in ``weight``'s layout.

    Dense arrays, :class:`Quantized` (an AWQ ``input_scale`` becomes ``(1, …, in…)``,
    shaped to broadcast against the weight), :class:`Sparse` with dense values,
    per-tensor :class:`Clustered` and :class:`LowRank` leaves are put back; the scale
    layout of a ``Quantized`` leaf must pass :func:`groups_transpose`.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.arange(6.0).reshape(2, 3)  # (out, in)
        >>> q = jc.quantize(8, axis=-1, where="w")({"w": to_leading(w, 1)})[0]["w"]
        >>> back = from_leading(q, 1)
        >>> back.shape, back.axis, bool(jnp.allclose(back.materialize(), w, atol=0.02))
        ((2, 3), 0, True)
    """
    if isinstance(leaf, Quantized):
        return _quantized(leaf, inputs)
    if isinstance(leaf, Sparse):
        return _sparse(leaf, inputs)
    if isinstance(leaf, Clustered):
        if leaf.per_channel:
            raise ValueError("a per-channel codebook has no place in the transposed layout")
        codes = _back(leaf.codes(), inputs)
        shape = tuple(codes.shape)
        return Clustered(pack(codes, leaf.bits), leaf.codebook, shape, leaf.dtype, leaf.bits)
    if isinstance(leaf, LowRank):
        outputs = len(leaf.shape) - inputs
        shape = tuple(leaf.shape[inputs:]) + tuple(leaf.shape[:inputs])
        return LowRank(u=leaf.v.T, v=leaf.u.T, shape=shape, dtype=leaf.dtype, fan_in_axes=outputs)
    return _back(leaf, inputs)


def _quantized(leaf: Quantized, inputs: int) -> Quantized:
    ndim = len(leaf.shape)
    codes = _back(unpack(unsharded(leaf.codes), leaf.bits, leaf.shape[-1]), inputs)
    axis = None if leaf.axis is None else leading_axis(leaf.axis, ndim, ndim - inputs)
    input_scale = leaf.input_scale
    if input_scale is not None:
        input_scale = input_scale.reshape((1,) * (ndim - inputs) + tuple(input_scale.shape))
    return dataclasses.replace(
        leaf,
        codes=pack(codes, leaf.bits),
        shape=tuple(codes.shape),
        axis=axis,
        input_scale=input_scale,
    )


def _sparse(leaf: Sparse, inputs: int) -> Sparse:
    keep = _back(leaf.keep_mask(), inputs)
    dense = _back(leaf.materialize(), inputs)
    # Kept entries first, in row-major order: the values of the transposed mask.
    order = jnp.argsort(jnp.logical_not(keep.reshape(-1)), stable=True)[: leaf.nnz]
    mask = jnp.packbits(keep, axis=-1, bitorder="little")
    return Sparse(dense.reshape(-1)[order], mask, tuple(dense.shape), np.dtype(leaf.dtype))
