"""The file codec of :class:`~jaxcompress.arrays.Sparse`: a mask stream plus its kept values."""

from __future__ import annotations

import math
from typing import Any

from jaxcompress.arrays import Sparse
from jaxcompress.io import nodes, streams


def encode(leaf: Sparse, encoding: nodes.Encoding, path: str) -> dict[str, Any]:
    mask = nodes.code_stream(
        leaf.mask,
        encoding.add,
        path,
        encoding.entropy,
        lambda packed: streams.encode_mask(packed, shape=leaf.shape, entropy=encoding.entropy),
    )
    values = encoding.encode(leaf.values, nodes.join(path, "values"))
    return {
        "type": "sparse",
        **nodes.dense_fields(leaf, path),
        "nnz": leaf.nnz,
        "mask": mask,
        "values": values,
    }


def decode(node: dict[str, Any], decoding: nodes.Decoding, path: str) -> Sparse:
    shape, dtype = nodes.dense_header(node, path)
    size = math.prod(shape)
    nnz = nodes.field(
        node, "nnz", path, lambda n: nodes.is_int(n) and n <= size, f"an integer 0 to {size}"
    )
    record = nodes.stream_field(node, "mask", path)
    mask: nodes.Stored
    if record.get("type") == "blocks":
        # Stored shard by shard: the kept count is not checked, as that would read
        # every block (other processes' included); each block has its CRC.
        packed_shape = (*shape[:-1], math.ceil(shape[-1] / 8))
        mask = nodes.packed_blocks(record, decoding.get, path, packed_shape)
    else:
        mask = streams.decode_mask(
            record, decoding.get(record.get("buffer"), path), shape=shape, nnz=nnz, where=path
        )
    values_path = nodes.join(path, "values")
    values_node = nodes.field(node, "values", path, lambda v: isinstance(v, dict), "a leaf node")
    if values_node.get("type") in ("array", "blocks"):
        values = nodes.read_array(values_node, decoding.get, values_path)
        if values.dtype != dtype:
            raise nodes.fail(values_path, f"dtype {values.dtype} differs from the leaf's {dtype}")
        values = decoding.place(values, path, node)
    elif values_node.get("type") in decoding.value_types:
        values = decoding.decode(values_node, values_path)
    else:
        raise nodes.fail(values_path, "sparse values must be an array, clustered or quantized node")
    if tuple(values.shape) != (nnz,):
        raise nodes.fail(values_path, f"has shape {tuple(values.shape)}, expected ({nnz},)")
    return Sparse(values=values, mask=decoding.place(mask, path, node), shape=shape, dtype=dtype)


CODEC = nodes.LeafCodec(Sparse, ("sparse",), encode, decode)
