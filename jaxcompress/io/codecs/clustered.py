"""The file codec of :class:`~jaxcompress.arrays.Clustered`: an index stream plus a codebook."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcompress.arrays import Clustered
from jaxcompress.io import nodes, streams


def encode(leaf: Clustered, encoding: nodes.Encoding, path: str) -> dict[str, Any]:
    indices = nodes.code_stream(
        leaf.indices,
        encoding.add,
        path,
        encoding.entropy,
        lambda packed: streams.encode_codes(
            packed, bits=leaf.bits, shape=leaf.shape, entropy=encoding.entropy
        ),
    )
    return {
        "type": "clustered",
        **nodes.dense_fields(leaf, path),
        "bits": leaf.bits,
        "indices": indices,
        "codebook": nodes.array_node(leaf.codebook, encoding.add, nodes.join(path, "codebook")),
    }


def decode(node: dict[str, Any], decoding: nodes.Decoding, path: str) -> Clustered:
    shape, dtype = nodes.dense_header(node, path)
    bits = nodes.bits_field(node, path)
    codebook = nodes.read_array(node.get("codebook"), decoding.get, nodes.join(path, "codebook"))
    k = codebook.shape[-1] if codebook.ndim else 0
    if (
        codebook.ndim not in (1, 2)
        or not 1 <= k <= 2**bits
        or (codebook.ndim == 2 and codebook.shape[0] != shape[-1])
    ):
        raise nodes.fail(path, f"codebook shape {codebook.shape} does not fit {bits}-bit indices")
    record = nodes.stream_field(node, "indices", path)
    indices = nodes.read_codes(record, decoding.get, path, bits=bits, shape=shape)
    # Indices stored shard by shard are not all read here (other processes hold some).
    if (
        k < 2**bits
        and isinstance(indices, np.ndarray)
        and streams.unpack_bits(indices, bits, shape[-1]).max(initial=0) >= k
    ):
        raise nodes.fail(path, f"an index points past the {k}-entry codebook")
    return Clustered(
        indices=decoding.place(indices, path, node),
        codebook=decoding.place(codebook, path, node),
        shape=shape,
        dtype=dtype,
        bits=bits,
    )


CODEC = nodes.LeafCodec(Clustered, ("clustered",), encode, decode, holds_sparse_values=True)
