"""Compressed leaves as inputs of a serialized ``jax.export.Exported``.

``Exported.serialize()`` writes the input pytree's structure, and refuses node types it
does not know how to write. Importing this module registers every compressed leaf type
of :mod:`jaxcompress.arrays` (their static fields, shape, dtype, bits and so on, as
JSON), so a program exported with compressed or prepared parameters as inputs
serializes, and ``jax.export.deserialize`` gives back one that takes the same tree.
The process that deserializes must import ``jaxcompress`` too (it does, to build the
tree). Serialization itself needs the ``flatbuffers`` package.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.clustered import Clustered
from jaxcompress.arrays.lowrank import LowRank
from jaxcompress.arrays.quantized import Quantized
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix
from jaxcompress.arrays.sparse import Sparse

__all__ = ["LEAF_TYPES", "decode_aux", "encode_aux"]

# The leaf types registered, each under "jaxcompress.<class name>".
LEAF_TYPES = (Sparse, Quantized, Clustered, LowRank, QuantizedMatrix, ClusteredMatrix)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_plain(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    try:
        return {"dtype": jnp.dtype(value).name}
    except TypeError as error:
        raise TypeError(f"cannot serialize a leaf's static field {value!r}") from error


def _back(value: Any) -> Any:
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_back(v) for v in value["tuple"])
        return np.dtype(jnp.dtype(value["dtype"]))
    return value


def encode_aux(aux: Any) -> bytes:
    """A leaf's static fields (its pytree aux data) as JSON bytes.

    Example:
        >>> import numpy as np
        >>> encode_aux(((4, 3), np.dtype("float32"), 8))
        b'{"tuple": [{"tuple": [4, 3]}, {"dtype": "float32"}, 8]}'
    """
    return json.dumps(_plain(aux)).encode()


def decode_aux(data: bytes) -> Any:
    """The aux data :func:`encode_aux` wrote.

    Example:
        >>> import numpy as np
        >>> decode_aux(encode_aux(((4, 3), np.dtype("bfloat16"), None)))
        ((4, 3), dtype(bfloat16), None)
    """
    return _back(json.loads(data.decode()))


def _register() -> None:
    for leaf_type in LEAF_TYPES:
        jax.export.register_pytree_node_serialization(
            leaf_type,
            serialized_name=f"jaxcompress.{leaf_type.__name__}",
            serialize_auxdata=encode_aux,
            deserialize_auxdata=decode_aux,
        )


_register()
