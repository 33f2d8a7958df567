"""``accelerate``: run a model's own ``apply`` on compressed weights, fast.

The model is traced once per input shape with dense stand-ins for the compressed
leaves (:func:`jaxcompress.graph.trace_jaxpr`), and the jaxpr is evaluated again
(:func:`jaxcompress.graph.evaluate`) with each ``dot_general`` or convolution that
consumes a compressed leaf replaced by a kernel from :mod:`jaxcompress.kernels`,
chosen for the target platform (``accelerate(..., platform=)``), on CPU:

===================  ==========================================================
leaf                 route
===================  ==========================================================
``LowRank``          ``factored``: ``(x @ u) @ v``; two convolutions for a kernel
``QuantizedMatrix``  ``int8`` (integer dot, dynamic int8 activations) for one
                     scale group per channel when the batch is large enough,
                     checked in the program: when an activation row's int8
                     rounding error exceeds ``int8_tolerance``, the float route
                     below runs instead (``lax.cond``); else ``blocked``
                     (dequantize one block at a time), or ``dequantize`` (the
                     whole matrix once) from 512 rows
``ClusteredMatrix``  ``blocked`` lookup (exact; ``prepare`` makes an int8-grid
                     ``QuantizedMatrix`` instead when int8 activations are on
                     and the grid moves no output channel by more than
                     ``int8_tolerance``), ``dequantize`` from 512 rows
``Sparse``, other    ``materialize``: dense masked, then the original op
===================  ==========================================================

On ``"cuda"``, ``"rocm"`` and ``"tpu"``, a ``QuantizedMatrix`` or
``ClusteredMatrix`` product goes to the first registered kernel family
(:mod:`jaxcompress.runtime.routes`) that has a kernel for it (route ``kernel``, the
plan naming it), else to ``dequantize`` at every batch size (weight-only: XLA fuses
the decode into the product there); clustered leaves keep exact indices. The
platform, not the backend that runs, decides: a CPU machine builds the GPU or TPU
program, and ``jax.export`` lowers it.

A leaf reaching its product through ``jit``, ``remat``, a custom-derivative body or
a ``shard_map`` that receives it replicated takes these routes too; one a
``shard_map`` splits, or one entering a Pallas kernel or control flow, is
materialized there and the code runs as written (with a warning naming it).

A weight stored output first and used as ``x @ W.T`` (equinox's ``Linear``) takes
the same routes: a ``Quantized`` leaf with scales on axis 0 is prepared as an
``outputs_first`` ``QuantizedMatrix``, and a ``LowRank`` leaf runs as
``(x @ vᵀ) @ uᵀ``.

A ``Quantized`` leaf with AWQ input scales has no serving layout yet: ``prepare``
leaves it as it is and it takes the ``materialize`` route (exact).

``Quantized`` and ``Clustered`` leaves take their fast routes in the output-major
serving layout (:mod:`jaxcompress.arrays.serving`). ``prepare(params)`` converts
them; a call on an unprepared tree does it itself, once per leaf, and keeps the
serving form while the leaf lives, so the second call onwards runs as fast as a
prepared tree and gives the same result bit for bit. Leaves that are tracers (the
arguments of an outer ``jit`` or of ``jax.export``) cannot be converted once and are
materialized in the program: prepare before. Every other use of a compressed leaf
(an elementwise op, a reshape, a use the kernels do not cover) materializes it, so
results are always those of the original function.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.arrays import LowRank, is_compressed
from jaxcompress.arrays.clustered import Clustered
from jaxcompress.arrays.quantized import Quantized
from jaxcompress.arrays.serving import (
    ClusteredMatrix,
    QuantizedMatrix,
    channel_error,
    clustered_on_int8_grid,
    servable,
    to_serving,
    uniform_codebook_as_quantized,
)
from jaxcompress.arrays.tree import on_arrays, split_arrays
from jaxcompress.core.checks import is_traced
from jaxcompress.core.paths import path_to_str
from jaxcompress.jaxpr.graph import (
    CONV,
    DOT,
    SHARD_MAP,
    bind_equation,
    evaluate,
    is_opaque,
    trace_jaxpr,
)
from jaxcompress.runtime import exported as _serialization  # noqa: F401  (registers leaves)
from jaxcompress.runtime import kernels, routes

__all__ = [
    "PLATFORMS",
    "ROUTES",
    "Accelerated",
    "Decision",
    "Plan",
    "accelerate",
    "default_platform",
]

# Which registered kernels the router may take: export-stable ones only, or all.
KERNEL_CHOICES = ("stable", "all")
_TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
ROUTES = ("auto", "int8", "blocked", "dequantize", "materialize")
# Target platforms, as jax.export names them.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# Rows the integer dot pads its activation to, per backend: on this project's CPU
# (AVX-512 VNNI) XLA's int8 product of 1 row took 18 ms and of 8 rows 0.8 ms
# (float32 at 1 row: 1.4 ms), so fewer rows are padded with zeros.
_INT8_PAD_ROWS = {"cpu": 8}
# Rows below which packed 4-bit codes take the blocked route: unpacking them for the
# integer dot costs more than it saves until the batch is large (on this CPU, a
# 4 x 4096 MLP at 8 rows took 20 ms that way, 14 ms blocked, 14 ms dense).
_PACKED_INT8_MIN_ROWS = {"cpu": 64}
# Rows from which a float product decodes the whole matrix once ("dequantize") instead
# of block by block: with that many rows the product is compute-bound, and one large
# matmul beats a loop of narrow ones. On this CPU, at 512 and 2048 rows, dequantize
# ran at 0.88-1.06x dense against blocked's 0.49-0.92x over 384x1536, 1536x384 and
# 4096x4096 int8 weights, and the MiniLM encoder at 2048 tokens at 0.98x against 0.70x.
_DEQUANTIZE_MIN_ROWS = {"cpu": 512}
# Every table above holds CPU measurements. On "cuda", "rocm" and "tpu" the router
# asks the registered kernel families (runtime/routes.py) first; with no kernel, it
# takes "dequantize" at every batch size (XLA fuses the decode into the product's
# operand there, where the blocked route's loop of narrow products would run one
# after another) and never quantizes activations on its own.

# The default of accelerate(int8_tolerance=): the largest relative L2 error the int8
# route may add to an activation row (checked in the program) or to an output
# channel of a clustered weight put on an int8 grid (checked by prepare). Rows of
# Gaussian values score 0.007-0.012 for 384 to 4096 inputs and stay on the route;
# MiniLM-L6's activations (outlier channels) score 0.017-0.093 per product, and
# most of its products take the exact route instead (benchmarks/served_fidelity.py).
DEFAULT_INT8_TOLERANCE = 0.02

# Ops that hand their operand on unchanged (for a weight: same values, same layout).
_PASS_THROUGH = frozenset({"copy", "copy_p", "sharding_constraint", "pvary", "reshard"})


@dataclasses.dataclass(frozen=True)
class Decision:
    """How one use of a compressed leaf was run.

    Attributes:
        path: the leaf path.
        leaf: the leaf's class name.
        op: the consuming primitive (``dot_general``, ``conv_general_dilated``, ...).
        route: ``factored``, ``int8``, ``blocked``, ``dequantize``, ``materialize``,
            or ``kernel`` (a registered kernel family's, see
            :mod:`jaxcompress.runtime.routes`).
        rows: rows ``M`` of the activation matrix, 0 where there is none.
        note: why this route (for a kernel, the family's reason; for another route on
            a GPU or TPU, why no kernel was taken).
        kernel: the kernel's name on the ``kernel`` route, else ``""``.
    """

    path: str
    leaf: str
    op: str
    route: str
    rows: int
    note: str = ""
    kernel: str = ""

    @property
    def label(self) -> str:
        """The route, with the kernel's name on the ``kernel`` route (``kernel:name``).

        Example:
            >>> Decision("w", "QuantizedMatrix", "dot_general", "kernel", 1, "", "int4").label
            'kernel:int4'
        """
        return f"{self.route}:{self.kernel}" if self.kernel else self.route


@dataclasses.dataclass(frozen=True)
class Plan:
    """The routes taken by one traced call (see :meth:`Accelerated.explain`).

    ``str(plan)`` is a table of every decision.

    Attributes:
        decisions: one :class:`Decision` per use of a compressed leaf, in program order.
        platform: the platform the routes were chosen for (``"cpu"``, ``"cuda"``,
            ``"rocm"`` or ``"tpu"``).

    Example:
        >>> plan = Plan((Decision("w", "LowRank", "dot_general", "factored", 4),), "cpu")
        >>> plan.routes()
        {'w': 'factored'}
        >>> print(plan)
        platform: cpu
        leaf  type     op           route     rows  note
        ----  -------  -----------  --------  ----  ----
        w     LowRank  dot_general  factored  4
    """

    decisions: tuple[Decision, ...]
    platform: str

    def routes(self) -> dict[str, str]:
        """``{path: route}`` (``kernel:name`` for a kernel); a leaf used twice shows its
        routes joined by ``+``."""
        out: dict[str, list[str]] = {}
        for d in self.decisions:
            out.setdefault(d.path, []).append(d.label)
        return {path: "+".join(r) for path, r in out.items()}

    def dense(self) -> dict[str, str]:
        """``{path: why}`` for the leaves some use of which ran on the dense weight.

        Example:
            >>> d = Decision("w", "Quantized", "pallas_call", "materialize", 0, "opaque")
            >>> Plan((d,), "cpu").dense()
            {'w': 'pallas_call: opaque'}
        """
        out: dict[str, list[str]] = {}
        for d in self.decisions:
            if d.route == "materialize":
                out.setdefault(d.path, []).append(f"{d.op}: {d.note}" if d.note else d.op)
        return {path: "; ".join(dict.fromkeys(notes)) for path, notes in out.items()}

    def __str__(self) -> str:
        header = ("leaf", "type", "op", "route", "rows", "note")
        rows = [header] + [
            (d.path, d.leaf, d.op, d.label, str(d.rows), d.note) for d in self.decisions
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"platform: {self.platform}\n" + "\n".join(line.rstrip() for line in lines)


@dataclasses.dataclass
class _Weight:
    """A compressed leaf flowing through the jaxpr; its dense value is made on demand.

    ``axes[i]`` is the leaf's original axis that axis ``i`` of the value as the
    program sees it comes from (transposes permute it).
    """

    path: str
    leaf: Any
    dtype: np.dtype
    axes: tuple[int, ...]
    dense: Any = None
    # pvary equations met inside a shard_map body: the dense value must vary the same way.
    casts: tuple[Any, ...] = ()

    def value(self) -> jax.Array:
        if self.dense is None:
            self.dense = self.leaf.materialize()
        out = jnp.transpose(self.dense, self.axes).astype(self.dtype)
        for eqn in self.casts:
            (out,) = bind_equation(eqn, [out])
        return out


# A pytree, so a weight can enter a shard_map body as its leaf's arrays; the cached
# dense value stays behind.
jax.tree_util.register_pytree_node(
    _Weight,
    lambda w: ((w.leaf,), (w.path, w.dtype, w.axes, w.casts)),
    lambda aux, children: _Weight(aux[0], children[0], aux[1], aux[2], casts=aux[3]),
)


def _is_weight(value: Any) -> bool:
    return isinstance(value, _Weight)


def _kernel_inputs(leaf: Any, contracted: list[int]) -> tuple[int, ...] | None:
    """The leaf's axes a kernel contracts, when they are ``contracted``; else ``None``.

    A ``LowRank`` leaf's matrix view splits its axes at ``fan_in_axes``; a kernel
    contracts either side (``x @ W`` or, transposed, ``x @ W.T``). A serving matrix
    contracts its input axes.
    """
    ndim = len(leaf.shape)
    sides: tuple[tuple[int, ...], ...]
    if isinstance(leaf, LowRank):
        sides = (tuple(range(leaf.fan_in_axes)), tuple(range(leaf.fan_in_axes, ndim)))
    elif isinstance(leaf, QuantizedMatrix | ClusteredMatrix):
        sides = (leaf.input_axes,)
    else:
        return None
    return next((side for side in sides if list(side) == contracted), None)


class _Router:
    """Evaluates the equations that receive compressed leaves; records each choice."""

    def __init__(
        self,
        *,
        route: str,
        int8_activations: bool,
        platform: str,
        kernels: str,
        int8_tolerance: float = DEFAULT_INT8_TOLERANCE,
    ) -> None:
        self.route = route
        self.int8_activations = int8_activations
        self.int8_tolerance = int8_tolerance
        self.platform = platform
        self.kernels = kernels
        self.decisions: list[Decision] = []
        # Leaves that entered a shard_map or an opaque kernel (pallas_call, scan, ...).
        self.opaque: dict[str, list[str]] = {}

    def record(
        self, weight: _Weight, op: str, route: str, rows: int, note: str = "", kernel: str = ""
    ) -> None:
        kind = type(weight.leaf).__name__
        self.decisions.append(Decision(weight.path, kind, op, route, rows, note, kernel))

    def __call__(self, eqn: Any, invals: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if name == "pvary" and len(invals) == 1 and _is_weight(invals[0]):
            return [dataclasses.replace(invals[0], casts=(*invals[0].casts, eqn))]
        if len(invals) == 1 and name in _PASS_THROUGH:
            return [invals[0]]
        if name == "convert_element_type" and _is_weight(invals[0]):
            new_dtype = np.dtype(eqn.params["new_dtype"])
            return [dataclasses.replace(invals[0], dtype=new_dtype)]
        if name == "transpose" and _is_weight(invals[0]):
            axes = tuple(invals[0].axes[p] for p in eqn.params["permutation"])
            return [dataclasses.replace(invals[0], axes=axes)]
        if name == DOT:
            out = self._dot(eqn, invals)
            if out is not None:
                return [out]
        if name == CONV:
            out = self._conv(eqn, invals)
            if out is not None:
                return [out]
        for value in invals:
            if _is_weight(value):
                why = self._why_dense(value, name)
                if name == SHARD_MAP or is_opaque(eqn):
                    why = f"its body runs as written, on the dense weight ({why})"
                    self.opaque.setdefault(value.path, []).append(name)
                self.record(value, name, "materialize", 0, why)
        dense = [v.value() if _is_weight(v) else v for v in invals]
        return bind_equation(eqn, dense)

    def _why_dense(self, weight: _Weight, op: str) -> str:
        leaf = weight.leaf
        if isinstance(leaf, Quantized | Clustered) and servable(leaf):
            return (
                "not prepared, and traced (an argument of an outer jit or export): "
                "prepare(params) before it for the fast routes"
            )
        if isinstance(leaf, Quantized) and leaf.input_scale is not None:
            return "AWQ input scales: no serving layout, dense weight"
        if op not in (DOT, CONV):
            return f"used by {op}"
        if isinstance(leaf, LowRank | QuantizedMatrix | ClusteredMatrix):
            return "the op does not contract the leaf's input axes"
        return f"no kernel for {type(leaf).__name__}"

    def _dot(self, eqn: Any, invals: list[Any]) -> jax.Array | None:
        (contract, batch) = eqn.params["dimension_numbers"]
        slots = [i for i in (0, 1) if _is_weight(invals[i])]
        if len(slots) != 1 or batch[0] or batch[1]:
            return None
        w_slot = slots[0]
        weight, act = invals[w_slot], invals[1 - w_slot]
        # Contracted axes in the leaf's own numbering, paired with the activation's.
        pairs = sorted(
            (weight.axes[w], a) for w, a in zip(contract[w_slot], contract[1 - w_slot], strict=True)
        )
        inputs = _kernel_inputs(weight.leaf, [w for w, _ in pairs])
        if inputs is None:
            return None
        free = [a for a in range(len(weight.leaf.shape)) if a not in inputs]
        act_contract = [a for _, a in pairs]
        act_free = [d for d in range(act.ndim) if d not in act_contract]
        rows = math.prod(act.shape[d] for d in act_free)
        features = math.prod(act.shape[d] for d in act_contract)
        x = jnp.transpose(act, act_free + act_contract).reshape(rows, features)
        y = self._matmul(weight, x, eqn, transposed=inputs[0] != 0)
        out_shape = tuple(act.shape[d] for d in act_free) + tuple(
            weight.leaf.shape[a] for a in free
        )
        y = y.reshape(out_shape)
        # The program wants the weight's free axes in its own (possibly transposed) order,
        # and dot_general puts the lhs free axes first.
        n_act = len(act_free)
        weight_axes = [n_act + free.index(a) for a in weight.axes if a in free]
        act_axes = list(range(n_act))
        order = weight_axes + act_axes if w_slot == 0 else act_axes + weight_axes
        return jnp.transpose(y, order).astype(eqn.outvars[0].aval.dtype)

    def _matmul(self, weight: _Weight, x: jax.Array, eqn: Any, *, transposed: bool) -> jax.Array:
        """``x`` times the leaf's matrix over its contracted axes, ``(M, N)``.

        ``transposed``: those are the leaf's trailing axes (a weight stored output
        first, used as ``x @ W.T``). A serving matrix knows its own input axes; a
        ``LowRank`` leaf is then applied as ``(x @ vᵀ) @ uᵀ``.
        """
        leaf, rows, op = weight.leaf, x.shape[0], eqn.primitive.name
        if isinstance(leaf, LowRank):
            self.record(weight, op, "factored", rows)
            precision = eqn.params.get("precision")
            return kernels.factored(x, leaf, precision=precision, transposed=transposed)
        if self.route == "auto" and self.platform != "cpu":
            family, name, reason = routes.find_kernel(
                leaf, rows, self.platform, dtype=x.dtype, stable_only=self.kernels == "stable"
            )
            if family is not None:
                self.record(weight, op, "kernel", rows, reason, kernel=name)
                return family.matmul(x, leaf, platform=self.platform).astype(jnp.float32)
            route, note = self._choose(leaf, rows)
            note = f"no kernel ({reason}); {note}"
        else:
            route, note = self._choose(leaf, rows)
        if route != "int8":
            self.record(weight, op, route, rows, note)
            return self._float_product(route, x, leaf, transposed=transposed)
        exact, _ = self._float_route(rows, "")
        tolerance = self.int8_tolerance
        if math.isinf(tolerance):
            check = "unchecked (int8_tolerance=inf)"
        else:
            check = f"checked: {exact} when an activation row's int8 error > {tolerance:g}"
        self.record(weight, op, route, rows, f"{note}; {check}" if note else check)
        pad = _INT8_PAD_ROWS.get(self.platform, 1)

        def integer(x: jax.Array) -> jax.Array:
            if isinstance(leaf, QuantizedMatrix):
                return kernels.int8_quantized(x, leaf, min_rows=pad)
            return kernels.int8_clustered(x, leaf, min_rows=pad)

        if math.isinf(tolerance):
            return integer(x)

        def floating(x: jax.Array) -> jax.Array:
            return self._float_product(exact, x, leaf, transposed=transposed)

        # O(M K) against the product's O(M K N); only the branch taken runs. A NaN
        # error (a NaN or infinite activation) fails the test: the float route
        # propagates it as the dense product would.
        within = kernels.int8_row_error(x) <= tolerance
        return lax.cond(within, integer, floating, x)

    def _float_product(self, route: str, x: jax.Array, leaf: Any, *, transposed: bool) -> jax.Array:
        """``x`` times the leaf on a float route: exact up to float32 rounding."""
        if route == "blocked":
            if isinstance(leaf, QuantizedMatrix):
                return kernels.blocked_quantized(x, leaf)
            return kernels.blocked_clustered(x, leaf)
        if route == "dequantize":
            return kernels.dequantized(x, leaf)
        k, n = leaf.matrix_shape
        dense = leaf.materialize()
        dense = (dense.reshape(n, k).T if transposed else dense.reshape(k, n)).astype(jnp.float32)
        return x.astype(jnp.float32) @ dense

    def _choose(self, leaf: QuantizedMatrix | ClusteredMatrix, rows: int) -> tuple[str, str]:
        one_group = not isinstance(leaf, QuantizedMatrix) or leaf.groups == 1
        if self.route != "auto":
            if self.route == "int8" and not (one_group and self.int8_activations):
                why = "scale groups" if not one_group else "int8_activations=False"
                return "blocked", f"int8 asked for, but {why}"
            return self.route, "forced"
        if not one_group:
            return self._float_route(rows, "scale groups")
        if not self.int8_activations:
            return self._float_route(rows, "int8_activations=False")
        if self.platform != "cpu":
            return self._float_route(rows, f"weight-only on {self.platform}")
        if isinstance(leaf, ClusteredMatrix):
            return self._float_route(rows, "exact indices: a per-call int8 lookup is slower")
        minimum = _PACKED_INT8_MIN_ROWS.get(self.platform, 1)
        if leaf.packed and rows < minimum:
            return "blocked", f"packed 4-bit codes at {rows} < {minimum} rows"
        return "int8", ""

    def _float_route(self, rows: int, why: str) -> tuple[str, str]:
        """A float product: block by block for few rows, one decoded matrix for many."""
        if self.platform != "cpu":
            return "dequantize", f"{why}: one decoded matrix, fused into the product"
        minimum = _DEQUANTIZE_MIN_ROWS.get(self.platform)
        if minimum is not None and rows >= minimum:
            return "dequantize", f"{why}; {rows} >= {minimum} rows: one decoded matrix"
        return "blocked", why

    def _conv(self, eqn: Any, invals: list[Any]) -> jax.Array | None:
        weight, act = invals[1], invals[0]
        if not _is_weight(weight) or _is_weight(act) or not isinstance(weight.leaf, LowRank):
            return None
        if weight.axes != tuple(range(len(weight.leaf.shape))):
            return None
        p = eqn.params
        leaf = weight.leaf
        ndim = len(leaf.shape)
        # Only kernels laid out (spatial..., in, out), as flax stores them.
        hwio = (ndim - 1, ndim - 2, *range(ndim - 2))
        if tuple(p["dimension_numbers"].rhs_spec) != hwio or leaf.fan_in_axes != ndim - 1:
            return None
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None
        rank = leaf.rank
        first = leaf.u.reshape(*leaf.shape[:-1], rank).astype(weight.dtype)
        second = leaf.v.reshape(*(1,) * (ndim - 2), rank, leaf.shape[-1]).astype(weight.dtype)
        bind = eqn.primitive.get_bind_params(p)
        inner = lax.conv_general_dilated(
            act,
            first,
            window_strides=p["window_strides"],
            padding=p["padding"],
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            dimension_numbers=p["dimension_numbers"],
            precision=bind.get("precision"),
        )
        self.record(weight, CONV, "factored", 0)
        out = lax.conv_general_dilated(
            inner,
            second,
            window_strides=(1,) * (ndim - 2),
            padding="VALID",
            dimension_numbers=p["dimension_numbers"],
            precision=bind.get("precision"),
        )
        return out.astype(eqn.outvars[0].aval.dtype)


def _abstract(tree: Any) -> Any:
    def one(x: Any) -> Any:
        if is_compressed(x):
            return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))
        return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))

    return jax.tree.map(one, tree, is_leaf=is_compressed)


class _Static:
    """The non-array half of a params tree as a hashable ``jit`` static argument.

    Equal when the structure and every leaf are the same (by ``==`` where the leaf
    defines it, else by identity), so one compiled program serves every call with
    the same activation functions and options.
    """

    def __init__(self, tree: Any) -> None:
        self.tree = tree
        self._leaves, self._treedef = jax.tree_util.tree_flatten(tree)

    def _key(self) -> tuple[Any, ...]:
        def one(leaf: Any) -> Any:
            try:
                hash(leaf)
            except TypeError:
                return id(leaf)
            return leaf

        return (self._treedef, *(one(leaf) for leaf in self._leaves))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self._key() == other._key()


class _PreparedLeaves:
    """Serving forms of concrete leaves, by the leaf's identity, while the leaf lives.

    A leaf is immutable, so the serving form made once stays right for it; a weak
    reference drops the entry when the leaf is freed (so a new leaf at the same
    address is never mistaken for it).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def kept(self, leaf: Any) -> Any:
        """The kept serving form of ``leaf``, or ``None``."""
        entry = self._entries.get(id(leaf))
        return entry[1] if entry is not None and entry[0]() is leaf else None

    def get(self, leaf: Any, make: Callable[[Any], Any]) -> Any:
        served = self.kept(leaf)
        if served is not None:
            return served
        key = id(leaf)
        # Inside a trace (a concrete tree closed over by a jitted function), ops on
        # concrete arrays would be staged out; the kept form must be concrete.
        with jax.ensure_compile_time_eval():
            served = make(leaf)
        if any(is_traced(a) for a in jax.tree.leaves(served)):
            return served
        entries = self._entries

        def forget(_: weakref.ref) -> None:
            entries.pop(key, None)

        entries[key] = (weakref.ref(leaf, forget), served)
        return served


