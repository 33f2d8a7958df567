"""The file subcommands of ``jaxcompress``: compress, inspect and export."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console

from jaxcompress.cli.options import check_output_path
from jaxcompress.cli.recipes import RecipeError, RecipeStep, read_recipe_steps
from jaxcompress.io.compress_file import compress_file
from jaxcompress.io.files import inspect_file, load
from jaxcompress.io.interop import export_dense
from jaxcompress.io.sources import open_source
from jaxcompress.runtime.report import summarize
from jaxcompress.transforms.base import chain
from jaxcompress.transforms.filters import NothingSelectedWarning, describe


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
    steps = read_recipe_steps(args.recipe)  # recipe errors before any heavy work
    check_output_path(args.output, flag="--output")
    start = time.perf_counter()
    # Leaf by leaf from the file: memory holds about one leaf, never the model.
    file_report = _compress_recipe(
        steps,
        args.checkpoint,
        args.output,
        allow_empty=args.allow_empty,
        entropy=not args.no_entropy,
    )
    report = summarize(_dense_shapes(args.checkpoint), load(args.output))
    seconds = time.perf_counter() - start
    if args.json:
        result = {
            "checkpoint": str(args.checkpoint),
            "output": str(args.output),
            "seconds": seconds,
            "report": report.to_dict(),
            "file": file_report.to_dict(),
        }
        print(json.dumps(result))
        return 0
    console = _console()
    console.print(report.table(title=f"{Path(args.checkpoint).name}: compression summary"))
    console.print(file_report.table())
    console.print(
        f"wrote {args.output}: {file_report.file_bytes:,} B, "
        f"{file_report.ratio:.1f}x smaller than dense, in {seconds:.1f} s"
    )
    return 0


def _dense_shapes(checkpoint: str) -> Any:
    """The checkpoint's tree with each array as a zero-stride view of its shape and dtype.

    ``summarize`` reads only shapes, dtypes and byte counts of the dense side, so the
    weights themselves are never read for the report.
    """
    with open_source(checkpoint) as source:

        def shaped(marker: int) -> Any:
            shape_dtype = source.shapes[marker]
            if shape_dtype is None:
                return source.load(marker)
            shape, dtype = shape_dtype
            return np.broadcast_to(np.zeros((), dtype), shape)

        return jax.tree.map(shaped, source.skeleton)


def _compress_recipe(
    steps: list[RecipeStep], src: str, dst: str, *, allow_empty: bool, entropy: bool
) -> Any:
    """:func:`compress_file` with the recipe; an empty step is an error naming its line."""
    transform = steps[0].transform if len(steps) == 1 else chain(*(s.transform for s in steps))
    with warnings.catch_warnings():
        if not allow_empty:  # raised before the file is committed, so nothing is written
            warnings.simplefilter("error", NothingSelectedWarning)
        try:
            return compress_file(src, dst, transform, progress=True, entropy=entropy)
        except NothingSelectedWarning as warning:
            # The stages warn in order, so the first step the message fits is the one.
            message = str(warning)
            step, rest = next(
                (s, message[len(prefix) :])
                for s in steps
                for prefix in [f"{s.transform.name}: where={describe(s.where)} "]
                if message.startswith(prefix)
            )
            raise RecipeError(
                f"{step.at}: {step.kind}: where={describe(step.where)} {rest} "
                "(pass --allow-empty to write the file anyway)"
            ) from None
        except (TypeError, ValueError) as error:
            step = next((s for s in steps if str(error).startswith(s.transform.name)), None)
            if step is None:
                raise
            raise RecipeError(f"{step.locate(error)}: {error}") from None


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
