"""``accelerate`` on a tree straight from ``quantize`` / ``cluster``: no ``prepare`` call.

An MLP of ``--width``-wide float32 layers (random weights scaled by ``1/sqrt(fan_in)``,
ReLU between) is run dense (``jax.jit`` of its apply) and, for int8, int4 and
k-means 4-bit weights, through ``jc.accelerate(apply)`` three ways:

- ``unprepared``: ``fast(compressed, x)``, the tree as the transform returned it (the
  first call prepares each leaf and keeps its serving form; the timed calls reuse it);
- ``prepared``: ``fast(fast.prepare(compressed), x)``;
- ``traced``: ``jax.jit(fast)(compressed, x)``, the leaves traced, hence materialized
  in the program on every call (what an unprepared tree cost before, and what it
  still costs as an outer ``jit``'s argument).

Calls of one batch size are interleaved round by round (the order rotating), median
over rounds, as in ``benchmarks/inference.py``. Target: ``unprepared`` at least as fast as dense at
batch 1, 8 and 64.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/unprepared.py``
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import command, markdown_table, time_once, write

import jaxcompress as jc

COMMAND = command(__file__)
BATCHES = (1, 8, 64)
FORMATS = {
    "int8 per-channel": jc.quantize(bits=8, axis=-1),
    "int4 per-channel": jc.quantize(bits=4, axis=-1),
    "k-means 4-bit": jc.cluster(bits=4),
}


def mlp_params(width: int, layers: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), layers)
    return {
        f"layer_{i}": {
            "kernel": jax.random.normal(keys[i], (width, width), jnp.float32) * width**-0.5,
            "bias": jnp.zeros((width,), jnp.float32),
        }
        for i in range(layers)
    }


def mlp_apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
    count = len(params)
    for i in range(count):
        x = x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
        if i < count - 1:
            x = jax.nn.relu(x)
    return x


def interleaved(calls: dict[str, tuple[Any, tuple]], rounds: int) -> dict[str, float]:
    for fn, args in calls.values():
        time_once(fn, *args)
        time_once(fn, *args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        # The order rotates each round, so no call always runs after the same one.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, args = calls[name]
            samples[name].append(time_once(fn, *args))
    return {name: float(np.median(t)) * 1e3 for name, t in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    params = mlp_params(args.width, args.layers)
    dense = jax.jit(mlp_apply)
    rows = []
    for name, transform in FORMATS.items():
        compressed, _ = transform(params)
        fast = jc.accelerate(mlp_apply)
        traced = jax.jit(jc.accelerate(mlp_apply))
        start = time.perf_counter()
        prepared = jc.accelerate(mlp_apply).prepare(compressed)
        jax.block_until_ready(prepared)
        prepare_ms = (time.perf_counter() - start) * 1e3
        for batch in BATCHES:
            x = jax.random.normal(jax.random.key(batch), (batch, args.width), jnp.float32)
            ms = interleaved(
                {
                    "dense": (dense, (params, x)),
                    "unprepared": (fast, (compressed, x)),
                    "prepared": (fast, (prepared, x)),
                    "traced": (traced, (compressed, x)),
                },
                args.rounds,
            )
            routes = "+".join(sorted(set(fast.explain(compressed, x).routes().values())))
            rows.append(
                {"format": name, "batch": batch, "routes": routes, "prepare_ms": prepare_ms, **ms}
            )
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    table = markdown_table(
        ["format", "batch", "dense ms", "unprepared ms", "prepared ms", "traced ms",
         "unprepared / dense", "routes"],
        [
            [r["format"], r["batch"], f"{r['dense']:.3f}", f"{r['unprepared']:.3f}",
             f"{r['prepared']:.3f}", f"{r['traced']:.3f}",
             f"{r['dense'] / r['unprepared']:.2f}x", r["routes"]]
            for r in rows
        ],
    )  # fmt: skip
    body = (
        f"MLP {args.layers} x {args.width}x{args.width}, float32. Load average "
        f"{load_before[0]:.2f} before and {load_after[0]:.2f} after, on {os.cpu_count()} "
        f"CPUs. The speed column is dense time over unprepared time (above 1: faster "
        f"than dense). The first unprepared call converts each leaf once (the "
        f"`prepare` of the whole tree took {rows[0]['prepare_ms']:.0f} ms for int8); it "
        f"is not in the medians.\n\n{table}"
    )
    path = write(
        args.name or f"unprepared_{jax.default_backend()}",
        title="accelerate on unprepared trees against dense float32",
        command=COMMAND,
        body_markdown=body,
        data={"width": args.width, "layers": args.layers, "rows": rows},
    )
    print(path)


if __name__ == "__main__":
    main()
