"""How much does ``import jaxcompress`` add to ``import jax``? Target: at most 0.5 s.

Each round starts two fresh interpreters, ``python -c "import jax"`` and ``python -c
"import jax, jaxcompress"``, in alternating order so that both see the same machine load,
and times each from start to exit (wall time, and CPU time, which machine load disturbs
less). The medians and their differences are reported. A third
process per round runs ``python -X importtime -c "import jax; import jaxcompress"`` and
reads the cumulative time of the ``jaxcompress`` line: the import alone, without the
interpreter's start. It also lists the top-level packages that jaxcompress loads beyond
jax's own.

Bytecode is compiled once before timing (into a temporary ``PYTHONPYCACHEPREFIX``, so the
checkout is untouched and ``PYTHONDONTWRITEBYTECODE`` does not make every run compile):
an installed package imports from bytecode too.

Run: ``python benchmarks/import_time.py [--rounds 21]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python benchmarks/import_time.py"
TARGET_S = 0.5
JAX = "import jax"
BOTH = "import jax, jaxcompress"
ADDED_PACKAGES = (
    "import sys; import jax; before = {m.split('.')[0] for m in sys.modules}; "
    "import jaxcompress; print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))"
)


def _environment(pycache: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": pycache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run(code: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _importtime_s(env: dict[str, str]) -> float:
    """The cumulative ``-X importtime`` seconds of ``jaxcompress`` after jax is loaded."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import jax; import jaxcompress"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    for line in result.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == "jaxcompress":
            return int(fields[1]) / 1e6
    raise RuntimeError("no jaxcompress line in -X importtime output:\n" + result.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    rounds = parser.parse_args().rounds

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as pycache:
        env = _environment(pycache)
        _run(BOTH, env)  # compiles the bytecode of jax and jaxcompress once
        added = subprocess.run(
            [sys.executable, "-c", ADDED_PACKAGES],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        times: dict[str, list[tuple[float, float]]] = {JAX: [], BOTH: []}
        importtime_s = []
        for round_index in range(rounds):
            order = [JAX, BOTH] if round_index % 2 == 0 else [BOTH, JAX]
            for code in order:
                times[code].append(_run(code, env))
            importtime_s.append(_importtime_s(env))
    jax_s, jax_cpu_s = (list(column) for column in zip(*times[JAX], strict=True))
    both_s, both_cpu_s = (list(column) for column in zip(*times[BOTH], strict=True))

    load_after = os.getloadavg()[0]
    jax_median, both_median = statistics.median(jax_s), statistics.median(both_s)
    added_s = both_median - jax_median
    added_cpu_s = statistics.median(both_cpu_s) - statistics.median(jax_cpu_s)
    importtime_median = statistics.median(importtime_s)
    met = added_s <= TARGET_S and importtime_median <= TARGET_S
    rows = [
        ["`python -c 'import jax'` (wall, median)", f"{jax_median:.3f} s"],
        ["`python -c 'import jax, jaxcompress'` (wall, median)", f"{both_median:.3f} s"],
        ["added by jaxcompress (difference of medians)", f"{added_s:.3f} s"],
        ["ratio", f"{both_median / jax_median:.2f}x"],
        ["added CPU time (user + system, difference of medians)", f"{added_cpu_s:.3f} s"],
        [
            "`-X importtime` cumulative of `jaxcompress` after jax (median)",
            f"{importtime_median:.3f} s",
        ],
        ["target", f"<= {TARGET_S} s added: {'met' if met else 'missed'}"],
    ]
    body = "\n".join(
        [
            f"{rounds} rounds of fresh interpreters, bytecode compiled beforehand "
            "(see the script's docstring). One-minute load average "
            f"{load_before:.1f} before and {load_after:.1f} after, on {os.cpu_count()} CPUs.",
            "",
            markdown_table(["measure", "value"], rows),
            "",
            "Top-level packages loaded by `import jaxcompress` beyond `import jax`: "
            + (", ".join(f"`{name}`" for name in added) or "none"),
            "",
        ]
    )
    data = {
        "rounds": rounds,
        "import_jax_s": jax_s,
        "import_jax_jaxcompress_s": both_s,
        "importtime_jaxcompress_s": importtime_s,
        "median_import_jax_s": jax_median,
        "median_import_jax_jaxcompress_s": both_median,
        "added_s": added_s,
        "ratio": both_median / jax_median,
        "import_jax_cpu_s": jax_cpu_s,
        "import_jax_jaxcompress_cpu_s": both_cpu_s,
        "added_cpu_s": added_cpu_s,
        "median_importtime_jaxcompress_s": importtime_median,
        "added_packages": added,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "target_s": TARGET_S,
        "target_met": met,
    }
    path = write(
        "import_time",
        title="import jaxcompress: time added to import jax",
        command=COMMAND,
        body_markdown=body,
        data=data,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
