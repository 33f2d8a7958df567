"""The file subcommands of ``jaxcompress``: compress, inspect and export."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from jaxcompress.arrays import Sparse, as_dense, is_compressed, leaf_nbytes
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
        report = _streamed_report(args.checkpoint, args.output, {})
    else:
        # Leaf by leaf from the file: memory holds about one leaf, never the model. The
        # summary rows are measured as each leaf is done, while both forms are in memory.
        rows: dict[str, LeafReport] = {}
        file_report = _compress_recipe(
            recipe.steps,
            args.checkpoint,
            args.output,
            allow_empty=args.allow_empty,
            entropy=not args.no_entropy,
            on_leaf=lambda path, original, compressed: _measured(rows, path, original, compressed),
        )
        report = _streamed_report(args.checkpoint, args.output, rows)
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


def _measured(rows: dict[str, LeafReport], path: str, original: Any, compressed: Any) -> None:
    """``compress_file``'s ``on_leaf``: the summary row of one array leaf."""
    if is_array_leaf(original):
        rows[path] = _leaf_report(path, original, compressed)


def _streamed_report(checkpoint: str, output: str, measured: dict[str, LeafReport]) -> Report:
    """What ``summarize(read_checkpoint(checkpoint), load(output))`` reports, read leaf by leaf.

    Rows in ``measured`` (taken while compressing) are used as they are; any other
    dense leaf (one kept from an interrupted run) is read with its compressed form
    from ``output`` and compared, so the summary holds one leaf pair, never either model.
    """
    rows = []
    with open_source(checkpoint) as dense:
        entries = flatten_leaves(dense.skeleton)[0]
        if all(entry.path in measured for entry in entries):
            return Report(tuple(measured[entry.path] for entry in entries))
        with open_source(output) as packed:
            markers = {entry.path: entry.leaf for entry in flatten_leaves(packed.skeleton)[0]}
            for entry in entries:
                if entry.path in measured:
                    rows.append(measured[entry.path])
                    continue
                original = dense.load(entry.leaf)
                if is_array_leaf(original):
                    compressed = packed.load(markers[entry.path])
                    rows.append(_leaf_report(entry.path, original, compressed))
                del original
    return Report(tuple(rows))


# Compressed leaves are materialized by their own program: fused into the sums, XLA
# would decode them once per reduction.
_materialized = jax.jit(as_dense)


@jax.jit
def _row_sums(original: Any, approximation: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row ``sum(w**2)``, ``sum((w - w_hat)**2)`` and nonzeros of ``w_hat``.

    Rows (the last axis) are short enough for float32 sums; the caller adds them up in
    float64. One program per leaf shape.
    """
    reference = jnp.asarray(original).astype(jnp.float32)
    width = reference.shape[-1] if reference.ndim else 1
    reference = reference.reshape(-1, max(width, 1))
    approximation = approximation.astype(jnp.float32).reshape(reference.shape)
    return (
        jnp.sum(jnp.square(reference), axis=1),
        jnp.sum(jnp.square(reference - approximation), axis=1),
        jnp.sum(approximation != 0, axis=1, dtype=jnp.int32),
    )


def _leaf_report(path: str, original: Any, compressed: Any) -> LeafReport:
    shape = compressed.shape if is_compressed(compressed) else np.shape(compressed)
    size, dense_size = int(np.size(original)), math.prod(shape)
    if size != dense_size:
        raise ValueError(
            f"{path}: {size} values in the checkpoint, {dense_size} in the compressed file"
        )
    squared = error = 0.0
    nonzero = 0
    if size:
        # A Sparse leaf's kept count differs leaf to leaf: in one program it would
        # compile once per leaf, so it is materialized op by op (programs per shape).
        if isinstance(compressed, Sparse) or not is_compressed(compressed):
            approximation = as_dense(compressed)
        else:
            approximation = _materialized(compressed)
        sums = jax.device_get(_row_sums(original, approximation))
        squared = float(np.sum(sums[0], dtype=np.float64))
        error = float(np.sum(sums[1], dtype=np.float64))
        nonzero = int(np.sum(sums[2], dtype=np.int64))
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
        density=nonzero / size if size else 0.0,
        relative_error=error / norm if norm else (0.0 if error == 0 else float("inf")),
    )


def _compress_recipe(
    steps: list[RecipeStep],
    src: str,
    dst: str,
    *,
    allow_empty: bool,
    entropy: bool,
    on_leaf: Any = None,
) -> Any:
    """:func:`compress_file` with the recipe; an empty step is an error naming its line."""
    transform = steps[0].transform if len(steps) == 1 else chain(*(s.transform for s in steps))
    with step_errors(steps, allow_empty=allow_empty):
        return compress_file(src, dst, transform, progress=True, entropy=entropy, on_leaf=on_leaf)


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
