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


def _sparsity(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcompress", description="Model compression for JAX and Flax."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train LeNet-300-100 on the embedded digits, prune it, and report",
        description=(
            "Train LeNet-300-100 on the embedded 8x8 digits, prune its kernels one-shot, "
            "fine-tune with the mask fixed, and print sizes and accuracies."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    demo.add_argument(
        "--sparsity", type=_sparsity, default=0.9, help="fraction of kernel entries to prune"
    )
    demo.add_argument("--scope", choices=("global", "layer"), default="global")
    demo.add_argument("--epochs", type=int, default=40, help="dense training epochs")
    demo.add_argument("--finetune-epochs", type=int, default=40, help="masked fine-tune epochs")
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
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
    from jaxcompress.demo import run_demo  # imports jax; keep `--help` fast

    # Progress goes to stderr so `--json` leaves stdout as pure JSON.
    progress_console = Console(stderr=True)
    with _progress(progress_console) as progress:
        result = run_demo(
            seed=args.seed,
            sparsity=args.sparsity,
            scope=args.scope,
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            progress=progress,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    console = Console()
    console.print(result.report.table(title="LeNet-300-100 on digits: per-leaf summary"))
    headline = Table(title="Result", show_header=False, box=box.SIMPLE)
    headline.add_column(justify="left")
    headline.add_column(justify="right")
    headline.add_row("dense test accuracy", f"{result.dense_accuracy:.2%}")
    headline.add_row("pruned test accuracy", f"{result.compressed_accuracy:.2%}")
    headline.add_row("kernel sparsity", f"{result.sparsity:.0%} ({result.scope})")
    headline.add_row(
        "size", f"{result.report.original_bytes:,} B -> {result.report.compressed_bytes:,} B"
    )
    headline.add_row("compression ratio", f"{result.ratio:.2f}x")
    headline.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(headline)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcompress`` command.

    Args:
        argv: the arguments, without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status.

    Example:
        >>> main(["demo", "--epochs", "1", "--finetune-epochs", "1", "--json"])
        ... # doctest: +ELLIPSIS
        {"dense_accuracy": ...}
        0
    """
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
