"""Compression inside training loops: optax wrappers that use the library's own transforms.

* :func:`pruned` and :func:`cubic_sparsity`: gradual magnitude pruning (Zhu & Gupta)
  with the masks in the optimizer state; :func:`finalize` turns the result into
  :class:`~jaxcompress.Sparse` leaves.
* :func:`clustered`: centroid fine-tuning of :class:`~jaxcompress.Clustered` leaves
  (Deep Compression).
* :func:`fake_quant`: quantization-aware training with straight-through rounding,
  using the same quantizer as :func:`jaxcompress.quantize`.
* :func:`lora_init`, :func:`lora_apply` and :func:`lora_merge`: LoRA / QLoRA adapters
  trained on top of frozen compressed leaves, kept beside them or folded back in;
  :func:`lora_model` runs a model with them factored (``x @ W + scale·(x @ A) @ B``),
  so their gradients never form a dense ``(in, out)`` array.
* :func:`grad` and :func:`value_and_grad`: ``jax.grad`` / ``jax.value_and_grad`` over
  the floating children of compressed leaves (and the array leaves of equinox
  modules), for training loops over compressed trees.
"""

from jaxcompress.training.clustering import clustered as clustered
from jaxcompress.training.grads import grad as grad
from jaxcompress.training.grads import value_and_grad as value_and_grad
from jaxcompress.training.lora import Adapter as Adapter
from jaxcompress.training.lora import lora_apply as lora_apply
from jaxcompress.training.lora import lora_init as lora_init
from jaxcompress.training.lora import lora_merge as lora_merge
from jaxcompress.training.lora_factored import LoraModel as LoraModel
from jaxcompress.training.lora_factored import lora_model as lora_model
from jaxcompress.training.pruning import cubic_sparsity as cubic_sparsity
from jaxcompress.training.pruning import finalize as finalize
from jaxcompress.training.pruning import pruned as pruned
from jaxcompress.training.qat import fake_quant as fake_quant

__all__ = [
    "Adapter",
    "LoraModel",
    "clustered",
    "cubic_sparsity",
    "fake_quant",
    "finalize",
    "grad",
    "lora_apply",
    "lora_init",
    "lora_merge",
    "lora_model",
    "pruned",
    "value_and_grad",
]
