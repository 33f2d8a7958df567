"""`jaxcompress compress` on synthetic Llama-shaped bf16 safetensors checkpoints (issue 22).

For each size (``--sizes``, default ``1b``) a random bfloat16 checkpoint in Hugging
Face's sharded layout is written to a temporary directory
(``jaxcompress.examples.decoder.write_checkpoint``), then compressed by the command line,
``jaxcompress compress CHECKPOINT --recipe R -o OUT.jxc``, for each recipe (``--recipes``):

- ``int4``: int4 RTN, groups of 128;
- ``prune+kmeans``: global 50 % magnitude pruning, then 4-bit k-means.

Each command runs in its own process, started from this one (which never imports jax,
so a child does not inherit a large parent's pages); its peak RSS is ``ru_maxrss`` from
``os.wait4``, its wall time is measured around it, and the output size is read from the
file. Sizes whose checkpoint and output do not fit in free disk space are skipped with
a message. There is no peer: the figures are checked against the issue's targets
(peak RSS under 3 GiB, time roughly linear in size).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1b", help="comma-separated presets: 1b,3b,7b")
    parser.add_argument("--recipes", default="int4", help=f"comma-separated: {','.join(RECIPES)}")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    sizes, recipes = args.sizes.split(","), args.recipes.split(",")
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
        for name in recipes:
            recipe = base / f"{name}.toml"
            recipe.write_text(RECIPES[name])
            output = base / f"{size}-{name}.jxc"
            argv = [sys.executable, "-c", _CLI, "compress", str(index), "--recipe", str(recipe)]
            seconds, peak, _ = _run([*argv, "-o", str(output), "--json"])
            size_out = output.stat().st_size
            print(f"  {name}: {seconds:.0f} s, peak RSS {_gib(peak)}, output {_gib(size_out)}")
            rows.append(
                [size, f"{params / 1e9:.2f} B", name, f"{seconds:.0f}", _gib(peak),
                 _gib(dense), _gib(size_out), f"{dense / size_out:.2f}x"]
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
                }
            )
            output.unlink()
        shutil.rmtree(checkpoint)
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    flags = [f"--sizes {args.sizes}", f"--recipes {args.recipes}"]
    body = (
        "`jaxcompress compress` (on `jc.compress_file`: one leaf at a time) on a synthetic "
        "bf16 Llama checkpoint in Hugging Face's sharded safetensors layout. Wall time of "
        "the whole command (including its leaf-by-leaf summary pass), peak RSS from "
        "`os.wait4` of that process. Targets (issue 22): peak RSS under 3 GiB for every "
        "size.\n\n"
        + _common.markdown_table(
            ["size", "params", "recipe", "seconds", "peak RSS", "dense", "output", "ratio"],
            rows,
        )
    )
    path = _common.write(
        "big_checkpoint",
        title="Streaming compression of big checkpoints",
        command=_common.command(__file__, flags),
        body_markdown=body,
        data=data,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
