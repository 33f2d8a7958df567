"""Does a model thinned by structured pruning run as much faster as it saves FLOPs?

``prune_units(f, importance="l2")`` removes the fraction ``f`` (25 %, 50 %, 75 %) of
the units of every prunable coupled group (Dense units, conv channels, attention heads
and head dimensions) together with every slice coupled to them, leaving smaller dense
arrays. Four models: the digits MLP (``LeNet300100``, 64 inputs), ``LeNet5`` (8x8x1
inputs), a 4-layer 1024-wide MLP and a pre-LayerNorm transformer block (8 heads, width
512, MLP 512 -> 2048 -> 512, sequence length 64; the residual stream goes through
LayerNorm, so it is left whole by design and heads, head dimensions and MLP hidden units
are what is pruned).

Timed: the jitted dense ``apply_fn(params, x)`` with the original parameters against
the jitted ``stats.apply_fn(thinned, x)``, for batch sizes 1 to 256 (for the
transformer, the batch is the number of sequences). Both sides are float32, compiled
with ``jax.jit`` and warmed up; every call ends with ``block_until_ready``; the dense
call, the three thinned calls and a do-nothing jitted call of one (model, batch) are
interleaved round by round (the order rotating each round), so a change in machine load
hits them alike; the tables give medians. Parameters are each model's random ``init``
(latency does not depend on the values; L2 scores of random weights still choose units).

FLOP ratio: dense / thinned multiply-add FLOPs of ``dot_general`` and convolutions, as
``stats.flops`` counts them, for the program traced at that row's batch size (the
transform is re-run with an example input of that batch; it must choose the same units).
Target (from the issue): speedup >= 0.8 x FLOP ratio.

Reference (not the target): the same architecture built directly in flax at the thinned
sizes ("native") and run on the thinned parameters, timed in the same rounds, to tell a
cost of ``stats.apply_fn``'s re-evaluation from what a model of that size costs here.

Verified computation: for every model and fraction, the thinned output is compared with
the dense model run on ``stats.masked(params)`` (the original shapes with the removed
units zeroed) at batch 8; the table gives the max abs difference.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/structured_speed.py``
(``--quick`` for a smoke run with a few rounds per block; it writes no results).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import command, markdown_table, time_once, write
from flax import linen as nn

from jaxcompress.examples.models import LeNet5, LeNet300100
from jaxcompress.structure.units import prune_units

COMMAND = command(__file__)
FRACTIONS = (0.25, 0.5, 0.75)
BATCHES = (1, 8, 32, 128, 256)
TRANSFORMER_BATCHES = (1, 8, 32, 128, 256)
TARGET = 0.8
CHECK_BATCH = 8
# Per (model, batch): interleaved rounds until SECONDS_PER_BLOCK have passed (and at
# least MIN_ROUNDS rounds), at most MAX_ROUNDS.
SECONDS_PER_BLOCK = 25.0
MIN_ROUNDS = 12
MAX_ROUNDS = 3000
QUICK = {"SECONDS_PER_BLOCK": 0.3, "MIN_ROUNDS": 3, "MAX_ROUNDS": 20}


class Mlp(nn.Module):
    """ReLU MLP: Dense layers ``dense1, dense2, ...`` of ``widths``, then 10 logits."""

    widths: tuple[int, ...]
    head: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"dense{index + 1}")(x))
        return nn.Dense(10, name=self.head)(x)


def Mlp1024() -> Mlp:  # noqa: N802 - reads like the class it builds
    """1024 inputs -> four 1024-wide ReLU layers -> 10 logits."""
    return Mlp(widths=(1024, 1024, 1024, 1024), head="head")


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    # The same ops as jaxcompress.examples.models' LeNet-5 pool.
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


class LeNet5Sized(nn.Module):
    """``jaxcompress.examples.models.LeNet5`` with chosen widths (conv1, conv2, dense1, dense2)."""

    widths: tuple[int, int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c1, c2, d1, d2 = self.widths
        x = _avg_pool_2x2(nn.relu(nn.Conv(c1, (3, 3), padding="SAME", name="conv1")(x)))
        x = _avg_pool_2x2(nn.relu(nn.Conv(c2, (3, 3), padding="SAME", name="conv2")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(d1, name="dense1")(x))
        x = nn.relu(nn.Dense(d2, name="dense2")(x))
        return nn.Dense(10, name="dense3")(x)


def _attention_scaled_as(depth: int) -> Callable:
    """Flax's dot-product attention, scaling logits by 1/sqrt(depth) whatever the head size.

    A thinned model keeps the traced 1/sqrt(64) of the original heads; a flax layer with
    smaller heads would use 1/sqrt(head_dim), so the native reference rescales the query.
    """

    @functools.wraps(nn.dot_product_attention)
    def attention(query: jax.Array, key: jax.Array, value: jax.Array, *args, **kwargs):
        scale = math.sqrt(query.shape[-1] / depth)
        return nn.dot_product_attention(query * scale, key, value, *args, **kwargs)

    return attention


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(LN(x)), then x + MLP(LN(x)) with a gelu MLP.

    The defaults are the benchmarked block (8 heads of 64, width 512, MLP 2048); other
    sizes build the native smaller reference (attention scaled as for heads of 64).
    """

    heads: int = 8
    head_dim: int = 64
    hidden: int = 2048
    native: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.LayerNorm(name="ln1")(x)
        extra = {"attention_fn": _attention_scaled_as(64)} if self.native else {}
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.heads * self.head_dim,
            out_features=width,
            name="attn",
            **extra,
        )(h)
        x = x + h
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(h))
        return x + nn.Dense(width, name="fc2")(h)


