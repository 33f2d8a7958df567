"""Shared by the benchmark scripts: setup, how a run was made, the machine, results files.

Every script imports this module before anything from ``jaxcompress`` (``import _common``
finds it next to the script, since Python puts the script's folder first on
``sys.path``). Importing it puts the repository root on ``sys.path``, so that a script
measures the ``jaxcompress`` of its own checkout, not an installed copy. It imports no
jax at module level: ``scale.py`` measures a process's memory before jax is loaded.

Each script measures ours and its baseline in the same run and calls :func:`write`,
which puts ``<name>.md`` and ``<name>.json`` under ``benchmarks/results/``, with the
command (:func:`command`) and the machine (:func:`environment`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # after the script's own folder, before site-packages
# The recorded runs unset the machine's OpenBLAS overrides, so that OpenBLAS picks its
# kernel for the CPU it finds; environment() records what was in effect.
PYTHON = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python"


def command(script: str, flags: Sequence[str] = ()) -> str:
    """How the benchmark ``script`` (its ``__file__``) is run, with ``flags`` appended.

    Example:
        >>> command("/repo/benchmarks/quantizers.py", ["--quick"])
        'env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/quantizers.py --quick'
    """
    return " ".join([PYTHON, f"benchmarks/{Path(script).name}", *flags])


def force_host_devices(count: int) -> None:
    """Asks XLA for ``count`` CPU devices; call it before jax is first imported.

    GPU and TPU backends ignore the flag.
    """
    if "jax" in sys.modules:
        raise RuntimeError("force_host_devices must run before jax is imported")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = flags.strip()


def time_once(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds of one call ``fn(*args)``, until its outputs are ready."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


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


def write(
    name: str,
    *,
    title: str,
    command: str,
    body_markdown: str,
    data: Any,
    directory: Path | None = None,
) -> Path:
    """Writes ``results/<name>.md`` (title, how it was run, machine, body) and ``<name>.json``.

    ``directory`` replaces ``benchmarks/results`` (a smoke run writes elsewhere).
    """
    folder = RESULTS if directory is None else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
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
    (folder / f"{name}.md").write_text(markdown)
    (folder / f"{name}.json").write_text(
        json.dumps(
            {"title": title, "command": command, "environment": env, "results": data}, indent=2
        )
    )
    return folder / f"{name}.md"
