"""The file codec of :class:`~jaxcompress.arrays.LowRank`: its two factors as arrays."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxcompress.arrays import LowRank
from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.io import nodes


def encode(leaf: LowRank, encoding: nodes.Encoding, path: str) -> dict[str, Any]:
    return {
        "type": "lowrank",
        **nodes.dense_fields(leaf, path),
        "fan_in_axes": leaf.fan_in_axes,
        "u": nodes.array_node(leaf.u, encoding.add, nodes.join(path, "u")),
        "v": nodes.array_node(leaf.v, encoding.add, nodes.join(path, "v")),
    }


def decode(node: dict[str, Any], decoding: nodes.Decoding, path: str) -> LowRank:
    shape, dtype = nodes.dense_header(node, path)
    fan_in_axes = nodes.field(
        node,
        "fan_in_axes",
        path,
        lambda a: nodes.is_int(a, 1) and a < len(shape),
        f"an integer 1 to {len(shape) - 1} for shape {shape}",
    )
    m, n = matrix_shape(shape, fan_in_axes)
    factors = {}
    for name in ("u", "v"):
        factor = nodes.read_array(node.get(name), decoding.get, nodes.join(path, name))
        if not jnp.issubdtype(factor.dtype, jnp.floating):
            raise nodes.fail(path, f"{name} has dtype {factor.dtype}; factors are floating-point")
        factors[name] = factor
    u, v = factors["u"], factors["v"]
    if u.ndim != 2 or u.shape[0] != m or u.shape[1] < 1:
        raise nodes.fail(path, f"u has shape {tuple(u.shape)}, expected ({m}, rank >= 1)")
    nodes.expect_shape(v, (u.shape[1], n), path, "v")
    return LowRank(
        u=decoding.place(u, nodes.join(path, "u"), node),
        v=decoding.place(v, nodes.join(path, "v"), node),
        shape=shape,
        dtype=dtype,
        fan_in_axes=fan_in_axes,
    )


CODEC = nodes.LeafCodec(LowRank, ("lowrank",), encode, decode)
