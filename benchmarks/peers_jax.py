"""jaxcompress side by side with Qwix and AQT: inference speed, output error, quantize time.

Every library goes through its own documented model path, in one run:

- **jaxcompress**: ``jc.quantize(...)`` on the params, served by
  ``jc.accelerate(apply_fn)`` after ``prepare``; GPTQ and AWQ take
  ``data=jc.calibrate(apply_fn, params, batches)``.
- **Qwix** (``pip install qwix``): ``qwix.quantize_model(model, qwix.PtqProvider(rules))``
  with ``QuantizationRule``s, weights by ``qwix.quantize_params`` against the
  ``eval_shape`` of the PTQ model's ``init``; GPTQ and AWQ through
  ``qwix.contrib.gptq`` / ``qwix.contrib.awq`` (their calibration providers collect
  ``quant_stats``, then their ``quantize_params``; AWQ serves with
  ``AwqInferenceProvider``).
- **AQT** (``pip install aqtp``, ``aqt.jax.v2``): the same linen ``nn.Dense`` layers
  with ``dot_general_cls=AqtDotGeneral(cfg)``, ``cfg = dot_general_make(lhs_bits=...,
  rhs_bits=...)``; weights frozen by an apply in ``QuantMode.CONVERT`` and served in
  ``QuantMode.SERVE`` (its ``flax_e2e_model`` example's path); groups of 128 by its
  ``tiled_dot_general`` tiling of the contraction axis. AQT has no GPTQ or AWQ.

Sections:

1. **Inference (CPU)**: a linen MLP of ``LAYERS`` ``WIDTH x WIDTH`` Dense layers
   (bias, exact GELU between them), dense ``jax.jit`` of its apply as the baseline,
   at batch 1/8/64/256: int8 weight-only, W8A8 with dynamic per-row activation
   scales, and int4 weight-only (per output channel). Medians of interleaved rounds
   (every library and dense in each round). Plus MiniLM-L6 (the real
   all-MiniLM-L6-v2 weights) int8 weight-only, ours against Qwix, with the cosine of
   mean-pooled embeddings against dense on the 16 sentences of
   ``tests/fixtures/minilm_reference.npz``.
2. **Output error** ``‖X W − X Ŵ‖ / ‖X W‖`` on the plain and outlier layers of
   ``_layers.py``: int4 round-to-nearest per channel and in groups of 128, GPTQ and
   AWQ int4 g128, with each quantization's wall time (calibration included). Every
   library's ``Ŵ`` is read through its own served model: the model applied to the
   identity matrix (weight-only, so the output *is* ``Ŵ``).
3. **Time to quantize** a 4096 x 4096 layer (int8 per channel, int4 g128): cold in a
   fresh subprocess per library (imports done before the clock starts, compilation
   included) and warm (a second weight of the same shape in that process).

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/peers_jax.py``
(``--quick``: 512-wide layers and MLP, GPTQ and AWQ at 128, one timing round, for trying
things; Qwix's GPTQ, which runs op by op, is most of its time).
``pip install -e '.[peers]'`` installs the peers; a peer that does not import is
skipped with a message.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
from _common import markdown_table, time_once, write
from _layers import KINDS, make_layer, relative_output_error
from flax import linen as nn

import jaxcompress as jc

BATCHES = (1, 8, 64, 256)
MINILM_BATCHES = (1, 8, 64)
SEQUENCE = 32
LAYERS = 6
GROUP = 128
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"
PEERS = {"qwix": "qwix", "aqt": "aqtp"}


# ----------------------------------------------------------------------------- setup


def peer_versions() -> dict[str, str | None]:
    """``{peer: version}``, ``None`` for a peer that does not import (with a message)."""
    out: dict[str, str | None] = {}
    for name, dist in PEERS.items():
        try:
            __import__("aqt.jax.v2.flax.aqt_flax" if name == "aqt" else name)
            out[name] = importlib.metadata.version(dist)
        except ImportError as error:
            print(f"[peers] skipping {name}: {error} (pip install '.[peers]')", file=sys.stderr)
            out[name] = None
    return out


class MLP(nn.Module):
    """``layers`` Dense layers of ``width`` (exact GELU between); AQT injects its dot."""

    width: int
    layers: int
    use_bias: bool = True
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):
            x = nn.Dense(
                self.width,
                use_bias=self.use_bias,
                dot_general_cls=self.dot_general_cls,
                name=f"dense_{i}",
            )(x)
            if i < self.layers - 1:
                x = nn.gelu(x, approximate=False)
        return x


def log(message: str) -> None:
    print(f"[peers_jax] {message}", file=sys.stderr, flush=True)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- ours


def ours_quantize(params: Any, *, bits: int, group: int | None = None) -> Any:
    return jc.quantize(bits, group_size=group)(params)[0]


def ours_served(apply_fn: Callable, qparams: Any, *, int8_activations: bool):
    fast = jc.accelerate(apply_fn, int8_activations=int8_activations)
    return jax.jit(fast), fast.prepare(qparams)


# ----------------------------------------------------------------------------- Qwix


def qwix_rule(*, bits: int, group: int | None = None, act: bool = False, cls: Any = None):
    import qwix

    cls = cls or qwix.QuantizationRule
    return cls(
        module_path=".*",
        weight_qtype=f"int{bits}",
        act_qtype="int8" if act else None,
        tile_size=group,
    )


def qwix_ptq(model: nn.Module, params: Any, example: tuple, rule: Any):
    """Qwix's PTQ: the intercepted model and its ``quantize_params`` weights."""
    import qwix

    ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), *example)
    return ptq_model, qwix.quantize_params(params, abstract["params"])


