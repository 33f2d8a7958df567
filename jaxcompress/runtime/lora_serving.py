"""Serving LoRA adapters kept beside a compressed tree, with no dense weight.

:func:`accelerate_lora` is :func:`jaxcompress.training.lora_model` with the base
product of each compressed leaf run by :mod:`jaxcompress.runtime.kernels` on the
serving layout :meth:`jaxcompress.Accelerated.prepare` makes: each adapted matmul is
``kernel(x, W_base) + scale * (x @ A) @ B``, and compressed leaves without adapters
take the same kernels. Routes, per use of a prepared leaf:

===================  ==========================================================
leaf                 base product
===================  ==========================================================
``QuantizedMatrix``  ``blocked`` (dequantize one block of outputs at a time)
``ClusteredMatrix``  ``blocked`` lookup
``LowRank``          ``factored``: ``(x @ u) @ v``
other                the dense base and the original op (``lora_apply``'s weight
                     for a ``Sparse`` base, whose update is masked)
===================  ==========================================================

The products are float (no int8 activations), so the result equals
``apply_fn(lora_apply(params, adapters), *args)`` to float32 rounding. It sits in
``runtime/`` because it uses the kernels; training cannot import them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxcompress.arrays import LowRank
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix
from jaxcompress.runtime import kernels
from jaxcompress.runtime.accelerate import accelerate
from jaxcompress.training.lora import Adapter
from jaxcompress.training.lora_factored import LoraModel, lora_model

__all__ = ["LoraServer", "accelerate_lora"]


def _base_matmul(leaf: Any, x: jax.Array, contracted: tuple[int, ...]):
    """``(route, x @ W)`` by a serving kernel, or ``None`` where none applies."""
    ndim = len(leaf.shape)
    if isinstance(leaf, QuantizedMatrix) and contracted == leaf.input_axes:
        return "blocked", kernels.blocked_quantized(x, leaf)
    if isinstance(leaf, ClusteredMatrix) and contracted == leaf.input_axes:
        return "blocked", kernels.blocked_clustered(x, leaf)
    if isinstance(leaf, LowRank):
        if contracted == tuple(range(leaf.fan_in_axes)):
            return "factored", kernels.factored(x, leaf)
        if contracted == tuple(range(leaf.fan_in_axes, ndim)):
            return "factored", kernels.factored(x, leaf, transposed=True)
    return None


class LoraServer:
    """``apply_fn`` served with adapters beside a compressed tree; see :func:`accelerate_lora`.

    Attributes:
        model: the underlying :class:`~jaxcompress.training.LoraModel`
            (``model.last_routes`` says how each compressed leaf was used).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> lr, _ = jc.low_rank(rank=2, where="w")({"w": jnp.ones((8, 8))})
        >>> serve = jc.accelerate_lora(lambda p, x: x @ p["w"])
        >>> serve(serve.prepare(lr), {}, jnp.ones((1, 8))).shape, serve.last_routes
        ((1, 8), {'w': ['factored']})
    """

    def __init__(self, apply_fn: Callable[..., Any]) -> None:
        self.model: LoraModel = lora_model(apply_fn, base_matmul=_base_matmul)
        self._prepare = accelerate(apply_fn, int8_activations=False).prepare

    @property
    def last_routes(self) -> dict[str, list[str]]:
        """``{path: [route, ...]}`` of the most recently traced call."""
        return self.model.last_routes

    def prepare(self, params: Any) -> Any:
        """The serving layout of ``params`` (:meth:`jaxcompress.Accelerated.prepare`, exact)."""
        return self._prepare(params)

    def __call__(self, params: Any, adapters: dict[str, Adapter], *args: Any) -> Any:
        return self.model(params, adapters, *args)


def accelerate_lora(apply_fn: Callable[..., Any]) -> LoraServer:
    """``f(params, adapters, *args)``: a model served with LoRA adapters kept beside it.

    Call ``f.prepare(params)`` once (it converts quantized and clustered leaves to the
    serving layout; adapters made for the original tree still fit, the dense shapes
    are the same), then ``f(prepared, adapters, *args)`` under ``jax.jit``. Each
    product with an adapted leaf is ``kernel(x, W_base) + scale * (x @ A) @ B``; see
    the module docstring for the kernels. The result equals
    ``apply_fn(lora_apply(params, adapters), *args)`` to float32 rounding.

    Args:
        apply_fn: ``apply_fn(params, *args)``, as for :func:`jaxcompress.accelerate`.

    Returns:
        A :class:`LoraServer` with ``prepare`` and ``last_routes``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.linspace(-1.0, 1.0, 64 * 16).reshape(64, 16)
        >>> params, _ = jc.quantize(4, group_size=32, where="w")({"w": w})
        >>> adapters = jc.training.lora_init(params, 2, key=jax.random.key(0), where="w")
        >>> serve = jc.accelerate_lora(lambda p, x: jnp.tanh(x @ p["w"]))
        >>> x = jnp.ones((3, 64))
        >>> y = jax.jit(serve)(serve.prepare(params), adapters, x)
        >>> serve.last_routes
        {'w': ['factored+blocked']}
        >>> dense = jnp.tanh(x @ jc.training.lora_apply(params, adapters)["w"])
        >>> bool(jnp.allclose(y, dense, atol=1e-5))
        True
    """
    return LoraServer(apply_fn)
