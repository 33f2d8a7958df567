"""The file subcommands of ``jaxcompress``: compress, inspect and export."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from jaxcompress.arrays import as_dense, is_compressed, leaf_nbytes
from jaxcompress.arrays.tree import is_array_leaf
from jaxcompress.cli.hybrid_compress import (
    compress_in_memory,
    distill_dict,
    distill_table,
    plan_dict,
    plan_table,
)
from jaxcompress.cli.hybrid_recipe import read_recipe
from jaxcompress.cli.options import check_output_path
from jaxcompress.cli.recipes import RecipeStep, step_errors
from jaxcompress.io.compress_file import compress_file
from jaxcompress.io.files import inspect_file, load
from jaxcompress.io.interop import export_dense
from jaxcompress.io.sources import open_source
from jaxcompress.runtime.report import LeafReport, Report
from jaxcompress.transforms.base import chain, flatten_leaves


def _console() -> Console:
    # Piped output gets a wide page so tables stay readable in logs and files.
    console = Console()
    return console if console.is_terminal else Console(width=160)


COMPRESS_HELP = """\
Read a checkpoint, apply a recipe of transforms, and write one compact .jxc file.

CHECKPOINT may be a safetensors file, a flax msgpack checkpoint, an orbax checkpoint
directory, or a .jxc file. The recipe is TOML with one [[transform]] table per step,
applied in order:

  [[transform]]
  kind = "prune"          # prune | quantize | cluster
  sparsity = 0.9
  scope = "global"

  [[transform]]
  kind = "cluster"
  bits = 5
  where = "kernel"        # regex on leaf paths like dense1/kernel (default: kernels)

Every other key is a keyword option of the transform (see help(jaxcompress.prune),
help(jaxcompress.quantize), help(jaxcompress.cluster)). A `where` regex is searched
anywhere in the path ("dense1" also selects dense10/kernel; anchor it as "^dense1/").
A table whose filter selects no leaf is an error naming its line, unless
--allow-empty. The output is written atomically; code streams and masks are
entropy-coded unless --no-entropy.

With a model and unlabeled inputs, the recipe may choose formats under a budget
(jaxcompress.auto, instead of [[transform]] tables) and distill the compressed
model from the dense one (jaxcompress.distill, after either). The checkpoint is
then loaded whole and compressed in memory, not leaf by leaf:

  [model]
  apply = "model:apply"   # apply(params, x) in model.py (recipe folder or cwd)
  data = "inputs.npy"     # .npy/.npz inputs, relative to the recipe
  batch_size = 32

  [auto]
  ratio = 8               # and/or bytes = N; candidates, metric, where

  [distill]
  steps = 200             # loss, learning_rate (Adam), temperature, eval_data
"""

INSPECT_HELP = """\
Show what a .jxc file holds, leaf by leaf: kind, shape, dense bytes, stored bytes,
the entropy bound (the empirical entropy of the code streams and masks as stored,
plus raw float buffers) and how each part is encoded. Every buffer's checksum is
checked, so a damaged file exits with status 2 and a one-line error.
"""

EXPORT_HELP = """\
Materialize every compressed leaf of a .jxc file and write the dense pytree as
safetensors (.safetensors) or a flax msgpack checkpoint (.msgpack), for tools that
know nothing of jaxcompress.
"""


def add_file_commands(commands: argparse._SubParsersAction) -> None:
    """Adds ``compress``, ``inspect`` and ``export`` to the command parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    compress = commands.add_parser(
        "compress",
        help="compress a checkpoint with a TOML recipe into a .jxc file",
        description=COMPRESS_HELP,
        formatter_class=formatter,
    )
    compress.add_argument("checkpoint", help="the checkpoint to read")
    compress.add_argument("--recipe", required=True, help="the TOML recipe of transforms")
    compress.add_argument("-o", "--output", required=True, help="the .jxc file to write")
    compress.add_argument(
        "--no-entropy", action="store_true", help="store codes bit-packed, without rANS coding"
    )
    compress.add_argument(
        "--allow-empty",
        action="store_true",
        help="write the file even when a [[transform]] selects no leaf (it warns instead)",
    )
    compress.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    inspect = commands.add_parser(
        "inspect",
        help="per-leaf table of a .jxc file against its entropy bound",
        description=INSPECT_HELP,
        formatter_class=formatter,
    )
    inspect.add_argument("file", help="the .jxc file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    export = commands.add_parser(
        "export",
        help="write the dense (materialized) weights of a .jxc file",
        description=EXPORT_HELP,
        formatter_class=formatter,
    )
    export.add_argument("file", help="the .jxc file")
    export.add_argument("-o", "--output", required=True, help=".safetensors or .msgpack")
    export.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run_compress(args: argparse.Namespace) -> int:
    """``jaxcompress compress``: checkpoint + recipe -> .jxc, with a summary."""
    recipe = read_recipe(args.recipe)  # recipe errors before any heavy work
    check_output_path(args.output, flag="--output")
    start = time.perf_counter()
    plan = distilled = None
    if recipe.in_memory:
        result = compress_in_memory(
            recipe,
            args.checkpoint,
            args.output,
            allow_empty=args.allow_empty,
            entropy=not args.no_entropy,
            console=Console(stderr=True),  # stdout stays pure JSON with --json
        )
        file_report, plan, distilled = result
    else:
        # Leaf by leaf from the file: memory holds about one leaf, never the model.
        file_report = _compress_recipe(
            recipe.steps,
            args.checkpoint,
            args.output,
            allow_empty=args.allow_empty,
            entropy=not args.no_entropy,
        )
    report = _streamed_report(args.checkpoint, args.output)
    seconds = time.perf_counter() - start
    if args.json:
        result_json: dict[str, Any] = {
            "checkpoint": str(args.checkpoint),
            "output": str(args.output),
            "seconds": seconds,
            "report": report.to_dict(),
            "file": file_report.to_dict(),
        }
        if plan is not None:
            result_json["auto"] = plan_dict(plan)
        if distilled is not None:
            result_json["distill"] = distill_dict(distilled)
        print(json.dumps(result_json))
        return 0
    console = _console()
    if plan is not None:
        console.print(plan_table(plan))
    if distilled is not None:
        console.print(distill_table(distilled))
    console.print(report.table(title=f"{Path(args.checkpoint).name}: compression summary"))
    console.print(file_report.table())
    console.print(
        f"wrote {args.output}: {file_report.file_bytes:,} B, "
        f"{file_report.ratio:.1f}x smaller than dense, in {seconds:.1f} s"
    )
    return 0


