"""The ``jaxcompress`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxcompress.cli.bench import add_bench_command, run_bench
from jaxcompress.cli.demo import run_demo
from jaxcompress.cli.files import add_file_commands, run_compress, run_export, run_inspect
from jaxcompress.cli.options import check_output_path, fraction_below_one, int_in
from jaxcompress.core.version import __version__


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag, then exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxcompress",
        description=(
            "Model compression for JAX and Flax: prune, quantize and cluster parameter "
            "pytrees, and store them in compact, checked files. Run "
            "`jaxcompress COMMAND --help` for each command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"jaxcompress {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="Deep Compression of LeNet-300-100 on the embedded digits, saved to a file",
        description=(
            "Deep Compression on the embedded 8x8 digits: train LeNet-300-100, prune it "
            "gradually (cubic schedule), cluster the kept weights into 2**bits shared "
            "values, fine-tune the centroids, and save the result with entropy coding. "
            "Prints accuracy and bytes after each stage, and a per-layer table."
        ),
    )
    demo.add_argument(
        "--seed", type=int_in(0, 2**32 - 1), default=0, help="init and data-order seed (default 0)"
    )
    demo.add_argument(
        "--sparsity",
        type=fraction_below_one,
        default=0.94,
        help="fraction of kernel entries to prune, in [0, 1) (default 0.94)",
    )
    demo.add_argument("--scope", choices=("global", "layer"), default="global")
    demo.add_argument("--bits", type=int_in(1, 8), default=4, help="cluster index bits, 1 to 8")
    demo.add_argument("--epochs", type=int_in(0), default=40, help="dense training epochs")
    demo.add_argument(
        "--prune-epochs", type=int_in(1), default=60, help="gradual pruning epochs (at least 1)"
    )
    demo.add_argument(
        "--finetune-epochs", type=int_in(0), default=10, help="centroid fine-tuning epochs"
    )
    demo.add_argument(
        "-o", "--output", default=None, help="the .jxc file to write (default: a temp dir)"
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_file_commands(commands)
    add_bench_command(commands)
    return parser


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        console=console,
    )


def _run_demo(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output_path(args.output, flag="-o")  # before minutes of training
    # Progress goes to stderr so `--json` leaves stdout as pure JSON.
    progress_console = Console(stderr=True)
    with _progress(progress_console) as progress:
        result = run_demo(
            seed=args.seed,
            sparsity=args.sparsity,
            scope=args.scope,
            bits=args.bits,
            epochs=args.epochs,
            prune_epochs=args.prune_epochs,
            finetune_epochs=args.finetune_epochs,
            output=args.output,
            progress=progress,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    console = Console()
    console.print(_layer_table(result))
    console.print(_stage_table(result))
    console.print(
        f"saved {result.file.path} ({result.file.file_bytes:,} B, header "
        f"{result.file.header_bytes:,} B) in {result.seconds:.1f} s; "
        f"inspect it with `jaxcompress inspect {result.file.path}`"
    )
    return 0


def _layer_table(result) -> Table:
    table = Table(
        title="LeNet-300-100 on digits: bytes per layer",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("leaf", "kept", "bits", "dense", "P", "P+Q", "file", "ratio"):
        table.add_column(column, justify="left" if column == "leaf" else "right", no_wrap=True)
    for row in result.layers:
        table.add_row(
            row.path,
            f"{row.kept:.1%}",
            "-" if row.index_bits is None else str(row.index_bits),
            f"{row.dense_bytes:,}",
            f"{row.pruned_bytes:,}",
            f"{row.clustered_bytes:,}",
            f"{row.file_bytes:,}",
            f"{row.dense_bytes / row.file_bytes:.1f}x",
        )
    return table


def _stage_table(result) -> Table:
    table = Table(title="Stages", box=box.SIMPLE_HEAD)
    for column in ("stage", "test accuracy", "bytes", "ratio"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    dense = result.stage_bytes["dense"]
    labels = {
        "dense": "dense",
        "pruned": f"pruned {result.sparsity:.0%} ({result.scope}, gradual)",
        "clustered": f"+ k-means {result.bits}-bit, int8 biases",
        "fine-tuned": "+ centroid fine-tuning",
    }
    for name, label in labels.items():
        size = result.stage_bytes[name]
        table.add_row(
            label, f"{result.stage_accuracies[name]:.2%}", f"{size:,}", f"{dense / size:.1f}x"
        )
    table.add_row(
        "saved file (rANS coded, with header)",
        f"{result.compressed_accuracy:.2%}",
        f"{result.stage_bytes['file']:,}",
        f"{result.ratio:.1f}x",
    )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcompress`` command.

    Args:
        argv: the arguments, without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status.

    Example:
        >>> main(["demo", "--epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1",
        ...       "--json"])
        ... # doctest: +ELLIPSIS
        {"dense_accuracy": ...}
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    handlers = {
        "demo": _run_demo,
        "compress": run_compress,
        "inspect": run_inspect,
        "export": run_export,
        "bench": run_bench,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, OSError) as error:
        # Bad input (a damaged file, a bad recipe, a missing path, a filter that selects
        # nothing; FileFormatError is a ValueError) gets one line, not a traceback.
        parser.exit(2, f"jaxcompress {args.command}: error: {_one_line(error)}\n")


def _one_line(error: Exception) -> str:
    """The error's first line (JAX's own messages run on over many)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f"{text} ..." if len(lines) > 1 else text


if __name__ == "__main__":
    sys.exit(main())