def _native_transformer(kept: dict[str, int]) -> nn.Module:
    qk, v = kept["attn/query/kernel[axis 2]"], kept["attn/value/kernel"]
    if qk != v:
        raise ValueError(f"no flax MHA has query/key heads of {qk} and value heads of {v}")
    return TransformerBlock(
        heads=kept["attn/query/kernel[axis 1]"], head_dim=qk, hidden=kept["fc1/kernel"], native=True
    )


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]  # one example, without the batch axis
    batches: tuple[int, ...]
    # kept units by group name -> the same architecture built at those sizes in flax
    native: Callable[[dict[str, int]], nn.Module]

    def input(self, batch: int, seed: int = 0) -> jax.Array:
        key = jax.random.key(1000 * seed + batch)
        return jax.random.normal(key, (batch, *self.input_shape), jnp.float32)


def _kernels(*names: str) -> Callable[[dict[str, int]], tuple[int, ...]]:
    return lambda kept: tuple(kept[f"{name}/kernel"] for name in names)


MODELS = (
    Model(
        "digits MLP (LeNet-300-100)",
        LeNet300100(),
        (64,),
        BATCHES,
        lambda kept: Mlp(widths=_kernels("dense1", "dense2")(kept), head="dense3"),
    ),
    Model(
        "LeNet-5 (8x8x1)",
        LeNet5(),
        (8, 8, 1),
        BATCHES,
        lambda kept: LeNet5Sized(widths=_kernels("conv1", "conv2", "dense1", "dense2")(kept)),
    ),
    Model(
        "MLP 4 x 1024",
        Mlp1024(),
        (1024,),
        BATCHES,
        lambda kept: Mlp(
            widths=_kernels("dense1", "dense2", "dense3", "dense4")(kept), head="head"
        ),
    ),
    Model(
        "transformer block (seq 64, width 512)",
        TransformerBlock(),
        (64, 512),
        TRANSFORMER_BATCHES,
        _native_transformer,
    ),
)


@jax.jit
def floor_call(x: jax.Array) -> jax.Array:
    """A jitted call doing next to nothing: the per-call floor of dispatch and sync."""
    return x[:1] * jnp.float32(2.0)