def _streamed_report(checkpoint: str, output: str) -> Report:
    """What ``summarize(read_checkpoint(checkpoint), load(output))`` reports, read leaf by leaf.

    Each dense leaf is read with its compressed form from ``output`` and compared in
    chunks, so the summary holds one leaf pair, never either model.
    """
    rows = []
    with open_source(checkpoint) as dense, open_source(output) as packed:
        markers = {entry.path: entry.leaf for entry in flatten_leaves(packed.skeleton)[0]}
        for entry in flatten_leaves(dense.skeleton)[0]:
            original = dense.load(entry.leaf)
            if is_array_leaf(original):
                rows.append(_leaf_report(entry.path, original, packed.load(markers[entry.path])))
            del original
    return Report(tuple(rows))


_CHUNK = 1 << 22  # elements compared at a time: float64 chunks of 32 MiB


def _leaf_report(path: str, original: Any, compressed: Any) -> LeafReport:
    reference = np.asarray(original).reshape(-1)
    approximation = np.asarray(as_dense(compressed)).reshape(-1)
    if reference.size != approximation.size:
        raise ValueError(
            f"{path}: {reference.size} values in the checkpoint, "
            f"{approximation.size} in the compressed file"
        )
    squared = error = 0.0
    nonzero = 0
    for start in range(0, reference.size, _CHUNK):
        r = reference[start : start + _CHUNK].astype(np.float64)
        a = approximation[start : start + _CHUNK].astype(np.float64)
        squared += float(np.dot(r, r))
        error += float(np.dot(r - a, r - a))
        nonzero += int(np.count_nonzero(a))
    norm, error = squared**0.5, error**0.5
    original_bytes, compressed_bytes = leaf_nbytes(original), leaf_nbytes(compressed)
    return LeafReport(
        path=path,
        shape=tuple(np.shape(original)),
        kind=compressed.kind if is_compressed(compressed) else "dense",
        original_bytes=original_bytes,
        compressed_bytes=compressed_bytes,
        ratio=original_bytes / compressed_bytes
        if compressed_bytes
        else (1.0 if original_bytes == 0 else float("inf")),
        density=nonzero / reference.size if reference.size else 0.0,
        relative_error=error / norm if norm else (0.0 if error == 0 else float("inf")),
    )


def _compress_recipe(
    steps: list[RecipeStep], src: str, dst: str, *, allow_empty: bool, entropy: bool
) -> Any:
    """:func:`compress_file` with the recipe; an empty step is an error naming its line."""
    transform = steps[0].transform if len(steps) == 1 else chain(*(s.transform for s in steps))
    with step_errors(steps, allow_empty=allow_empty):
        return compress_file(src, dst, transform, progress=True, entropy=entropy)


def run_inspect(args: argparse.Namespace) -> int:
    """``jaxcompress inspect``: the per-leaf table of a file."""
    report = inspect_file(args.file, verify=True)  # damage anywhere exits non-zero
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        _console().print(report.table())
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``jaxcompress export``: dense weights of a .jxc file for other tools."""
    output = check_output_path(args.output, flag="--output")
    if output.suffix.lower() not in (".safetensors", ".msgpack"):
        raise ValueError(f"--output {args.output!r}: name it .safetensors or .msgpack")
    export_dense(args.output, load(args.file, progress=not args.json))
    size = Path(args.output).stat().st_size
    if args.json:
        print(json.dumps({"output": str(args.output), "bytes": size}))
    else:
        _console().print(f"wrote {args.output}: {size:,} B of dense weights")
    return 0
