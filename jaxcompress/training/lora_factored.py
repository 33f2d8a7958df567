"""Factored LoRA: ``x @ W_base + scale * (x @ A) @ B`` inside the model's own program.

:func:`jaxcompress.training.lora_apply` hands the model a dense ``base + scale·A@B``
per adapted leaf, so ``jax.grad`` with respect to the adapters goes through the full
``(in, out)`` weight gradient ``xᵀ dy`` of every adapted matmul. :func:`lora_model`
instead traces the model once with dense stand-ins for the parameters
(:func:`jaxcompress.jaxpr.graph.trace_jaxpr`) and evaluates its jaxpr again
(:func:`jaxcompress.jaxpr.graph.evaluate`) with each adapted leaf as a lazy value:

* a ``dot_general`` that contracts the leaf's input axes (its matrix view's leading
  ``fan_in_axes``), or its output axes (a weight stored output first, used as
  ``x @ W.T``), runs as the original op on ``stop_gradient(materialize(base))`` plus
  ``scale * (x @ A) @ B`` (or ``scale * (x @ Bᵀ) @ Aᵀ``): the adapters' gradients are
  then ``xᵀ (dy Bᵀ)`` and ``(x A)ᵀ dy``, never an ``(in, out)`` array;
* a :class:`~jaxcompress.Sparse` base, whose update is masked to the kept entries,
  and any other use (a convolution, an elementwise op, a reshape before the product)
  gets the dense ``lora_apply`` weight, so results are always those of
  ``apply_fn(lora_apply(params, adapters), *args)``.

``transpose``, ``convert_element_type`` and copies pass the lazy value on; call-like
equations (``jit``, ``remat``, custom derivatives) that receive one are inlined.
This lives in ``training/`` (not ``runtime/``) because it runs on the layers below
only (``jaxpr/`` for the program, ``arrays/`` for the leaves). Training may not
import ``runtime``, so the base product is a hook, ``base_matmul``: serving with the
adapters kept beside a prepared compressed tree,
:func:`jaxcompress.accelerate_lora` (``runtime/``) passes ``accelerate``'s kernels
there, and no dense weight is built at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.base import as_dense, is_compressed
from jaxcompress.arrays.tree import on_arrays, split_arrays
from jaxcompress.core.paths import path_to_str
from jaxcompress.jaxpr.graph import DOT, bind_equation, evaluate, trace_jaxpr
from jaxcompress.training.lora import Adapter

__all__ = ["BaseMatmul", "LoraModel", "lora_model"]

# ``base_matmul(leaf, x, contracted)``: ``(route, x @ W)`` for a frozen compressed
# ``leaf`` whose axes ``contracted`` the product sums over, ``x`` being ``(rows,
# prod of those axes)`` and the result ``(rows, prod of the others)``; or ``None``
# when it has no kernel for that leaf (the dense base is used).
BaseMatmul = Callable[[Any, jax.Array, tuple[int, ...]], tuple[str, jax.Array] | None]

# Ops that hand their operand on unchanged.
_PASS_THROUGH = frozenset({"copy", "copy_p", "sharding_constraint", "pvary", "reshard"})


@dataclasses.dataclass
class _Adapted:
    """An adapted leaf flowing through the jaxpr; ``axes[i]`` is the leaf axis of axis ``i``."""

    path: str
    leaf: Any
    adapter: Adapter | None  # None: a compressed leaf without one (``base_matmul`` only)
    dtype: np.dtype
    axes: tuple[int, ...]

    def base(self) -> jax.Array:
        """The frozen base in the program's view, behind ``stop_gradient``."""
        dense = jax.lax.stop_gradient(as_dense(self.leaf))
        return jnp.transpose(dense, self.axes).astype(self.dtype)

    def value(self) -> jax.Array:
        """The ``lora_apply`` weight (float32 sum, masked update) in the program's view."""
        if self.adapter is None:
            return self.base()
        base = jax.lax.stop_gradient(as_dense(self.leaf)).astype(jnp.float32)
        delta = self.adapter.delta()
        if isinstance(self.leaf, Sparse):
            delta = jnp.where(self.leaf.keep_mask(), delta, 0.0)
        dense = (base + delta).astype(self.leaf.dtype)
        return jnp.transpose(dense, self.axes).astype(self.dtype)


def _is_adapted(value: Any) -> bool:
    return isinstance(value, _Adapted)


