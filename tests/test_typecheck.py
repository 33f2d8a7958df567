"""The package type-checks: mypy, configured in pyproject.toml, finds no errors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors():
    # From the repository root so that mypy reads [tool.mypy] (files = ["jaxcompress"]).
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
