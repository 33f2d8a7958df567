"""``jaxcompress bench``: run the benchmark suite, or one of it, from a source checkout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_HELP = """\
Run one benchmark script, or all of them, from the benchmarks/ folder of a source
checkout (benchmarks are not installed with the package). Each script compares
jaxcompress with its baseline side by side in one run and writes markdown and JSON
to benchmarks/results/. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for the run
so baselines get their full BLAS speed. Options of this command go before the name;
everything after the name goes to the script.

  jaxcompress bench --list
  jaxcompress bench quantizers
  jaxcompress bench kmeans_vs_sklearn --quick
  jaxcompress bench --json quantizers     # one JSON object: status and results file
"""

_BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    """Adds ``bench`` to the command parser."""
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite or one benchmark (source checkout)",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("name", nargs="?", help="benchmark to run (default: all)")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (the list, or each run's status and results)",
    )
    bench.add_argument(
        "--dir",
        default=None,
        help="the benchmarks folder (default: ./benchmarks, or the checkout's)",
    )


def _benchmarks_dir(explicit: str | None) -> Path:
    candidates = (
        [Path(explicit)]
        if explicit
        else [
            Path.cwd() / "benchmarks",
            Path(__file__).resolve().parents[2] / "benchmarks",
        ]
    )
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.py")):
            return folder
    raise FileNotFoundError(
        "no benchmarks folder found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); benchmarks ship with the source repository: run from a checkout or pass --dir"
    )


def available(folder: Path) -> dict[str, str]:
    """Benchmark names in ``folder`` and the first line of each docstring.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "speed.py").write_text('\"\"\"How fast?\"\"\"\\n')
        >>> available(folder)
        {'speed': 'How fast?'}
    """
    found = {}
    for script in sorted(folder.glob("*.py")):
        if script.name.startswith("_"):
            continue
        text = script.read_text()
        first = text.split('"""')[1].strip().splitlines()[0] if text.startswith('"""') else ""
        found[script.stem] = first
    return found


def run_bench(args: argparse.Namespace) -> int:
    """Lists or runs benchmarks; returns the first failing exit status, or 0."""
    folder = _benchmarks_dir(args.dir)
    names = available(folder)
    if args.list and args.json:
        print(json.dumps({"folder": str(folder), "benchmarks": names}))
        return 0
    if args.list:
        table = Table(title=f"benchmarks in {folder}")
        table.add_column("name")
        table.add_column("question")
        for name, question in names.items():
            table.add_row(name, question)
        Console().print(table)
        return 0
    if args.name is not None and args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    selected = [args.name] if args.name else list(names)
    environment = {k: v for k, v in os.environ.items() if k not in _BLAS_OVERRIDES}
    console = Console(stderr=True)
    runs: list[dict[str, Any]] = []
    for name in selected:
        console.rule(f"benchmark {name}")
        command = [sys.executable, str(folder / f"{name}.py"), *args.script_args]
        # With --json the scripts' own output goes to stderr, keeping stdout pure JSON.
        output = sys.stderr if args.json else None
        status = subprocess.run(
            command, env=environment, cwd=folder.parent, stdout=output
        ).returncode
        results = folder / "results" / f"{name}.json"
        runs.append(
            {"name": name, "status": status, "results": str(results) if results.exists() else None}
        )
        if status:
            console.print(f"[red]{name} failed with exit status {status}[/red]")
            break
    if args.json:
        print(json.dumps({"folder": str(folder), "runs": runs}))
    return runs[-1]["status"] if runs else 0