def qwix_served(model: nn.Module, params: Any, example: tuple, rule: Any):
    ptq_model, qparams = qwix_ptq(model, params, example, rule)
    return jax.jit(lambda p, *a: ptq_model.apply({"params": p}, *a)), qparams


def qwix_calibrated(kind: str, model: nn.Module, params: Any, batches: list, rule: Any):
    """Qwix GPTQ or AWQ: calibration provider, then the method's ``quantize_params``."""
    import qwix
    from qwix.contrib import awq, gptq

    method = gptq if kind == "gptq" else awq
    provider = (
        gptq.GptqCalibrationProvider([rule])
        if kind == "gptq"
        else awq.AwqCalibrationProvider([rule])
    )
    cal_model = qwix.quantize_model(model, provider)
    variables: dict[str, Any] = {"params": params}
    for batch in batches:
        _, new = cal_model.apply(variables, batch, mutable="quant_stats")
        variables.update(new)
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), batches[0])
    qparams = method.quantize_params(params, abstract["params"], variables["quant_stats"])
    serve = (
        ptq_model
        if kind == "gptq"
        else qwix.quantize_model(model, awq.AwqInferenceProvider([rule]))
    )
    return serve, qparams


# ----------------------------------------------------------------------------- AQT


def aqt_dot(*, bits: int, act: bool, mode: str, group: int | None = None):
    """AQT's ``AqtDotGeneral`` for a Dense: int ``bits`` weights, int8 activations if ``act``."""
    from aqt.jax.v2 import aqt_dot_general, tiled_dot_general
    from aqt.jax.v2 import utils as aqt_utils
    from aqt.jax.v2.flax import aqt_flax

    cfg = aqt_dot_general.dot_general_make(lhs_bits=8 if act else None, rhs_bits=bits)
    tiling = None
    if group is not None:
        tile = tiled_dot_general.AxisTiling
        tiling = tiled_dot_general.Cfg(
            lhs=tiled_dot_general.TensorTiling(
                contraction_axes=[tile(axis=1, tile_size=group)], remaining_axes=[]
            ),
            rhs=tiled_dot_general.TensorTiling(
                contraction_axes=[tile(axis=0, tile_size=group)], remaining_axes=[]
            ),
        )
    return functools.partial(
        aqt_flax.AqtDotGeneral,
        cfg,
        lhs_quant_mode=aqt_utils.QuantMode.TRAIN,  # activations: dynamic, per call
        rhs_quant_mode=getattr(aqt_utils.QuantMode, mode),
        lhs_freeze_mode=aqt_flax.FreezerMode.NONE,
        rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
        tiling_cfg=tiling,
        use_legacy_freezer=False,
    )


_AQT_CONVERT: dict[tuple, Callable] = {}


