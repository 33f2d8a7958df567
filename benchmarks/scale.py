"""Scale: 125M, 350M and 1B-parameter pytrees through prune + cluster, save and load.

Synthetic transformer-shaped parameter trees (GPT-2-like: a 50257 x d token embedding,
a position embedding, and per layer a fused qkv (d, 3d), an attention output (d, d),
an MLP up (d, 4d) and down (4d, d) kernel with their biases and two LayerNorms) are
generated in place with ``jax.random`` (no host copy), in float32 and bfloat16, then

    chain(prune(0.5, scope="global"), cluster(bits=4))   -> save -> load

is run on them. Each (size, dtype) runs in a fresh subprocess so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Reported: wall time of
each stage, peak RSS as a multiple of the model's dense bytes (raw, and above the
process's RSS before the model was generated: the Python, jax and XLA runtime),
the file size, and per dtype the fitted exponent ``b`` of ``time = a * params^b``.

Targets on the 2-core, 24 GiB machine: 1B parameters (float32) done in under 5 minutes;
peak RSS below 2.5x the model's bytes; a scaling exponent <= 1.1.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/scale.py``
(``--sizes 125M`` for one size; ``--quick`` runs a 20M tree and writes nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command, markdown_table, write

VOCAB = 50257
POSITIONS = 1024
# name -> (width d, layers)
SIZES = {"20M": (256, 4), "125M": (768, 12), "350M": (1024, 24), "1B": (2048, 18)}
DTYPES = ("float32", "bfloat16")
TARGET_SECONDS_1B = 300.0
TARGET_RSS = 2.5
TARGET_EXPONENT = 1.1


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(size: str, dtype_name: str) -> dict:
    """One (size, dtype) measurement, in this process."""
    import jax
    import jax.numpy as jnp

    import jaxcompress as jc

    baseline_rss = _rss_bytes()
    width, layers = SIZES[size]
    dtype = jnp.dtype(dtype_name)
    key = jax.random.key(0)
    shapes = {"embeddings": {"token": (VOCAB, width), "position": (POSITIONS, width)}}
    for layer in range(layers):
        shapes[f"layer_{layer:02d}"] = {
            "attention": {"qkv": (width, 3 * width), "qkv_bias": (3 * width,)},
            "attention_out": {"kernel": (width, width), "bias": (width,)},
            "mlp_up": {"kernel": (width, 4 * width), "bias": (4 * width,)},
            "mlp_down": {"kernel": (4 * width, width), "bias": (width,)},
            "ln1": {"scale": (width,), "bias": (width,)},
            "ln2": {"scale": (width,), "bias": (width,)},
        }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    start = time.perf_counter()
    # One fused program per shape: the scaled normals are written once, with no
    # leaf-sized temporary (eager ops would hold the unscaled copy too).
    normal = jax.jit(
        lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype), static_argnums=1
    )
    params = jax.tree.unflatten(
        treedef, [normal(jax.random.fold_in(key, i), shape) for i, shape in enumerate(leaves)]
    )
    jax.block_until_ready(params)
    generate_s = time.perf_counter() - start
    count = sum(math.prod(shape) for shape in leaves)
    dense_bytes = count * dtype.itemsize
    after_generate_rss = _rss_bytes()

    tx = jc.chain(jc.prune(0.5, scope="global"), jc.cluster(bits=4))
    start = time.perf_counter()
    compressed, _ = tx(params)
    jax.block_until_ready(compressed)
    compress_s = time.perf_counter() - start
    compress_rss = _rss_bytes()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.jcz"
        start = time.perf_counter()
        jc.save(path, compressed)
        save_s = time.perf_counter() - start
        save_rss = _rss_bytes()
        file_bytes = path.stat().st_size
        del compressed
        start = time.perf_counter()
        loaded = jc.load(path)
        jax.block_until_ready(loaded)
        load_s = time.perf_counter() - start
    peak = _rss_bytes()
    return {
        "size": size,
        "dtype": dtype_name,
        "params": count,
        "dense_bytes": dense_bytes,
        "leaves": len(leaves),
        "generate_s": generate_s,
        "compress_s": compress_s,
        "save_s": save_s,
        "load_s": load_s,
        "total_s": compress_s + save_s + load_s,
        "file_bytes": file_bytes,
        "baseline_rss": baseline_rss,
        "after_generate_rss": after_generate_rss,
        "compress_rss": compress_rss,
        "save_rss": save_rss,
        "peak_rss": peak,
        "rss_multiple": peak / dense_bytes,
        "rss_multiple_above_runtime": (peak - baseline_rss) / dense_bytes,
    }


def exponent(rows: list[dict]) -> float | None:
    """Least-squares slope of log(total time) against log(parameters)."""
    if len(rows) < 2:
        return None
    xs = [math.log(r["params"]) for r in rows]
    ys = [math.log(r["total_s"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def report(rows: list[dict], exponents: dict[str, float | None]) -> str:
    table = []
    for r in rows:
        table.append(
            [
                r["size"],
                r["dtype"],
                f"{r['params'] / 1e6:.0f}M",
                f"{r['dense_bytes'] / 2**30:.2f}",
                f"{r['compress_s']:.1f}",
                f"{r['save_s']:.1f}",
                f"{r['load_s']:.1f}",
                f"{r['total_s']:.1f}",
                f"{r['after_generate_rss'] / r['dense_bytes']:.2f}x",
                f"{r['compress_rss'] / r['dense_bytes']:.2f}x",
                f"{r['peak_rss'] / 2**30:.2f}",
                f"{r['rss_multiple']:.2f}x",
                f"{r['rss_multiple_above_runtime']:.2f}x",
                f"{r['file_bytes'] / 2**20:.1f}",
                f"{r['dense_bytes'] / r['file_bytes']:.1f}x",
            ]
        )
    header = [
        "size",
        "dtype",
        "params",
        "dense GiB",
        "compress s",
        "save s",
        "load s",
        "total s",
        "RSS after generate / dense",
        "peak through compress / dense",
        "peak RSS GiB",
        "peak RSS / dense",
        "(peak - runtime) / dense",
        "file MiB",
        "file ratio",
    ]
    verdicts = []
    big = [r for r in rows if r["size"] == "1B" and r["dtype"] == "float32"]
    if big:
        seconds = big[0]["total_s"]
        met = "met" if seconds < TARGET_SECONDS_1B else "**missed**"
        verdicts.append(
            f"1B float32 in {seconds:.0f} s (compress + save + load; target < "
            f"{TARGET_SECONDS_1B:.0f} s): {met}."
        )
    worst = max(rows, key=lambda r: r["rss_multiple"])
    met = "met" if worst["rss_multiple"] < TARGET_RSS else "**missed**"
    per_row = ", ".join(f"{r['size']} {r['dtype']} {r['rss_multiple']:.2f}x" for r in rows)
    verdicts.append(
        f"Peak RSS: at most {worst['rss_multiple']:.2f}x the dense bytes ({worst['size']} "
        f"{worst['dtype']}; target < {TARGET_RSS}x): {met} ({per_row}); above the runtime's "
        f"own RSS at most {max(r['rss_multiple_above_runtime'] for r in rows):.2f}x."
    )
    for dtype, b in exponents.items():
        if b is not None:
            met = "met" if b <= TARGET_EXPONENT else "**missed**"
            sizes_run = [r["size"] for r in rows if r["dtype"] == dtype]
            caveat = (
                ""
                if "1B" in sizes_run
                else " only (fixed costs such as compilation weigh more at small sizes, "
                "which lowers it)"
            )
            verdicts.append(
                f"Scaling exponent ({dtype}): {b:.2f} (target <= {TARGET_EXPONENT}): {met}, "
                f"fitted on {', '.join(sizes_run)}{caveat}."
            )
    if not big:
        verdicts.append("1B was not run in this invocation: its 5-minute target is not judged.")
    return "\n".join(
        [
            "\n".join(f"- {v}" for v in verdicts),
            "",
            markdown_table(header, table),
            "",
            'Transform: `chain(prune(0.5, scope="global"), cluster(bits=4))` on every '
            "kernel (ndim >= 2, embeddings included), then `save` (rANS entropy coding on) "
            "and `load`. *peak RSS* is the subprocess's `ru_maxrss`; *runtime* is its RSS "
            "after importing jax and jaxcompress, before the model existed. The dense params "
            "stay alive throughout (1x by themselves); *RSS after generate* is the starting "
            "point of compress (runtime, params and the generator's compiled programs). "
            "The chain runs leaf by leaf (global threshold first, then prune and cluster of "
            "one leaf at a time), so no pruned copy of the whole tree exists.",
        ]
    )


def _command(rows: list[dict]) -> str:
    """The command that measures ``rows`` (flags only where they differ from the default)."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    flags = []
    if sizes != ["125M", "350M", "1B"]:
        flags += ["--sizes", *sizes]
    if dtypes != list(DTYPES):
        flags += ["--dtypes", *dtypes]
    return command(__file__, flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["125M", "350M", "1B"], choices=SIZES)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--quick", action="store_true", help="a 20M tree; writes nothing")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--render", action="store_true", help="rewrite the report from results/scale.json"
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    sizes = ["20M"] if args.quick else args.sizes
    rows = []
    if args.render:
        saved = Path(__file__).resolve().parent / "results" / "scale.json"
        rows = json.loads(saved.read_text())["results"]["rows"]
        args.dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    for dtype in [] if args.render else args.dtypes:
        for size in sizes:
            print(f"[{size} {dtype}] running", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, __file__, "--one", size, dtype],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"[{size} {dtype}] compress {row['compress_s']:.1f} s, save {row['save_s']:.1f} s, "
                f"load {row['load_s']:.1f} s, peak RSS {row['rss_multiple']:.2f}x dense",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    exponents = {dtype: exponent([r for r in rows if r["dtype"] == dtype]) for dtype in args.dtypes}
    body = report(rows, exponents)
    if args.quick:
        print(body)
        return
    print(
        write(
            "scale",
            title="Scale: prune + cluster, save and load of 125M to 1B-parameter trees",
            command=_command(rows),
            body_markdown=body,
            data={"rows": rows, "exponents": exponents, "cpu_count": os.cpu_count()},
        )
    )


if __name__ == "__main__":
    main()
