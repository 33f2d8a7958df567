"""`jaxcompress compress` on synthetic Llama-shaped bf16 safetensors checkpoints (issue 22).

For each size (``--sizes``, default ``1b``) a random bfloat16 checkpoint in Hugging
Face's sharded layout is written to a temporary directory
(``jaxcompress.examples.decoder.write_checkpoint``), then compressed by the command line,
``jaxcompress compress CHECKPOINT --recipe R -o OUT.jxc``, for each recipe (``--recipes``,
or per size with ``--runs 1b=int4,1b=prune+kmeans,7b=int4``):

- ``int4``: int4 RTN, groups of 128;
- ``prune+kmeans``: global 50 % magnitude pruning, then 4-bit k-means.

Each command runs in its own process, started from this one (which never imports jax,
so a child does not inherit a large parent's pages); its peak RSS is ``ru_maxrss`` from
``os.wait4``, its wall time is measured around it, and the output size is read from the
file. Sizes whose checkpoint and output do not fit in free disk space are skipped with
a message. There is no peer: the figures are checked against the issue's targets
(peak RSS under 3 GiB, 7B int4 in under 20 minutes, time linear in size: the exponent
of seconds ~ parameters**k fitted per recipe over the sizes run, k <= 1.1). The
machine is shared: the 1-minute load average before and after each command is kept.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # puts the repository root on sys.path; imports no jax

RECIPES = {
    "int4": '[[transform]]\nkind = "quantize"\nbits = 4\ngroup_size = 128\n',
    "prune+kmeans": (
        '[[transform]]\nkind = "prune"\nsparsity = 0.5\nscope = "global"\n\n'
        '[[transform]]\nkind = "cluster"\nbits = 4\n'
    ),
}
_WRITE = """
import sys
from jaxcompress.examples.decoder import PRESETS, param_count, write_checkpoint
files = write_checkpoint(sys.argv[1], PRESETS[sys.argv[2]])
print(param_count(PRESETS[sys.argv[2]]))
"""
_CLI = "from jaxcompress.cli.main import main; raise SystemExit(main())"


def _run(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and stdout of one child process."""
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    out = child.stdout.read() if child.stdout is not None else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed with exit status {child.returncode}")
    return seconds, usage.ru_maxrss * 1024, out


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def _fits(runs: list[dict]) -> list[tuple[str, tuple[float, int]]]:
    """Per recipe run at two or more sizes: the least-squares exponent of seconds in params."""
    out = []
    for name in dict.fromkeys(run["recipe"] for run in runs):
        points = [
            (math.log(run["parameters"]), math.log(run["seconds"]))
            for run in runs
            if run["recipe"] == name
        ]
        if len({x for x, _ in points}) < 2:
            continue
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
            (x - mean_x) ** 2 for x, _ in points
        )
        out.append((name, (slope, len(points))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1b", help="comma-separated presets: 1b,3b,7b")
    parser.add_argument("--recipes", default="int4", help=f"comma-separated: {','.join(RECIPES)}")
    parser.add_argument(
        "--runs", default=None, help="size=recipe pairs, e.g. 1b=int4,7b=int4 (for --sizes)"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--name", default="big_checkpoint", help="results file name")
    args = parser.parse_args()
    if args.runs:
        pairs = [run.split("=", 1) for run in args.runs.split(",")]
        sizes = list(dict.fromkeys(size for size, _ in pairs))
        plan = {size: [recipe for s, recipe in pairs if s == size] for size in sizes}
    else:
        sizes = args.sizes.split(",")
        plan = {size: args.recipes.split(",") for size in sizes}
    base = Path(args.dir or tempfile.mkdtemp(prefix="big_checkpoint_"))
    base.mkdir(parents=True, exist_ok=True)
    rows, data = [], []
    for size in sizes:
        checkpoint = base / size
        # bf16 params: about 2.2 GB per billion with the checkpoint and an int4 output.
        need = {"1b": 2.7e9, "3b": 7.5e9, "7b": 16.5e9}.get(size, 0)
        free = shutil.disk_usage(base).free
        if free < need:
            print(f"{size}: skipped, {_gib(free)} free on {base}, needs {_gib(need)}")
            data.append({"size": size, "skipped": f"free {free} B < {need:.0f} B"})
            continue
        seconds, peak, out = _run([sys.executable, "-c", _WRITE, str(checkpoint), size])
        params = int(out.split()[-1])
        index = next(checkpoint.glob("*.safetensors.index.json"), checkpoint / "model.safetensors")
        dense = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        print(f"{size}: {params:,} parameters, {_gib(dense)} written in {seconds:.0f} s")
        for name in plan[size]:
            recipe = base / f"{name}.toml"
            recipe.write_text(RECIPES[name])
            output = base / f"{size}-{name}.jxc"
            argv = [sys.executable, "-c", _CLI, "compress", str(index), "--recipe", str(recipe)]
            load_before = os.getloadavg()[0]
            seconds, peak, _ = _run([*argv, "-o", str(output), "--json"])
            load_after = os.getloadavg()[0]
            size_out = output.stat().st_size
            print(
                f"  {name}: {seconds:.0f} s, peak RSS {_gib(peak)}, output {_gib(size_out)}, "
                f"load {load_before:.1f} -> {load_after:.1f}",
                flush=True,
            )
            rows.append(
                [size, f"{params / 1e9:.2f} B", name, f"{seconds:.0f}", _gib(peak),
                 _gib(dense), _gib(size_out), f"{dense / size_out:.2f}x",
                 f"{load_before:.1f} / {load_after:.1f}"]
            )  # fmt: skip
            data.append(
                {
                    "size": size,
                    "parameters": params,
                    "recipe": name,
                    "seconds": seconds,
                    "peak_rss_bytes": peak,
                    "dense_bytes": dense,
                    "output_bytes": size_out,
                    "load_average_1min": [load_before, load_after],
                }
            )
            output.unlink()
        shutil.rmtree(checkpoint)
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    flags = [f"--runs {args.runs}"] if args.runs else [f"--sizes {args.sizes}"]
    flags += [] if args.runs else [f"--recipes {args.recipes}"]
    fits = _fits([row for row in data if "seconds" in row])
    body = (
        "`jaxcompress compress` (on `jc.compress_file`: one leaf at a time) on a synthetic "
        "bf16 Llama checkpoint in Hugging Face's sharded safetensors layout. Wall time of "
        "the whole command (the summary rows are measured as each leaf is compressed), "
        "peak RSS from `os.wait4` of that process, 1-minute load average before / after "
        "it (2 CPUs, shared: a load above 2 means other work took CPU time from it). "
        "Targets (issue 22): peak RSS under 3 GiB for every size, 7B int4 in under 20 "
        "minutes, time linear in size (fitted exponent at most 1.1).\n\n"
        + _common.markdown_table(
            ["size", "params", "recipe", "seconds", "peak RSS", "dense", "output", "ratio", "load"],
            rows,
        )  # fmt: skip
        + "".join(
            f"\n\n{name}: seconds ~ parameters^{k:.2f} over {n} sizes" for name, (k, n) in fits
        )
    )
    flags += [] if args.name == "big_checkpoint" else [f"--name {args.name}"]
    path = _common.write(
        args.name,
        title="Streaming compression of big checkpoints",
        command=_common.command(__file__, flags),
        body_markdown=body,
        data=data,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