def _count(tree: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def _same_tree(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.shape(x) == np.shape(y) and bool(np.array_equal(np.asarray(x), np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def measure(calls: dict[Any, tuple[Callable, tuple]], settings: dict) -> dict[Any, dict]:
    """Median and min seconds per call of each entry, interleaved round by round."""
    for fn, args in calls.values():  # compile and warm up
        for _ in range(3):
            time_once(fn, *args)
    names = list(calls)
    samples: dict[Any, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < settings["MAX_ROUNDS"] and (
        rounds < settings["MIN_ROUNDS"]
        or time.perf_counter() - start < settings["SECONDS_PER_BLOCK"]
    ):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = calls[name]
            samples[name].append(time_once(fn, *args))
        rounds += 1
    return {
        name: {"median": float(np.median(t)), "min": float(np.min(t)), "rounds": rounds}
        for name, t in samples.items()
    }


def conv_probe(settings: dict) -> dict[int, float]:
    """Median ms of LeNet-5's first convolution alone (256 x 8 x 8 x 1, 3x3, SAME) by width."""

    @jax.jit
    def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    x = jax.random.normal(jax.random.key(7), (256, 8, 8, 1), jnp.float32)
    calls = {c: (conv, (x, jnp.ones((3, 3, 1, c), jnp.float32))) for c in (6, 3, 2)}
    timing = measure(calls, {**settings, "SECONDS_PER_BLOCK": settings["SECONDS_PER_BLOCK"] / 5})
    return {c: t["median"] * 1e3 for c, t in timing.items()}


def run_model(model: Model, settings: dict) -> tuple[list[dict], list[dict]]:
    """Timing rows and per-fraction facts (groups, params, check) of one model."""
    example = model.input(1)
    params = model.module.init(jax.random.key(0), example)["params"]

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return model.module.apply({"params": p}, x)

    dense_fn = jax.jit(apply)
    pruned: dict[float, tuple[Any, Any, Callable]] = {}
    natives: dict[float, Callable] = {}
    facts = []
    check_x = model.input(CHECK_BATCH, seed=1)
    for fraction in FRACTIONS:
        tx = prune_units(fraction, importance="l2", apply_fn=apply, example_input=example)
        thinned, stats = tx(params)
        thinned_fn = jax.jit(stats.apply_fn)
        got = thinned_fn(thinned, check_x)
        want = dense_fn(stats.masked(params), check_x)
        diff = float(jnp.max(jnp.abs(got - want)))
        scale = float(jnp.max(jnp.abs(want)))
        pruned[fraction] = (thinned, stats, thinned_fn)
        # The same architecture built at the thinned sizes in flax, run on `thinned`: the
        # reference for what a model of this size costs, whoever made it.
        native = model.native({g.name: g.size - g.removed for g in stats.groups})
        natives[fraction] = jax.jit(lambda q, x, native=native: native.apply({"params": q}, x))
        native_diff = float(jnp.max(jnp.abs(natives[fraction](thinned, check_x) - got)))
        facts.append(
            {
                "model": model.name,
                "fraction": fraction,
                "groups": [
                    {"name": g.name, "size": g.size, "removed": g.removed} for g in stats.groups
                ],
                "skipped": dict(stats.skipped),
                "params_dense": _count(params),
                "params_thinned": _count(thinned),
                "flops_example_batch1": list(stats.flops),
                "check_batch": CHECK_BATCH,
                "max_abs_diff_vs_masked_dense": diff,
                "max_abs_output": scale,
                "max_abs_diff_native_vs_thinned": native_diff,
            }
        )
        print(
            f"{model.name} f={fraction}: params {_count(params):,} -> {_count(thinned):,}, "
            f"FLOPs {stats.flops[0]:,} -> {stats.flops[1]:,}, max |thinned - masked| {diff:.2e}, "
            f"max |native - thinned| {native_diff:.2e}",
            flush=True,
        )

    rows = []
    for batch in model.batches:
        x = model.input(batch)
        flop_counts = {}
        for fraction, (thinned, _, _) in pruned.items():
            # The program traced at this batch size; the units chosen must not change.
            tx = prune_units(fraction, importance="l2", apply_fn=apply, example_input=x)
            thinned_b, stats_b = tx(params)
            if not _same_tree(thinned_b, thinned):
                raise RuntimeError(f"{model.name}: batch {batch} chose other units at {fraction}")
            flop_counts[fraction] = stats_b.flops
        calls: dict[Any, tuple[Callable, tuple]] = {
            "dense": (dense_fn, (params, x)),
            "floor": (floor_call, (x,)),
        }
        calls.update({f: (fn, (thinned, x)) for f, (thinned, _, fn) in pruned.items()})
        calls.update({("native", f): (natives[f], (pruned[f][0], x)) for f in FRACTIONS})
        timing = measure(calls, settings)
        for fraction in FRACTIONS:
            dense_flops, thinned_flops = flop_counts[fraction]
            ratio = dense_flops / thinned_flops
            batch1 = pruned[fraction][1].flops
            speedup = timing["dense"]["median"] / timing[fraction]["median"]
            speedup_min = timing["dense"]["min"] / timing[fraction]["min"]
            row = {
                "model": model.name,
                "fraction": fraction,
                "batch": batch,
                "dense_ms": timing["dense"]["median"] * 1e3,
                "thinned_ms": timing[fraction]["median"] * 1e3,
                "dense_min_ms": timing["dense"]["min"] * 1e3,
                "thinned_min_ms": timing[fraction]["min"] * 1e3,
                "floor_ms": timing["floor"]["median"] * 1e3,
                "native_ms": timing[("native", fraction)]["median"] * 1e3,
                "native_min_ms": timing[("native", fraction)]["min"] * 1e3,
                "speedup": speedup,
                "speedup_of_minima": speedup_min,
                "dense_flops": dense_flops,
                "thinned_flops": thinned_flops,
                "flop_ratio": ratio,
                "flop_ratio_equals_batch1": Fraction(dense_flops, thinned_flops)
                == Fraction(batch1[0], batch1[1]),
                "speedup_over_flop_ratio": speedup / ratio,
                "target_met": speedup >= TARGET * ratio,
                "rounds": timing["dense"]["rounds"],
            }
            rows.append(row)
            print(
                f"  batch {batch:>3} f={fraction}: dense {row['dense_ms']:.3f} ms, thinned "
                f"{row['thinned_ms']:.3f} ms, speedup {speedup:.2f}x (min {speedup_min:.2f}x), "
                f"FLOP ratio {ratio:.2f}x -> {'met' if row['target_met'] else 'MISSED'}; "
                f"native flax model at the thinned sizes {row['native_ms']:.3f} ms "
                f"[{row['rounds']} rounds]",
                flush=True,
            )
    return rows, facts


def _groups_text(fact: dict) -> str:
    return ", ".join(f"{g['name']} {g['size']}->{g['size'] - g['removed']}" for g in fact["groups"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds; writes nothing")
    args = parser.parse_args()
    settings = {
        "SECONDS_PER_BLOCK": SECONDS_PER_BLOCK,
        "MIN_ROUNDS": MIN_ROUNDS,
        "MAX_ROUNDS": MAX_ROUNDS,
    }
    if args.quick:
        settings.update(QUICK)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows, facts = [], []
    for model in MODELS:
        model_rows, model_facts = run_model(model, settings)
        rows += model_rows
        facts += model_facts
    probe = conv_probe(settings)
    print("LeNet-5 conv1 alone at batch 256, by output channels (ms):", probe)
    load_after = os.getloadavg()
    wall = time.perf_counter() - started

    misses = [r for r in rows if not r["target_met"]]
    summary = f"Target met in {len(rows) - len(misses)} of {len(rows)} rows."
    print(summary)
    for r in misses:
        print(
            f"  missed: {r['model']} f={r['fraction']} batch {r['batch']}: {r['speedup']:.2f}x "
            f"of a {r['flop_ratio']:.2f}x FLOP ratio"
        )
    print(f"wall time {wall:.0f} s")
    if args.quick:
        return

    batch_independent = all(r["flop_ratio_equals_batch1"] for r in rows)
    headline_batches = (1, 32, 256)
    headline = markdown_table(
        ["model", "removed"] + [f"batch {b}: speedup / FLOP ratio" for b in headline_batches],
        [
            [model.name, f"{fraction:.0%}"]
            + [
                next(
                    (
                        f"{r['speedup']:.2f}x / {r['flop_ratio']:.2f}x"
                        + ("" if r["target_met"] else " (missed)")
                        for r in rows
                        if (r["model"], r["fraction"], r["batch"]) == (model.name, fraction, batch)
                    ),
                    "not run",
                )
                for batch in headline_batches
            ]
            for model in MODELS
            for fraction in FRACTIONS
        ],
    )
    versus_native = [r["thinned_ms"] / r["native_ms"] for r in rows]
    versus_native_min = [r["thinned_min_ms"] / r["native_min_ms"] for r in rows]
    per_model_native = "; ".join(
        f"{model.name}: median {np.median(v):.2f}, {min(v):.2f} to {max(v):.2f}"
        for model in MODELS
        for v in [[r["thinned_ms"] / r["native_ms"] for r in rows if r["model"] == model.name]]
    )
    sections = []
    for model in MODELS:
        model_facts = [f for f in facts if f["model"] == model.name]
        fact_table = markdown_table(
            [
                "removed",
                "groups (units before->after)",
                "params dense -> thinned",
                "FLOPs per example dense -> thinned",
                f"max abs diff thinned vs masked dense (batch {CHECK_BATCH})",
                "max abs diff native vs thinned",
            ],
            [
                [
                    f"{f['fraction']:.0%}",
                    _groups_text(f),
                    f"{f['params_dense']:,} -> {f['params_thinned']:,}",
                    f"{f['flops_example_batch1'][0]:,} -> {f['flops_example_batch1'][1]:,}",
                    f"{f['max_abs_diff_vs_masked_dense']:.1e} (outputs up to "
                    f"{f['max_abs_output']:.1f})",
                    f"{f['max_abs_diff_native_vs_thinned']:.1e}",
                ]
                for f in model_facts
            ],
        )
        skipped = model_facts[0]["skipped"]
        skipped_text = (
            "Left whole: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."
            if skipped
            else "No group left whole."
        )
        timing_table = markdown_table(
            [
                "batch",
                "removed",
                "dense (ms)",
                "thinned (ms)",
                "speedup",
                "speedup of min times",
                "FLOP ratio",
                "speedup / FLOP ratio",
                f"target >= {TARGET}x ratio",
                "native flax model at thinned sizes (ms)",
                "thinned / native time",
            ],
            [
                [
                    r["batch"],
                    f"{r['fraction']:.0%}",
                    f"{r['dense_ms']:.3f}",
                    f"{r['thinned_ms']:.3f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['speedup_of_minima']:.2f}x",
                    f"{r['flop_ratio']:.2f}x",
                    f"{r['speedup_over_flop_ratio']:.2f}",
                    "met" if r["target_met"] else "**missed**",
                    f"{r['native_ms']:.3f}",
                    f"{r['thinned_ms'] / r['native_ms']:.2f}",
                ]
                for r in rows
                if r["model"] == model.name
            ],
        )
        floors = sorted({round(r["floor_ms"], 4) for r in rows if r["model"] == model.name})
        sections.append(
            f"## {model.name}\n\n{skipped_text}\n\n{fact_table}\n\n{timing_table}\n\n"
            f"Do-nothing jitted call (per-call floor) in these blocks: "
            f"{min(floors):.3f} to {max(floors):.3f} ms.\n"
        )
    miss_lines = "\n".join(
        f"- {r['model']}, {r['fraction']:.0%} removed, batch {r['batch']}: {r['speedup']:.2f}x "
        f"against a {r['flop_ratio']:.2f}x FLOP ratio ({r['speedup_over_flop_ratio']:.2f} of it; "
        f"thinned call {r['thinned_ms']:.3f} ms, native flax model of the thinned sizes "
        f"{r['native_ms']:.3f} ms, do-nothing call {r['floor_ms']:.3f} ms)"
        for r in misses
    )
    body = f"""
`prune_units(f, importance="l2")` with a uniform fraction f of every prunable group;
dense `jax.jit(apply_fn)(params, x)` with the original parameters against
`jax.jit(stats.apply_fn)(thinned, x)`, float32. Median ms per call over interleaved
rounds ({SECONDS_PER_BLOCK:.0f} s per (model, batch) block, at least {MIN_ROUNDS} and at
most {MAX_ROUNDS} rounds; the count per row is in the JSON), each call ended by
`block_until_ready`. Random `init` parameters and inputs. Target: speedup >=
{TARGET} x the FLOP ratio (dense / thinned FLOPs of dots and convolutions).

**{summary}**

{headline}

Reference: the same architecture built directly in flax at the thinned sizes and run on
the thinned parameters ("native", its output checked against the thinned model's), so a
miss can be told apart as a cost of `stats.apply_fn`'s re-evaluation or as what a model
of that size costs on this backend. Thinned / native time over all {len(rows)} rows:
median {np.median(versus_native):.2f}, {min(versus_native):.2f} to
{max(versus_native):.2f} ({per_model_native}). On the fastest call of each (min
times): median {np.median(versus_native_min):.2f}, {min(versus_native_min):.2f} to
{max(versus_native_min):.2f}. Calls under about 0.2 ms are dominated by the fixed cost
of a call and by how the runtime schedules them on this loaded machine: their medians
differ by up to 2x between executables whose fastest calls are the same, and from run
to run, so their speedups (and the target verdicts of those rows) are noisy; the
speedup of min times is the steadier figure there.

The FLOP count covers dots and convolutions only. Elementwise work (biases, ReLU, gelu,
softmax, the LeNet-5 pools), the LayerNorms and residual adds on the transformer's
512-wide stream (left whole by design), and the fixed cost of a call (a do-nothing
jitted call is timed in every block) are outside it. LeNet-5's first convolution alone,
at batch 256 (8 x 8 x 1 inputs, 3x3), takes {probe[6]:.3f} ms with 6 output channels,
{probe[3]:.3f} ms with 3 and {probe[2]:.3f} ms with 2 (timed in this run): on this
backend the tiny convolutions do not get cheaper with fewer channels.

FLOP ratio and batch size: the transform was re-run with an example input of each
row's batch size and chose the same units; its FLOP ratio equals the batch-1 ratio
exactly in {"every" if batch_independent else "NOT every"} row (all FLOPs of these
models scale linearly with the batch), so the ratio is batch-independent here.

Wall time {wall:.0f} s. 1-minute load average {load_before[0]:.2f} before and
{load_after[0]:.2f} after the run on {os.cpu_count()} CPUs (the machine is shared with
other processes; interleaving puts both sides under the same load, but absolute times
vary from run to run). The target is judged on medians; the speedup of the fastest call
of each side (min times) is given as well.

{"Missed rows:" if misses else "No row missed the target."}

{miss_lines}

{chr(10).join(sections)}
"""
    path = write(
        "structured_speed",
        title="Structured pruning (prune_units): thinned-model latency against the FLOP "
        "ratio (CPU)",
        command=COMMAND,
        body_markdown=body,
        data={
            "fractions": FRACTIONS,
            "target": TARGET,
            "settings": settings,
            "rows": rows,
            "models": facts,
            "flop_ratio_batch_independent": batch_independent,
            "load_average": [load_before, load_after],
            "wall_s": wall,
            "lenet5_conv1_alone_batch256_ms_by_channels": probe,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