class _Rule:
    """Evaluates the equations that receive adapted leaves; records each route."""

    def __init__(self, base_matmul: BaseMatmul | None) -> None:
        self.routes: dict[str, list[str]] = {}
        self.base_matmul = base_matmul

    def record(self, weight: _Adapted, route: str) -> None:
        self.routes.setdefault(weight.path, []).append(route)

    def __call__(self, eqn: Any, invals: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if len(invals) == 1 and name in _PASS_THROUGH:
            return [invals[0]]
        if name == "convert_element_type" and _is_adapted(invals[0]):
            return [dataclasses.replace(invals[0], dtype=np.dtype(eqn.params["new_dtype"]))]
        if name == "transpose" and _is_adapted(invals[0]):
            axes = tuple(invals[0].axes[p] for p in eqn.params["permutation"])
            return [dataclasses.replace(invals[0], axes=axes)]
        if name == DOT:
            out = self._dot(eqn, invals)
            if out is not None:
                return [out]
        for value in invals:
            if _is_adapted(value):
                self.record(value, f"dense ({name})")
        return bind_equation(eqn, [v.value() if _is_adapted(v) else v for v in invals])

    def _dot(self, eqn: Any, invals: list[Any]) -> jax.Array | None:
        (contract, batch) = eqn.params["dimension_numbers"]
        slots = [i for i in (0, 1) if _is_adapted(invals[i])]
        if len(slots) != 1 or batch[0] or batch[1]:
            return None
        w_slot = slots[0]
        weight, act = invals[w_slot], invals[1 - w_slot]
        adapter, ndim = weight.adapter, len(weight.leaf.shape)
        pairs = sorted(
            (weight.axes[w], a) for w, a in zip(contract[w_slot], contract[1 - w_slot], strict=True)
        )
        contracted = tuple(w for w, _ in pairs)
        factors = None
        if adapter is not None:
            if isinstance(weight.leaf, Sparse):
                return None  # the update is masked: no factored form
            k = adapter.fan_in_axes
            if contracted == tuple(range(k)):
                factors = (adapter.a, adapter.b)  # x @ A @ B
            elif contracted == tuple(range(k, ndim)):
                factors = (adapter.b.T, adapter.a.T)  # x @ (A @ B).T
            else:
                return None
        free = [a for a in range(ndim) if a not in contracted]
        act_contract = [a for _, a in pairs]
        act_free = [d for d in range(act.ndim) if d not in act_contract]
        rows = math.prod(act.shape[d] for d in act_free)
        x = jnp.transpose(act, act_free + act_contract).reshape(rows, -1)
        kernel = None
        if self.base_matmul is not None:
            frozen = jax.tree.map(jax.lax.stop_gradient, weight.leaf)
            kernel = self.base_matmul(frozen, x, contracted)
        if kernel is None and factors is None:
            return None
        out_dtype = eqn.outvars[0].aval.dtype
        term = None
        if factors is not None:
            precision = eqn.params.get("precision")
            low = jnp.matmul(x.astype(factors[0].dtype), factors[0], precision=precision)
            term = jnp.matmul(low, factors[1], precision=precision) * adapter.scale
        if kernel is None:
            # The original op on the frozen dense base: same result and layout, and no
            # gradient reaches the base.
            base_invals = list(invals)
            base_invals[w_slot] = weight.base()
            (base_out,) = bind_equation(eqn, base_invals)
            self.record(weight, "factored")
        else:
            route, base_out = kernel
            term = base_out if term is None else base_out.astype(jnp.float32) + term
            base_out = None
            self.record(weight, route if factors is None else f"factored+{route}")
        assert term is not None  # a kernel, factors, or both: returned None above otherwise
        term = term.reshape(
            *(act.shape[d] for d in act_free), *(weight.leaf.shape[a] for a in free)
        )
        # dot_general puts the lhs free axes first; the weight's free axes come in the
        # program's (possibly transposed) order.
        n_act = len(act_free)
        weight_axes = [n_act + free.index(a) for a in weight.axes if a in free]
        act_axes = list(range(n_act))
        order = weight_axes + act_axes if w_slot == 0 else act_axes + weight_axes
        term = jnp.transpose(term, order).astype(out_dtype)
        return term if base_out is None else base_out + term


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    if is_compressed(leaf):
        return jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype))
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))


