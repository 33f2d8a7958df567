"""The file codec of :class:`~jaxcompress.arrays.Quantized`: a code stream plus scales.

A leaf with AWQ input scales is written as a ``quantized_input_scaled`` node, so a
reader that predates input scales refuses it instead of decoding the codes without
them; every other leaf's node is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Quantized
from jaxcompress.arrays.quantized import group_layout
from jaxcompress.io import nodes, streams


def encode(leaf: Quantized, encoding: nodes.Encoding, path: str) -> dict[str, Any]:
    add = encoding.add
    codes = nodes.code_stream(
        leaf.codes,
        add,
        path,
        encoding.entropy,
        lambda packed: streams.encode_codes(
            packed, bits=leaf.bits, shape=leaf.shape, entropy=encoding.entropy
        ),
    )
    # Buffers are added in this order (codes, scale, zero point, input scale): the
    # file's bytes depend on it.
    scale = nodes.array_node(leaf.scale, add, nodes.join(path, "scale"))
    zero = None
    if leaf.zero_point is not None:
        zero = nodes.array_node(leaf.zero_point, add, nodes.join(path, "zero"))
    node = {
        "type": "quantized",
        **nodes.dense_fields(leaf, path),
        "bits": leaf.bits,
        "axis": leaf.axis,
        "group_size": leaf.group_size,
        "codes": codes,
        "scale": scale,
        "zero_point": zero,
    }
    if leaf.input_scale is not None:
        node["input_scale"] = nodes.array_node(
            leaf.input_scale, add, nodes.join(path, "input_scale")
        )
        node["type"] = "quantized_input_scaled"
    return node


def decode(node: dict[str, Any], decoding: nodes.Decoding, path: str) -> Quantized:
    get, place = decoding.get, decoding.place
    shape, dtype = nodes.dense_header(node, path)
    bits = nodes.bits_field(node, path)
    axis = nodes.field(
        node,
        "axis",
        path,
        lambda a: a is None or (nodes.is_int(a) and a < len(shape)),
        "None or an axis",
    )
    group_size = nodes.field(
        node,
        "group_size",
        path,
        # Any positive size: one that does not divide leaves a shorter last group.
        lambda g: g is None or nodes.is_int(g, 1),
        "None or a positive integer",
    )
    groups, _, channels = group_layout(shape, axis, group_size)
    scale = nodes.read_array(node.get("scale"), get, nodes.join(path, "scale"))
    nodes.expect_shape(scale, (groups, channels), path, "scale")
    zero = node.get("zero_point")
    if zero is not None:
        zero = nodes.read_array(zero, get, nodes.join(path, "zero_point"))
        nodes.expect_shape(zero, scale.shape, path, "zero_point")
        zero = place(zero, path, node)
    inputs = node.get("input_scale")
    if (node.get("type") == "quantized_input_scaled") != (inputs is not None):
        raise nodes.fail(
            path, "input_scale must be present exactly in a quantized_input_scaled node"
        )
    if inputs is not None:
        inputs = place(read_input_scale(inputs, get, path, shape), path, node)
    record = nodes.stream_field(node, "codes", path)
    codes = nodes.read_codes(record, get, path, bits=bits, shape=shape)
    return Quantized(
        codes=place(codes, path, node),
        scale=place(scale, path, node),
        zero_point=zero,
        shape=shape,
        dtype=dtype,
        bits=bits,
        axis=axis,
        group_size=group_size,
        input_scale=inputs,
    )


def read_input_scale(
    node: Any, get: nodes.GetBuffer, path: str, shape: tuple[int, ...]
) -> nodes.Stored:
    """AWQ's input scales: the weight's leading axes, floating, finite and positive."""
    inputs = nodes.read_array(node, get, nodes.join(path, "input_scale"))
    got = tuple(inputs.shape)
    leading = 1 <= len(got) < len(shape) and got == shape[: len(got)]
    # A weight stored output first: 1 on the leading (output) axes, then its inputs.
    outputs = next((k for k, size in enumerate(got) if size != 1), len(got))
    trailing = len(got) == len(shape) and outputs >= 1 and got[outputs:] == shape[outputs:]
    if not (leading or trailing):
        raise nodes.fail(
            path,
            f"input_scale has shape {got}, expected the leading axes of {shape} or "
            "1 on its leading axes and its trailing axes",
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise nodes.fail(path, f"input_scale has dtype {inputs.dtype}; it must be floating-point")
    values = np.asarray(inputs).astype(np.float32)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise nodes.fail(path, "input_scale must be finite and positive")
    return inputs


CODEC = nodes.LeafCodec(
    Quantized, ("quantized", "quantized_input_scaled"), encode, decode, holds_sparse_values=True
)
