"""The file codec of every compressed leaf type, in one table.

Adding a leaf type to the file format is one module here (a
:class:`~jaxcompress.io.nodes.LeafCodec`) and one entry in :data:`CODECS`.
"""

from __future__ import annotations

from jaxcompress.io.codecs import clustered, lowrank, quantized, sparse
from jaxcompress.io.nodes import LeafCodec

CODECS: tuple[LeafCodec, ...] = (sparse.CODEC, clustered.CODEC, quantized.CODEC, lowrank.CODEC)

BY_LEAF_TYPE: dict[type, LeafCodec] = {codec.leaf_type: codec for codec in CODECS}
BY_NODE_TYPE: dict[str, LeafCodec] = {name: codec for codec in CODECS for name in codec.node_types}
# Node types that may hold a Sparse leaf's kept values (so zeros stay exact).
SPARSE_VALUE_TYPES = frozenset(
    name for codec in CODECS if codec.holds_sparse_values for name in codec.node_types
)


def codec_for(leaf_type: type) -> LeafCodec | None:
    """The codec of ``leaf_type`` (or of its nearest registered base class), or ``None``.

    Example:
        >>> import jaxcompress as jc
        >>> codec_for(jc.Sparse).node_types, codec_for(int)
        (('sparse',), None)
    """
    for cls in leaf_type.__mro__:
        if cls in BY_LEAF_TYPE:
            return BY_LEAF_TYPE[cls]
    return None