class LoraModel:
    """``apply_fn`` run on a compressed tree with adapters beside it; see :func:`lora_model`.

    Attributes:
        apply_fn: the wrapped function.
        last_routes: ``{path: [route, ...]}`` of the most recently traced call, one
            entry per use of an adapted leaf: ``"factored"``, or ``"dense (op)"``
            where the ``lora_apply`` weight was built for ``op``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params, _ = jc.cluster(k=4, where="w")({"w": jnp.linspace(-1.0, 1.0, 24).reshape(6, 4)})
        >>> adapters = jc.training.lora_init(params, 1, key=jax.random.key(0), where="w")
        >>> f = jc.training.lora_model(lambda p, x: x @ p["w"].T.T + jnp.sum(p["w"]))
        >>> f(params, adapters, jnp.ones((2, 6))).shape, f.last_routes
        ((2, 4), {'w': ['factored', 'dense (reduce_sum)']})
    """

    def __init__(
        self, apply_fn: Callable[..., Any], *, base_matmul: BaseMatmul | None = None
    ) -> None:
        self.apply_fn = apply_fn
        self.base_matmul = base_matmul
        self.last_routes: dict[str, list[str]] = {}

    def __call__(self, params: Any, adapters: dict[str, Adapter], *args: Any) -> Any:
        arrays, rest = split_arrays(params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(arrays, is_leaf=is_compressed)
        paths = [path_to_str(path) for path, _ in flat]
        missing = sorted(set(adapters) - set(paths))
        if missing:
            raise KeyError(f"lora_model: no leaf at the adapter paths {missing}")
        values: list[Any] = []
        for path, (_, leaf) in zip(paths, flat, strict=True):
            adapter = adapters.get(path)
            if adapter is None:
                if self.base_matmul is not None and is_compressed(leaf):
                    axes = tuple(range(len(leaf.shape)))
                    values.append(_Adapted(path, leaf, None, np.dtype(leaf.dtype), axes))
                else:
                    values.append(as_dense(leaf))
                continue
            if tuple(leaf.shape) != adapter.shape:
                raise ValueError(
                    f"lora_model: adapter {path!r} is for shape {adapter.shape}, "
                    f"the leaf is {tuple(leaf.shape)}"
                )
            axes = tuple(range(len(leaf.shape)))
            values.append(_Adapted(path, leaf, adapter, np.dtype(leaf.dtype), axes))
        stand_ins = jax.tree.unflatten(treedef, [_abstract(leaf) for _, leaf in flat])
        apply_fn = on_arrays(self.apply_fn, rest)
        out_tree = {}

        def flat_apply(p: Any, *a: Any) -> list[Any]:
            leaves, out_tree["def"] = jax.tree.flatten(apply_fn(p, *a))
            return leaves

        abstract_args = jax.tree.map(_abstract, args)
        closed, _ = trace_jaxpr(flat_apply, stand_ins, *abstract_args)
        rule = _Rule(self.base_matmul)
        outs = evaluate(closed, values + jax.tree.leaves(args), special=_is_adapted, rule=rule)
        self.last_routes = rule.routes
        dense = [o.value() if _is_adapted(o) else o for o in outs]
        return jax.tree.unflatten(out_tree["def"], dense)


def lora_model(apply_fn: Callable[..., Any], *, base_matmul: BaseMatmul | None = None) -> LoraModel:
    """``apply_fn`` with LoRA adapters applied factored: ``f(params, adapters, *args)``.

    ``f(params, adapters, *args)`` equals ``apply_fn(lora_apply(params, adapters),
    *args)`` (to float32 rounding), but each matrix product that consumes an adapted
    leaf runs as ``x @ stop_gradient(W_base) + scale * (x @ A) @ B`` (see the module
    docstring), so ``jax.grad`` with respect to ``adapters`` never forms a dense
    ``(in, out)`` gradient. The base is frozen and compressed leaves stay as they are.
    Call it under ``jax.jit`` (the model is traced, then re-evaluated, per call);
    ``last_routes`` says how each adapted leaf was used.

    Args:
        apply_fn: ``apply_fn(params, *args)``: a linen ``lambda p, x:
            model.apply({"params": p}, x)``, an nnx ``lambda s, x: nnx.merge(g, s)(x)``,
            an equinox ``lambda m, x: jax.vmap(m)(x)`` (its non-array leaves are
            static) or any function. Non-array options should be bound beforehand.
        base_matmul: an optional kernel for ``x @ W_base`` on a compressed leaf
            without a dense ``W_base`` (see ``BaseMatmul``); it is then also used for
            compressed leaves without adapters. ``None`` (training): the original
            op on the materialized base. :func:`jaxcompress.accelerate_lora` passes
            the serving kernels.

    Returns:
        A :class:`LoraModel`, called as ``f(params, adapters, *args)``.

    Raises:
        KeyError: (on call) an adapter path with no leaf in ``params``.
        ValueError: (on call) an adapter made for another shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> params, _ = jc.quantize(4, where="w")({"w": w})
        >>> adapters = jc.training.lora_init(params, 2, key=jax.random.key(0), where="w")
        >>> f = jc.training.lora_model(lambda p, x: jnp.tanh(x @ p["w"]))
        >>> x = jnp.ones((3, 8))
        >>> y = jax.jit(f)(params, adapters, x)
        >>> f.last_routes
        {'w': ['factored']}
        >>> dense = jnp.tanh(x @ jc.training.lora_apply(params, adapters)["w"])
        >>> bool(jnp.allclose(y, dense, atol=1e-6))
        True
        >>> grads = jax.grad(lambda ad: f(params, ad, x).sum())(adapters)
        >>> grads["w"].a.shape, grads["w"].b.shape
        ((8, 2), (2, 4))
    """
    return LoraModel(apply_fn, base_matmul=base_matmul)