def aqt_convert(model: nn.Module, params: Any, example: jax.Array, **dot: Any):
    """AQT's freezing step: an apply in CONVERT mode; returns the SERVE model and variables.

    The jitted CONVERT apply is built once per model shape and settings, as a user
    converting many checkpoints of one model would keep it.
    """
    key = (model.width, model.layers, model.use_bias, tuple(sorted(dot.items())))
    if key not in _AQT_CONVERT:
        convert = model.clone(dot_general_cls=aqt_dot(mode="CONVERT", **dot))
        # AQT draws a key for stochastic rounding even when it is off (its example passes one).
        rngs = {"params": jax.random.key(0)}
        _AQT_CONVERT[key] = jax.jit(
            lambda p, x: convert.apply({"params": p}, x, rngs=rngs, mutable=True)[1]
        )
    frozen = _AQT_CONVERT[key](params, example)
    return model.clone(dot_general_cls=aqt_dot(mode="SERVE", **dot)), frozen


def aqt_served(model: nn.Module, params: Any, example: jax.Array, **dot: Any):
    serve, frozen = aqt_convert(model, params, example, **dot)
    return jax.jit(lambda v, x: serve.apply(v, x, rngs={"params": jax.random.key(0)})), frozen


# ----------------------------------------------------------------------------- 1. speed


def interleaved(calls: dict[str, tuple[Callable, tuple]], *, seconds: float, rounds: int):
    for fn, args in calls.values():
        time_once(fn, *args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - start < seconds and done < 50):
        for name, (fn, args) in calls.items():
            samples[name].append(time_once(fn, *args))
        done += 1
    return {name: float(np.median(t)) for name, t in samples.items()}


SPEED_FORMATS = {
    "int8 weight-only": {"bits": 8, "act": False},
    "W8A8 dynamic": {"bits": 8, "act": True},
    "int4 weight-only": {"bits": 4, "act": False},
}


