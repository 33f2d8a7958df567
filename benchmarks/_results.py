"""Shared by the benchmark scripts: machine facts and writing results as markdown + JSON.

Each script measures ours and its baseline in the same run and calls :func:`write`,
which puts ``<name>.md`` and ``<name>.json`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """What ran: versions, CPU count, BLAS kernels (threadpoolctl) and OpenBLAS overrides."""
    import jax
    import numpy as np

    facts: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    try:
        import sklearn

        facts["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        facts["blas"] = [
            {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for info in threadpool_info()
        ]
    except ImportError:
        facts["blas"] = "threadpoolctl not installed"
    return facts


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, *, title: str, command: str, body_markdown: str, data: Any) -> Path:
    """Writes ``results/<name>.md`` (title, how it was run, machine, body) and ``<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    blas = env.get("blas")
    blas_line = (
        ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})" for b in blas)
        if isinstance(blas, list)
        else blas
    )
    markdown = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {env['cpu_count']} CPUs, {env['platform']}; jax {env['jax']} "
            f"({env['jax_backend']}), numpy {env['numpy']}"
            + (f", scikit-learn {env['scikit-learn']}" if "scikit-learn" in env else "")
            + f". BLAS: {blas_line}. OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}, "
            f"OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']}. Run on {env['date']}.",
            "",
            body_markdown.strip(),
            "",
        ]
    )
    (RESULTS / f"{name}.md").write_text(markdown)
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {"title": title, "command": command, "environment": env, "results": data}, indent=2
        )
    )
    return RESULTS / f"{name}.md"