def _unprepared(leaf: Any) -> bool:
    """A concrete quantized or clustered leaf that has a serving layout."""
    return (
        isinstance(leaf, Quantized | Clustered)
        and servable(leaf)
        and not any(is_traced(a) for a in jax.tree.leaves(leaf))
    )


def default_platform() -> str:
    """The running backend as a target platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``.

    JAX calls both GPU kinds ``"gpu"``; the device client's platform version tells
    them apart. Another backend's own name is returned as it is.

    Example:
        >>> default_platform() in PLATFORMS
        True
    """
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


class Accelerated:
    """``apply_fn`` over compressed pytrees; made by :func:`accelerate`.

    Attributes:
        apply_fn: the wrapped function.
        route: ``"auto"`` or the forced route.
        int8_activations: whether the integer route may quantize activations.
        int8_tolerance: the relative error the integer route may add (see
            :func:`accelerate`).
        platform: the platform the routes are chosen for (``"cpu"``, ``"cuda"``,
            ``"rocm"``, ``"tpu"``).
        last_plan: the :class:`Plan` of the most recently traced call, or ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> fast = jc.accelerate(lambda p, x: x @ p["w"], int8_activations=False)
        >>> q, _ = jc.quantize(bits=4, axis=-1)({"w": jnp.ones((32, 8))})
        >>> fast(q, jnp.ones((2, 32))).shape, fast.last_plan.routes()
        ((2, 8), {'w': 'blocked'})
    """

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        *,
        route: str,
        int8_activations: bool,
        platform: str,
        kernels: str = "stable",
        int8_tolerance: float = DEFAULT_INT8_TOLERANCE,
    ) -> None:
        self.apply_fn = apply_fn
        self.route = route
        self.int8_activations = int8_activations
        self.int8_tolerance = int8_tolerance
        self.platform = platform
        self.kernels = kernels
        self.last_plan: Plan | None = None
        self._jitted = jax.jit(self._run, static_argnums=1)
        self._prepared = _PreparedLeaves()

    def __call__(self, params: Any, *args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_compressed)
        if not any(is_compressed(leaf) for leaf in leaves):
            return self.apply_fn(params, *args)
        served = [self._served(leaf) for leaf in leaves]
        if any(s is not leaf for s, leaf in zip(served, leaves, strict=True)):
            params = jax.tree_util.tree_unflatten(treedef, served)
        # Non-array leaves (an equinox module's activation) are static, not jit inputs.
        arrays, rest = split_arrays(params)
        return self._jitted(arrays, _Static(rest), *args)

    def prepare(self, params: Any) -> Any:
        """``params`` with quantized and clustered weights in their serving layout.

        A call on an unprepared tree does this itself (see :func:`accelerate`), once
        per leaf: the serving form of each concrete leaf is kept, by the leaf's
        identity, for as long as the leaf lives, and this method returns those same
        kept forms. Call it yourself to hold only the serving forms (drop the
        original tree), to place them on devices, or before an outer ``jit`` or
        ``jax.export`` that takes the parameters as arguments (traced leaves cannot
        be prepared once).

        It transposes each servable :class:`~jaxcompress.Quantized` /
        :class:`~jaxcompress.Clustered` leaf to the output-major layout the fast
        kernels read (packing 4-bit codes two per byte). Quantized values are
        unchanged: ``materialize`` of a prepared leaf equals the original. A
        clustered leaf whose codebook is evenly spaced becomes exact linear codes
        (:func:`~jaxcompress.arrays.serving.uniform_codebook_as_quantized`). Any
        other clustered leaf is, on CPU with ``int8_activations`` (the default), put
        on an int8 grid (:func:`~jaxcompress.arrays.serving.clustered_on_int8_grid`:
        each weight moves by at most ``max|codebook| / 254``, and it then holds one
        byte per weight) so it can take the integer route, if no output channel
        moves by more than ``int8_tolerance`` (relative L2); otherwise (a channel
        moves further, no int8 activations, or a GPU or TPU platform) its indices
        are kept exactly. A
        traced leaf is converted in the trace, with no int8 grid (exact).

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> fast = jc.accelerate(lambda p, x: x @ p["w"])
            >>> q, _ = jc.quantize(bits=8, axis=-1)({"w": jnp.ones((16, 4))})
            >>> served = fast.prepare(q)
            >>> type(served["w"]).__name__, fast.prepare(q)["w"] is served["w"]
            ('QuantizedMatrix', True)
        """

        def one(leaf: Any) -> Any:
            if not servable(leaf):
                return leaf
            if _unprepared(leaf):
                return self._prepared.get(leaf, self._serving_form)
            return to_serving(leaf)

        return jax.tree.map(one, params, is_leaf=is_compressed)

    def _served(self, leaf: Any) -> Any:
        """A call's view of one leaf: the kept serving form of a concrete servable one."""
        if not isinstance(leaf, Quantized | Clustered):
            return leaf
        kept = self._prepared.kept(leaf)  # the common case: seen before
        if kept is not None:
            return kept
        return self._prepared.get(leaf, self._serving_form) if _unprepared(leaf) else leaf

    def _serving_form(self, leaf: Quantized | Clustered) -> Any:
        if isinstance(leaf, Clustered):
            exact = uniform_codebook_as_quantized(leaf)
            if exact is not None:
                return exact
            if self.int8_activations and self.platform == "cpu":
                grid = clustered_on_int8_grid(leaf)
                # An outlier centroid coarsens the grid for all the others, and every
                # weight of a centroid moves the same way: keep the exact indices
                # (a float route) when any output channel moves too far.
                if channel_error(leaf.materialize(), grid.materialize()) <= self.int8_tolerance:
                    return grid
        return to_serving(leaf)

    def explain(self, params: Any, *args: Any) -> Plan:
        """The route each compressed leaf would take for these inputs (nothing runs).

        Unprepared concrete leaves are prepared first, as a call would (and kept).

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> fast = jc.accelerate(lambda p, x: x @ p["w"])
            >>> lr, _ = jc.low_rank(rank=2)({"w": jnp.ones((64, 64))})
            >>> fast.explain(lr, jnp.ones((3, 64))).routes()
            {'w': 'factored'}
            >>> q, _ = jc.quantize(bits=8, axis=-1)({"w": jnp.ones((64, 64))})
            >>> on_tpu = jc.accelerate(lambda p, x: x @ p["w"], platform="tpu")
            >>> plan = on_tpu.explain(q, jnp.ones((3, 64)))
            >>> plan.platform, plan.decisions[0].leaf, plan.decisions[0].rows
            ('tpu', 'QuantizedMatrix', 3)
        """
        router = self._router()
        arrays, rest = split_arrays(self.prepare(params))
        jax.eval_shape(lambda p, *a: self._evaluate(router, p, rest, *a), arrays, *args)
        return Plan(tuple(router.decisions), router.platform)

    def export(
        self, params: Any, *args: Any, platforms: tuple[str, ...] | None = None
    ) -> jax.export.Exported:
        """The program for ``platforms``, with the prepared parameters as its inputs.

        ``jax.export.export(jax.jit(self), platforms=platforms)`` applied to
        ``prepare(params)`` and ``args`` (arrays or ``jax.ShapeDtypeStruct``): the
        artifact a serving system loads. It runs as ``exported.call(prepared, *args)``
        with ``prepared = self.prepare(params)`` (the kept serving forms: no second
        conversion). ``exported.serialize()`` gives its bytes (compressed leaves are
        registered for it; it needs the ``flatbuffers`` package) and
        ``jax.export.deserialize`` reads them back in any process that imports
        ``jaxcompress``.

        Args:
            params: the compressed parameters (prepared or not), concrete.
            *args: the other inputs of ``apply_fn``, or their shapes and dtypes.
            platforms: the target platforms; by default this object's ``platform``.
                The routes are chosen for ``self.platform`` whatever they are. With
                ``kernels="all"`` the Triton kernels' custom call is let through
                (``jax.export`` gives it no compatibility guarantee: load the
                artifact with the jax version that wrote it).

        Returns:
            The ``jax.export.Exported``.

        Example:
            >>> import jax
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> q, _ = jc.quantize(bits=8, axis=-1)({"w": jnp.ones((16, 4))})
            >>> fast = jc.accelerate(lambda p, x: x @ p["w"], platform="cuda")
            >>> exported = fast.export(q, jax.ShapeDtypeStruct((2, 16), jnp.float32))
            >>> exported.platforms, exported.out_avals
            (('cuda',), (ShapedArray(float32[2,4]),))
        """
        prepared = self.prepare(params)
        if platforms is None:
            platforms = (self.platform,)
        # kernels="all" may take Triton kernels, whose custom call export refuses unless
        # told: such an artifact loads only with the jax version that wrote it.
        checks = []
        if self.kernels == "all":
            checks = [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CUSTOM_CALL)]
        return jax.export.export(jax.jit(self), platforms=platforms, disabled_checks=checks)(
            prepared, *args
        )

    def _router(self) -> _Router:
        return _Router(
            route=self.route,
            int8_activations=self.int8_activations,
            platform=self.platform,
            kernels=self.kernels,
            int8_tolerance=self.int8_tolerance,
        )

    def _run(self, arrays: Any, rest: _Static, *args: Any) -> Any:
        router = self._router()
        out = self._evaluate(router, arrays, rest.tree, *args)
        self.last_plan = Plan(tuple(router.decisions), router.platform)
        if router.opaque:  # once per trace: each input shape compiles once
            left = ", ".join(
                f"{path} (in {', '.join(dict.fromkeys(ops))})"
                for path, ops in router.opaque.items()
            )
            warnings.warn(
                f"accelerate: left dense, as the code they enter runs as written: {left}",
                stacklevel=3,
            )
        return out

    def _evaluate(self, router: _Router, arrays: Any, rest: Any, *args: Any) -> Any:
        """Runs ``apply_fn`` on ``combine(arrays, rest)`` (``arrays``: the array leaves)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(arrays, is_leaf=is_compressed)
        stand_ins = jax.tree.unflatten(treedef, [_abstract(leaf) for _, leaf in flat])
        out_tree = {}
        apply_fn = on_arrays(self.apply_fn, rest)

        def flat_apply(p: Any, *a: Any) -> list[Any]:
            leaves, out_tree["def"] = jax.tree.flatten(apply_fn(p, *a))
            return leaves

        try:
            closed, _ = trace_jaxpr(flat_apply, stand_ins, *_abstract(args))
        except Exception as error:  # any tracing failure: say which leaves were stand-ins
            raise ValueError(_trace_failure(flat, error)) from error
        values = [
            _Weight(path_to_str(path), leaf, np.dtype(leaf.dtype), tuple(range(len(leaf.shape))))
            if is_compressed(leaf)
            else leaf
            for path, leaf in flat
        ]
        outs = evaluate(closed, values + jax.tree.leaves(args), special=_is_weight, rule=router)
        dense = [o.value() if _is_weight(o) else o for o in outs]
        return jax.tree.unflatten(out_tree["def"], dense)


def _trace_failure(flat: list, error: Exception) -> str:
    message = str(error)
    compressed = [(path_to_str(p), tuple(leaf.shape)) for p, leaf in flat if is_compressed(leaf)]
    named = [f"{p} (dense shape {s})" for p, s in compressed if str(s) in message]
    listed = named or [f"{p} (dense shape {s})" for p, s in compressed]
    return (
        "apply_fn could not run with the compressed leaves' dense shapes; check "
        f"{', '.join(listed)}. The error was: {type(error).__name__}: {message}"
    )


def accelerate(
    apply_fn: Callable[..., Any],
    *,
    platform: str | None = None,
    route: str = "auto",
    int8_activations: bool = True,
    kernels: str = "stable",
    int8_tolerance: float = DEFAULT_INT8_TOLERANCE,
) -> Accelerated:
    """``apply_fn(params, *args)`` taking compressed ``params``, with fast kernels.

    The returned callable traces ``apply_fn`` with dense stand-ins (once per input
    shape, under ``jit``) and runs each matrix product or convolution that consumes a
    compressed leaf with the fastest correct kernel for the target ``platform`` and
    batch size; see the module docstring for the routes. ``explain(params, *args)``
    (or ``last_plan`` after a call) says which route each leaf took, and why.

    The routes are chosen for ``platform``, not for the backend that happens to run:
    ``jax.export.export(jax.jit(accelerate(f, platform="tpu")), platforms=("tpu",))``
    builds the TPU program on a CPU machine (``export`` does the same with the
    parameters prepared). On ``"cuda"``, ``"rocm"`` and ``"tpu"`` a product goes to a
    registered kernel family's kernel where it has one
    (:mod:`jaxcompress.runtime.routes`), else to ``dequantize`` (weight-only, the
    decode fused into the product by XLA); activations are never quantized there
    unless ``route="int8"`` forces it.

    Quantized and clustered leaves straight from :func:`~jaxcompress.quantize` or
    :func:`~jaxcompress.cluster` are converted to their serving layout on the first
    call that sees them (``prepare``; the result is the same as preparing first)
    and the serving form is kept, by the leaf's identity, while the leaf lives: later
    calls with the same tree reuse it. Under an outer ``jax.jit`` (or
    ``jax.export``) that takes ``params`` as an argument the leaves are tracers and
    cannot be converted once; they are materialized in the program (exact, slow on
    CPU, and ``explain`` says so): prepare them before, or close over them.

    With no compressed leaf in ``params``, the call is exactly ``apply_fn(params,
    *args)``.

    Inside the model, products in ``jit``, ``remat``, ``custom_jvp`` and
    ``custom_vjp`` bodies take the fast routes (only the forward runs), and so do those
    in a ``shard_map`` body that receives the leaf replicated (its ``in_specs`` entry
    names no mesh axis). A compressed leaf that a ``shard_map`` splits across devices,
    or that enters a ``pallas_call``, control flow (``scan``, ``while``, ``cond``) or
    an ``ffi_call``, is materialized and that code runs as written on the dense
    weight: the result is still that of the materialized model, a warning (once per
    trace) names those leaves, and ``last_plan.dense()`` lists every leaf left dense
    and why.

    Accuracy against ``apply_fn(materialize(params), *args)``: the ``factored``,
    ``blocked`` and ``dequantize`` routes agree to float32 rounding of their sums
    (relative to ``|x| @ |W|``, about 1e-6 of the output's scale). The ``int8`` route
    also rounds each activation row ``x`` to ``x'`` on an int8 grid, which moves each
    product entry by at most ``max|x| / 254 * sum_k |W_kn|``, and checks itself in
    the program: it runs only when every row has ``||x - x'|| <= int8_tolerance *
    ||x||`` (L2 norms, over the product's contracted axes), else the float route
    (``blocked`` or ``dequantize``, as ``int8_activations=False`` would) runs instead,
    chosen by ``lax.cond`` so only one of them runs. ``prepare`` puts a clustered
    codebook on an int8 grid (``W'``) only when each output channel moves by at most
    ``int8_tolerance`` relative: ``||W'_n - W_n|| <= int8_tolerance * ||W_n||``. So,
    by Cauchy-Schwarz on ``x W - x' W' = (x - x') W' + x (W - W')``, every output
    entry is within ``int8_tolerance * ||x|| * (||W'_n|| + ||W_n||)`` of
    ``x @ materialize(W)`` (``int8_tolerance * ||x|| * ||W_n||`` for quantized leaves,
    where ``W' = W``), plus float32 rounding; ``tests/test_accelerate_guard.py`` checks
    it on outlier inputs and ``tests/test_fast_paths_more.py`` the per-entry bound.
    The bound is relative to ``||x||``: an outlier channel that dominates ``||x||``
    hides the rounding of the small ones to the check (a 1000x outlier among 64
    Gaussian values scores 0.008), which is only harmless when the outlier's weights
    carry the output too. Rows of Gaussian values score 0.007-0.012 for 384-4096
    inputs and stay on the integer route at the default 0.02; MiniLM-L6's activations
    score 0.017-0.093, so most of its products take the float route, and its
    k-means 4-bit embeddings keep the cosine of their decoded weights
    (``benchmarks/results/served_fidelity.md``). ``int8_tolerance=math.inf`` turns the
    check off; ``int8_activations=False`` rules the route out.

    Args:
        apply_fn: ``apply_fn(params, *args)``: a linen ``lambda p, x:
            model.apply({"params": p}, x)``, an nnx ``lambda s, x: nnx.merge(g, s)(x)``,
            an equinox ``lambda m, x: jax.vmap(m)(x)`` (the module is ``params``; its
            non-array leaves are static) or any function. Non-array options should be
            bound beforehand.
        platform: the target: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``, as
            ``jax.export`` names them; ``None`` (default) for the running backend
            (:func:`default_platform`).
        route: ``"auto"``, or force one route (``"int8"``, ``"blocked"``,
            ``"dequantize"``, ``"materialize"``) for every quantized or clustered use,
            as the benchmarks do.
        int8_activations: whether the ``int8`` route may quantize activations.
        int8_tolerance: the largest relative L2 error the ``int8`` route may add to an
            activation row (checked in the program; the float route runs otherwise)
            or, through ``prepare``'s int8 grid, to an output channel of a clustered
            weight (default 0.02). ``math.inf`` turns both checks off; ``0`` sends
            every product that rounds anything to the float route.
        kernels: which registered GPU/TPU kernels the router may take: ``"stable"``
            (default) only those whose custom call ``jax.export`` serializes (Mosaic
            TPU, Mosaic GPU), so that ``jax.export.export`` of the program always
            works; ``"all"`` also Triton kernels (float32 activations and codebook
            lookups on ``"cuda"``, everything on ``"rocm"``), which run but export
            only with :func:`jaxcompress.runtime.pallas.export_disabled_checks`.

    Returns:
        An :class:`Accelerated` callable with ``prepare``, ``explain``, ``export``
        and ``last_plan``.

    Raises:
        ValueError: for an unknown platform or route, a negative or NaN
            ``int8_tolerance``, or when ``apply_fn`` cannot run with the compressed
            leaves' shapes (the message names the leaves).
        TypeError: when ``int8_tolerance`` is not a number.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)}
        >>> q, _ = jc.quantize(bits=8, axis=-1)(params)
        >>> fast = jc.accelerate(lambda p, x: jnp.tanh(x @ p["w"]), platform="cpu")
        >>> x = jnp.ones((16, 64))
        >>> y = fast(q, x)  # prepared on this first call, and kept
        >>> fast.last_plan.routes()
        {'w': 'int8'}
        >>> bool(jnp.allclose(y, jnp.tanh(x @ jc.materialize(q)["w"]), atol=0.02))
        True
        >>> on_gpu = jc.accelerate(lambda p, x: x @ p["w"], platform="cuda")
        >>> on_gpu.explain(q, x).routes()["w"] != "int8"  # weight-only on GPUs
        True
    """
    if platform is None:
        platform = default_platform()
    elif platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} (or None), got {platform!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if isinstance(int8_tolerance, bool) or not isinstance(int8_tolerance, int | float):
        raise TypeError(f"int8_tolerance must be a number, got {int8_tolerance!r}")
    if not int8_tolerance >= 0:  # also catches NaN
        raise ValueError(f"int8_tolerance must be >= 0 (or inf), got {int8_tolerance!r}")
    return Accelerated(
        apply_fn,
        route=route,
        int8_activations=int8_activations,
        platform=platform,
        kernels=kernels,
        int8_tolerance=float(int8_tolerance),
    )