def mlp_speed(width: int, versions: dict, *, seconds: float, rounds: int) -> list[dict]:
    model = MLP(width, LAYERS)
    example = jnp.zeros((1, width), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), example)["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    log(f"MLP {LAYERS} x {width}^2, {count / 1e6:.1f}M params")

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    served: dict[tuple[str, str], tuple[Callable, Any]] = {}
    for fmt, opts in SPEED_FORMATS.items():
        q = ours_quantize(params, bits=opts["bits"])
        served[("jaxcompress", fmt)] = ours_served(apply_fn, q, int8_activations=opts["act"])
        if versions["qwix"]:
            rule = qwix_rule(bits=opts["bits"], act=opts["act"])
            served[("qwix", fmt)] = qwix_served(model, params, (example,), rule)
        if versions["aqt"]:
            served[("aqt", fmt)] = aqt_served(model, params, example, **opts)
    dense = jax.jit(apply_fn)
    rows = []
    probe = jax.random.normal(jax.random.key(1), (64, width), jnp.float32)
    reference = np.asarray(dense(params, probe), np.float64)
    errors = {
        key: float(
            np.linalg.norm(np.asarray(fn(p, probe), np.float64) - reference)
            / np.linalg.norm(reference)
        )
        for key, (fn, p) in served.items()
    }
    for batch in BATCHES:
        x = jax.random.normal(jax.random.key(batch), (batch, width), jnp.float32)
        calls = {("dense", ""): (dense, (params, x))}
        calls.update({key: (fn, (p, x)) for key, (fn, p) in served.items()})
        medians = interleaved(calls, seconds=seconds, rounds=rounds)
        base = medians[("dense", "")]
        log(f"MLP batch {batch}: dense {base * 1e3:.1f} ms")
        for (lib, fmt), t in medians.items():
            if lib == "dense":
                continue
            rows.append(
                {
                    "model": f"MLP {LAYERS}x{width}",
                    "format": fmt,
                    "batch": batch,
                    "library": lib,
                    "ms": t * 1e3,
                    "dense_ms": base * 1e3,
                    "speedup": base / t,
                    "relative_error": errors[(lib, fmt)],
                }
            )
    return rows


def minilm_speed(versions: dict, *, seconds: float, rounds: int) -> tuple[list[dict], str]:
    from jaxcompress.examples.minilm import MiniLMEncoder, encode, load_minilm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unused pooler is named in a warning
            params, config = load_minilm(None, dtype=jnp.float32)
    except ImportError as error:
        return [], f"MiniLM skipped: {error}"
    model = MiniLMEncoder(config)

    def apply_fn(p, ids, mask):
        return model.apply({"params": p}, ids, mask)

    fixture = np.load(FIXTURE)
    ids, mask = jnp.asarray(fixture["input_ids"]), jnp.asarray(fixture["attention_mask"])
    dense_embeddings = encode(params, ids, mask, config=config)

    def cosine(fn, tree):
        hidden = fn(tree, ids, mask)
        w = mask.astype(jnp.float32)[:, :, None]
        mean = (hidden * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)
        mean = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
        return float(jnp.sum(mean * dense_embeddings, axis=-1).mean())

    where = r"layer_\d+/.*/kernel"
    q = jc.quantize(8, where=where)(params)[0]
    served = {"jaxcompress": ours_served(apply_fn, q, int8_activations=False)}
    note = ""
    if versions["qwix"]:
        try:
            import qwix

            rule = qwix.QuantizationRule(
                module_path=r"layer_\d+/.*", weight_qtype="int8", op_names=("dot_general",)
            )
            served["qwix"] = qwix_served(model, params, (ids, mask), rule)
            cosine(*served["qwix"])
        except Exception as error:  # noqa: BLE001 - recorded: why Qwix cannot run it
            served.pop("qwix", None)
            note = f"Qwix could not run MiniLM: {type(error).__name__}: {error}"
            log(note)
    cosines = {lib: cosine(fn, p) for lib, (fn, p) in served.items()}
    dense = jax.jit(apply_fn)
    rows = []
    for batch in MINILM_BATCHES:
        rng = np.random.default_rng(batch)
        tokens = jnp.asarray(rng.integers(1000, config.vocab_size, (batch, SEQUENCE), np.int32))
        ones = jnp.ones((batch, SEQUENCE), jnp.int32)
        calls = {"dense": (dense, (params, tokens, ones))}
        calls.update({lib: (fn, (p, tokens, ones)) for lib, (fn, p) in served.items()})
        medians = interleaved(calls, seconds=seconds, rounds=rounds)
        for lib, t in medians.items():
            if lib != "dense":
                rows.append(
                    {
                        "model": "MiniLM-L6",
                        "format": "int8 weight-only",
                        "batch": batch,
                        "library": lib,
                        "ms": t * 1e3,
                        "dense_ms": medians["dense"] * 1e3,
                        "speedup": medians["dense"] / t,
                        "cosine_mean": cosines[lib],
                    }
                )
    return rows, note


# ----------------------------------------------------------------------------- 2. error


ERROR_METHODS = ("rtn per-channel", "rtn g128", "gptq g128", "awq g128")


def error_rows(n: int, calibrated_n: int, versions: dict) -> list[dict]:
    rows = []
    for kind in KINDS:
        for method in ERROR_METHODS:
            size = calibrated_n if method.startswith(("gptq", "awq")) else n
            # Twice as many calibration rows as inputs: the Gram then has full rank, as
            # with real calibration sets, and GPTQ cannot fit the calibration rows alone.
            layer = make_layer(kind, n=size, calibration_rows=2 * size)
            rows += _error_one(layer, method, versions)
    return rows


def _error_one(layer: Any, method: str, versions: dict) -> list[dict]:
    n = layer.kernel.shape[0]
    model = MLP(n, 1, use_bias=False)
    params = {"dense_0": {"kernel": jnp.asarray(layer.kernel)}}
    batches = [jnp.asarray(b) for b in np.split(layer.calibration, 4)]
    eye = jnp.eye(n, dtype=jnp.float32)
    group = None if method == "rtn per-channel" else GROUP
    algorithm = method.split()[0]
    out = []

    def record(lib: str, settings: str, restored: Any, seconds: float) -> None:
        error = relative_output_error(layer, np.asarray(restored))
        out.append(
            {
                "layer": layer.kind,
                "n": n,
                "method": method,
                "library": lib,
                "settings": settings,
                "relative_output_error": error,
                "seconds": seconds,
            }
        )
        log(f"{layer.kind} n={n} {method} {lib}: {error:.4f} in {seconds:.1f} s")

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    # ours
    def ours():
        data = None if algorithm == "rtn" else jc.calibrate(apply_fn, params, batches)
        tx = jc.quantize(4, group_size=group, method=algorithm)
        return tx(params, data=data)[0]

    q, seconds = timed(ours)
    record(
        "jaxcompress",
        f"quantize(4, group_size={group}, method={algorithm!r})",
        jc.materialize(q)["dense_0"]["kernel"],
        seconds,
    )
    if versions["qwix"]:
        from qwix.contrib import awq, gptq

        if algorithm == "rtn":
            rule = qwix_rule(bits=4, group=group)
            (ptq_model, qp), seconds = timed(lambda: qwix_ptq(model, params, (eye[:1],), rule))
            settings = f"QuantizationRule(weight_qtype='int4', tile_size={group}), absmax"
        else:
            cls = gptq.GptqRule if algorithm == "gptq" else awq.AwqRule
            rule = qwix_rule(bits=4, group=group, cls=cls)
            (ptq_model, qp), seconds = timed(
                lambda: qwix_calibrated(algorithm, model, params, batches, rule)
            )
            settings = f"{cls.__name__}(weight_qtype='int4', tile_size={group}), " + (
                "block 128, damping 0.01" if algorithm == "gptq" else "n_grid 20"
            )
        restored = jax.jit(lambda p, x: ptq_model.apply({"params": p}, x))(qp, eye)
        record("qwix", settings, restored, seconds)
    if versions["aqt"] and algorithm == "rtn":
        dot = {"bits": 4, "act": False, "group": group}
        (serve, frozen), seconds = timed(lambda: aqt_convert(model, params, eye[:1], **dot))
        restored = jax.jit(lambda v, x: serve.apply(v, x, rngs={"params": jax.random.key(0)}))(
            frozen, eye
        )
        record("aqt", f"dot_general_make(rhs_bits=4), tile {group}", restored, seconds)
    return out


# ----------------------------------------------------------------------------- 3. time


def cold_child(lib: str, bits: int, n: int) -> None:
    """In a fresh process: quantize one ``(n, n)`` Dense kernel twice; print the seconds."""
    group = None if bits == 8 else GROUP
    model = MLP(n, 1, use_bias=False)
    weights = [
        {
            "dense_0": {
                "kernel": jnp.asarray(np.random.default_rng(s).standard_normal((n, n)), jnp.float32)
            }
        }
        for s in (0, 1)
    ]
    example = jnp.zeros((1, n), jnp.float32)
    if lib == "jaxcompress":

        def run(p):
            return jc.quantize(bits, group_size=group)(p)[0]
    elif lib == "qwix":
        import qwix  # noqa: F401 - import excluded from the clock

        def run(p):
            return qwix_ptq(model, p, (example,), qwix_rule(bits=bits, group=group))[1]
    else:
        import aqt.jax.v2.flax.aqt_flax  # noqa: F401 - import excluded from the clock

        def run(p):
            return aqt_convert(model, p, example, bits=bits, act=False, group=group)[1]

    block(weights)
    _, cold = timed(lambda: run(weights[0]))
    _, warm = timed(lambda: run(weights[1]))
    print(json.dumps({"cold": cold, "warm": warm}))


def quantize_times(n: int, versions: dict) -> list[dict]:
    rows = []
    for bits in (8, 4):
        for lib in ("jaxcompress", *[p for p, v in versions.items() if v]):
            result = subprocess.run(
                [sys.executable, __file__, "--cold-child", lib, str(bits), str(n)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                log(f"cold {lib} int{bits} failed: {result.stderr[-2000:]}")
                continue
            times = json.loads(result.stdout.strip().splitlines()[-1])
            fmt = "int8 per-channel" if bits == 8 else f"int4 g{GROUP}"
            rows.append({"format": fmt, "n": n, "library": lib, **times})
            log(f"quantize {fmt} {lib}: cold {times['cold']:.2f} s, warm {times['warm']:.2f} s")
    return rows


# ----------------------------------------------------------------------------- report


LIBS = ("jaxcompress", "qwix", "aqt")
NOTE_CALIBRATION = (
    "Each layer has 2n calibration rows, more than its n input features, so the Gram has "
    "full rank. With fewer rows than inputs (an earlier run used 512 rows at n = 2048) "
    "GPTQ's error feedback fits the calibration rows, and its held-out error came out "
    "above round-to-nearest for every library alike."
)
NOTE_LOAD = (
    "The timings share the machine's CPUs with other jobs: every library and dense run "
    "in the same interleaved rounds, so the ratios are side by side, but a single cell "
    "(one batch size) can be moved by load that changed between batch sizes."
)


def _best(values: dict[str, float], lower: bool) -> str:
    if len(values) < 2:
        return ""
    pick = min if lower else max
    return pick(values, key=values.get)


def report(speed, minilm, minilm_note, errors, times, versions, args) -> str:
    parts = []
    header = ["model", "format", "batch", "dense ms", *LIBS, "fastest"]
    table = []
    keyed: dict[tuple, dict[str, float]] = {}
    dense_ms: dict[tuple, float] = {}
    for r in speed + minilm:
        key = (r["model"], r["format"], r["batch"])
        keyed.setdefault(key, {})[r["library"]] = r["speedup"]
        dense_ms[key] = r["dense_ms"]
    for key, by_lib in keyed.items():
        cells = [f"{by_lib[lib]:.2f}x" if lib in by_lib else "—" for lib in LIBS]
        table.append([*key, f"{dense_ms[key]:.1f}", *cells, _best(by_lib, lower=False)])
    parts += [
        "## 1. Inference on CPU: speed relative to dense `jax.jit` (higher is better)",
        "",
        f"MLP: {LAYERS} linen `nn.Dense` layers of {args.width} x {args.width} with bias, "
        "exact GELU between, float32 "
        f"({LAYERS * (args.width**2 + args.width) / 1e6:.1f}M parameters). "
        "Median of interleaved rounds; each cell is dense time / library time.",
        "",
        "Settings: ours `jc.quantize(bits)` (per output channel) + `jc.accelerate(apply, "
        "int8_activations=False)` for weight-only, `int8_activations=True` (auto route) "
        "for W8A8. Qwix `PtqProvider([QuantizationRule(weight_qtype='int8'|'int4', "
        "act_qtype=None|'int8')])` (dynamic-range activations on XLA). AQT "
        "`dot_general_make(lhs_bits=None|8, rhs_bits=8|4)`, weights frozen in CONVERT, "
        "served in SERVE mode, activations dynamic (TRAIN mode).",
        "",
        markdown_table(header, table),
        "",
        NOTE_LOAD,
        "",
    ]
    err_rows = {}
    for r in speed:
        err_rows.setdefault((r["format"],), {})[r["library"]] = r["relative_error"]
    parts += [
        "Relative output error of the MLP against dense at batch 64:",
        "",
        markdown_table(
            ["format", *LIBS],
            [
                [fmt, *[f"{v[lib]:.4f}" if lib in v else "—" for lib in LIBS]]
                for (fmt,), v in err_rows.items()
            ],
        ),
        "",
    ]
    if minilm:
        cos = {r["library"]: r["cosine_mean"] for r in minilm}
        parts.append(
            "MiniLM-L6 int8 weight-only (36 encoder matrices; sequences of "
            f"{SEQUENCE} tokens): mean cosine to dense embeddings "
            + ", ".join(f"{lib} {c:.5f}" for lib, c in cos.items())
            + ". Qwix rule: `QuantizationRule(module_path=r'layer_\\d+/.*', "
            "weight_qtype='int8', op_names=('dot_general',))`."
        )
    if minilm_note:
        parts.append(minilm_note)
    parts.append("")

    header = [
        "layer",
        "n",
        "method",
        *[f"{lib} error" for lib in LIBS],
        *[f"{lib} s" for lib in LIBS],
        "best error",
    ]
    grouped: dict[tuple, dict[str, dict]] = {}
    for r in errors:
        grouped.setdefault((r["layer"], r["n"], r["method"]), {})[r["library"]] = r
    table = []
    for key, by_lib in grouped.items():
        errs = {lib: r["relative_output_error"] for lib, r in by_lib.items()}
        table.append(
            [
                *key,
                *[f"{errs[lib]:.4f}" if lib in errs else "—" for lib in LIBS],
                *[f"{by_lib[lib]['seconds']:.1f}" if lib in by_lib else "—" for lib in LIBS],
                _best(errs, lower=True),
            ]
        )
    settings = sorted({(r["library"], r["method"], r["settings"]) for r in errors})
    parts += [
        "## 2. Output error ‖XW − XŴ‖/‖XW‖ on held-out inputs (lower is better), int4",
        "",
        "Layers from `benchmarks/_layers.py` (2n calibration rows in 4 batches, "
        "512 held-out rows). Seconds: the quantization's wall time, calibration included, "
        "compilation included (each library's first layer, plain, pays it; the outlier "
        "layer, of the same shapes, reuses what its library cached). Ŵ is read by "
        "applying each library's served model to "
        "the identity. AQT has no GPTQ or AWQ.",
        "",
    ]
    if args.calibrated_n != args.n:
        parts += [
            f"GPTQ and AWQ rows are at n={args.calibrated_n} (Qwix's GPTQ at 4096 took "
            "about 640 s in an earlier measurement, which would push the run past 25 min); "
            f"round-to-nearest rows at n={args.n}.",
            "",
        ]
    parts += [
        markdown_table(header, table),
        "",
        NOTE_CALIBRATION,
        "",
        "Settings per library and method:",
        "",
        *[f"- {lib}, {method}: `{s}`" for lib, method, s in settings],
        "",
    ]
    table = []
    by_fmt: dict[str, dict[str, dict]] = {}
    for r in times:
        by_fmt.setdefault(r["format"], {})[r["library"]] = r
    for fmt, by_lib in by_fmt.items():
        for phase in ("cold", "warm"):
            vals = {lib: r[phase] for lib, r in by_lib.items()}
            table.append(
                [
                    fmt,
                    phase,
                    *[f"{vals[lib]:.2f}" if lib in vals else "—" for lib in LIBS],
                    _best(vals, lower=True),
                ]
            )
    parts += [
        f"## 3. Time to quantize one {args.time_n} x {args.time_n} Dense kernel (seconds)",
        "",
        "Cold: a fresh subprocess per library, imports done before the clock starts, "
        "compilation included. Warm: a second weight of the same shape in that process. "
        "Ours: `jc.quantize(bits, group_size=g)(params)`; Qwix: `quantize_model` + "
        "`eval_shape(init)` + `quantize_params`; AQT: the jitted CONVERT-mode apply.",
        "",
        markdown_table(["format", "phase", *LIBS, "fastest"], table),
        "",
        "Peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()) + ".",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512-wide layers, one round")
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "error", "time"))
    parser.add_argument("--cold-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--calibrated-n",
        type=int,
        default=None,
        help="layer width for the GPTQ/AWQ rows (default: 2048; --quick 128)",
    )
    args = parser.parse_args()
    if args.cold_child:
        lib, bits, n = args.cold_child
        cold_child(lib, int(bits), int(n))
        return
    args.n = args.width = args.time_n = 512 if args.quick else 4096
    if args.calibrated_n is None:
        args.calibrated_n = 128 if args.quick else 2048
    seconds, rounds = (0.0, 1) if args.quick else (8.0, 5)
    versions = peer_versions()
    speed, minilm, note, errors, times = [], [], "", [], []
    if "speed" not in args.skip:
        speed = mlp_speed(args.width, versions, seconds=seconds, rounds=rounds)
        minilm, note = minilm_speed(versions, seconds=seconds, rounds=rounds)
    if "error" not in args.skip:
        errors = error_rows(args.n, args.calibrated_n, versions)
    if "time" not in args.skip:
        times = quantize_times(args.time_n, versions)
    flags = sys.argv[1:]
    body = report(speed, minilm, note, errors, times, versions, args)
    name = "peers_jax_quick" if args.quick else "peers_jax"
    path = write(
        name,
        title="jaxcompress vs Qwix and AQT (JAX quantization libraries), side by side",
        command=_common.command(__file__, flags),
        body_markdown=body,
        data={
            "peers": versions,
            "speed": speed,
            "minilm": minilm,
            "minilm_note": note,
            "output_error": errors,
            "quantize_time": times,
        },
    )
    print(body)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
