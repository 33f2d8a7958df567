"""jaxcompress: pure functional model compression for JAX.

Transforms take any parameter pytree (a flax linen ``params`` dict, an
``nnx.State``, a plain dict) and return the same structure with some leaves
replaced by compressed leaves that hold only what they need.

Example:
    >>> import jax.numpy as jnp
    >>> import jaxcompress as jc
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> compressed, stats = jc.prune(0.9)(params)
    >>> round(jc.summarize(params, compressed).ratio, 2)
    6.91
"""

import importlib
from typing import TYPE_CHECKING

from jaxcompress.arrays import Clustered as Clustered
from jaxcompress.arrays import CompressedArray as CompressedArray
from jaxcompress.arrays import LowRank as LowRank
from jaxcompress.arrays import Quantized as Quantized
from jaxcompress.arrays import Sparse as Sparse
from jaxcompress.arrays import is_compressed as is_compressed
from jaxcompress.arrays.serving import ClusteredMatrix as ClusteredMatrix
from jaxcompress.arrays.serving import QuantizedMatrix as QuantizedMatrix
from jaxcompress.arrays.tree import materialize as materialize
from jaxcompress.arrays.tree import nbytes as nbytes
from jaxcompress.calibration.calibrate import InputStats as InputStats
from jaxcompress.calibration.calibrate import calibrate as calibrate
from jaxcompress.calibration.sequential import sequential as sequential
from jaxcompress.core.version import __version__ as __version__
from jaxcompress.hybrid.auto import auto as auto
from jaxcompress.hybrid.autoplan import AutoPlan as AutoPlan
from jaxcompress.hybrid.budget import Budget as Budget
from jaxcompress.hybrid.budget import budget as budget
from jaxcompress.io.compress_file import compress_file as compress_file
from jaxcompress.io.errors import FileFormatError as FileFormatError
from jaxcompress.io.files import FileReport as FileReport
from jaxcompress.io.files import inspect_file as inspect_file
from jaxcompress.io.files import load as load
from jaxcompress.io.files import save as save
from jaxcompress.io.interop import export_dense as export_dense
from jaxcompress.io.interop import read_msgpack as read_msgpack
from jaxcompress.io.interop import read_safetensors as read_safetensors
from jaxcompress.io.interop import write_safetensors as write_safetensors
from jaxcompress.methods.blocks import prune_blocks as prune_blocks
from jaxcompress.methods.cluster import cluster as cluster
from jaxcompress.methods.cluster import fisher_diagonal as fisher_diagonal
from jaxcompress.methods.lowrank import low_rank as low_rank
from jaxcompress.methods.nm import prune_nm as prune_nm
from jaxcompress.methods.projections import lda as lda
from jaxcompress.methods.projections import pca as pca
from jaxcompress.methods.prune import prune as prune
from jaxcompress.methods.quantize import quantize as quantize
from jaxcompress.numerics import decomposition as decomposition
from jaxcompress.runtime import parallel as parallel
from jaxcompress.runtime import sharding as sharding
from jaxcompress.runtime.accelerate import Accelerated as Accelerated
from jaxcompress.runtime.accelerate import Plan as Plan
from jaxcompress.runtime.accelerate import accelerate as accelerate
from jaxcompress.runtime.parallel import data_parallel as data_parallel
from jaxcompress.runtime.parallel import pmap_apply as pmap_apply
from jaxcompress.runtime.parallel import tensor_parallel_specs as tensor_parallel_specs
from jaxcompress.runtime.report import LeafReport as LeafReport
from jaxcompress.runtime.report import Report as Report
from jaxcompress.runtime.report import summarize as summarize
from jaxcompress.runtime.sharding import shardings_like as shardings_like
from jaxcompress.structure.sensitivity import SensitivityReport as SensitivityReport
from jaxcompress.structure.sensitivity import sensitivity as sensitivity
from jaxcompress.structure.units import GroupResult as GroupResult
from jaxcompress.structure.units import UnitStats as UnitStats
from jaxcompress.structure.units import coupled_groups as coupled_groups
from jaxcompress.structure.units import prune_units as prune_units
from jaxcompress.transforms import filters as filters
from jaxcompress.transforms.base import Transform as Transform
from jaxcompress.transforms.base import chain as chain
from jaxcompress.transforms.base import masked as masked
from jaxcompress.transforms.base import partition as partition
from jaxcompress.transforms.checked import checked as checked

if TYPE_CHECKING:
    from jaxcompress import training as training
    from jaxcompress.examples import minilm as minilm
    from jaxcompress.runtime.lora_serving import accelerate_lora as accelerate_lora
    from jaxcompress.training.distill import DistillReport as DistillReport
    from jaxcompress.training.distill import distill as distill

# Loaded on first attribute access, not by `import jaxcompress`: training needs optax,
# and the MiniLM example flax. `import jaxcompress.training` works as usual.
_LAZY_MODULES = {"minilm": "jaxcompress.examples.minilm", "training": "jaxcompress.training"}
# Names whose module imports training (and so optax), loaded the same way.
_LAZY_FUNCTIONS = {
    "DistillReport": "jaxcompress.training.distill",
    "accelerate_lora": "jaxcompress.runtime.lora_serving",
    "distill": "jaxcompress.training.distill",
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'jaxcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_MODULES, *_LAZY_FUNCTIONS})


__all__ = [
    "Accelerated",
    "AutoPlan",
    "Budget",
    "Clustered",
    "ClusteredMatrix",
    "CompressedArray",
    "DistillReport",
    "FileFormatError",
    "FileReport",
    "GroupResult",
    "InputStats",
    "LeafReport",
    "LowRank",
    "Plan",
    "Quantized",
    "QuantizedMatrix",
    "Report",
    "SensitivityReport",
    "Sparse",
    "Transform",
    "UnitStats",
    "accelerate",
    "accelerate_lora",
    "auto",
    "budget",
    "calibrate",
    "chain",
    "checked",
    "cluster",
    "coupled_groups",
    "data_parallel",
    "decomposition",
    "distill",
    "export_dense",
    "filters",
    "fisher_diagonal",
    "inspect_file",
    "is_compressed",
    "lda",
    "load",
    "low_rank",
    "masked",
    "materialize",
    "minilm",
    "nbytes",
    "parallel",
    "partition",
    "pca",
    "pmap_apply",
    "prune",
    "prune_blocks",
    "prune_nm",
    "prune_units",
    "quantize",
    "read_msgpack",
    "read_safetensors",
    "compress_file",
    "save",
    "sensitivity",
    "sequential",
    "sharding",
    "shardings_like",
    "summarize",
    "tensor_parallel_specs",
    "training",
    "write_safetensors",
]
