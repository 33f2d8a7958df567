"""Compressed leaves: array-like containers that hold only what they need.

Each compressed leaf is a frozen dataclass registered as a pytree. Its array
children (values, codes, packed masks, ...) are pytree children so the leaf moves
through ``jit``, ``device_put`` and ``tree_map`` like any array; its shape and
dtype are static metadata. ``nbytes`` is the true storage cost of the children.

Constructors never validate: unflattening calls them with tracers and
placeholders. Validation lives in the factory functions (for example
:func:`jaxcompress.prune`).
"""

from jaxcompress.arrays.base import CompressedArray as CompressedArray
from jaxcompress.arrays.base import as_dense as as_dense
from jaxcompress.arrays.base import is_compressed as is_compressed
from jaxcompress.arrays.base import leaf_nbytes as leaf_nbytes
from jaxcompress.arrays.clustered import Clustered as Clustered
from jaxcompress.arrays.lowrank import LowRank as LowRank
from jaxcompress.arrays.quantized import Quantized as Quantized
from jaxcompress.arrays.sparse import Sparse as Sparse
