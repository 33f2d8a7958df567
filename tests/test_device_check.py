"""benchmarks/device_check.py, the one-command GPU check, run on this CPU.

The whole ``--cpu-smoke`` run takes about two minutes here (every kernel in Pallas's
interpreters), so these tests call its pieces in-process at smaller sizes: the
refusal without a GPU, the parity check (that it passes a correct kernel and fails a
wrong one), and the layers phase end to end through ``main`` down to the results
files, with ``explain``'s kernel recorded. Timings are never asserted.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxcompress as jc

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports _common from its folder
    try:
        yield importlib.import_module("device_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_without_a_gpu_it_exits_2_and_says_how_to_smoke_test(device_check, capsys, tmp_path):
    assert device_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no GPU" in err and "--cpu-smoke" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_phase_names_are_refused(device_check):
    with pytest.raises(SystemExit):
        device_check.main(["--cpu-smoke", "--phases", "layers,nope"])


def test_parity_passes_a_kernel_and_fails_a_wrong_one(device_check, monkeypatch):
    run = device_check.settings("cpu-smoke")
    leaf = device_check.random_quantized(64, 32, bits=4, group_size=32, symmetric=False)
    row = device_check.parity_row("int4 g32", leaf, 3, jnp.float32, run)
    assert row["passed"] is True, row
    assert row["kernel"] == "pallas_int4_g32_gpu" and row["max_error"] <= row["tolerance"]

    real = device_check.pallas.matmul

    def off_by_a_little(x, leaf, **kwargs):
        return real(x, leaf, **kwargs) * 1.01

    monkeypatch.setattr(device_check.pallas, "matmul", off_by_a_little)
    row = device_check.parity_row("int4 g32", leaf, 3, jnp.float32, run)
    assert row["passed"] is False and row["max_error"] > row["tolerance"]


def test_a_kernel_that_raises_is_recorded_not_fatal(device_check, monkeypatch):
    def broken(x, leaf, **kwargs):
        raise RuntimeError("no wgmma here")

    monkeypatch.setattr(device_check.pallas, "matmul", broken)
    leaf = device_check.random_quantized(64, 32, bits=8)
    row = device_check.parity_row("int8", leaf, 2, jnp.bfloat16, device_check.settings("cpu-smoke"))
    assert row["passed"] is False and "no wgmma here" in row["error"]


def test_the_layers_phase_writes_results_with_the_kernel_explain_names(
    device_check, monkeypatch, tmp_path
):
    tiny = dataclasses.replace(
        device_check.settings("cpu-smoke"), layers=((64, 32),), batches=(2,), reps=1
    )
    monkeypatch.setattr(device_check, "settings", lambda mode, platform="cuda": tiny)
    only_int8 = {"int8 per-channel": lambda p: jc.quantize(bits=8, axis=-1)(p)[0]}
    monkeypatch.setattr(device_check, "formats", lambda group, where=None: only_int8)
    code = device_check.main(
        ["--cpu-smoke", "--phases", "layers", "--out", str(tmp_path), "--name", "t"]
    )
    assert code == 0
    data = json.loads((tmp_path / "t.json").read_text())["results"]
    assert data["mode"] == "cpu-smoke" and data["interpret"] is True
    assert data["environment"]["jaxlib"] and data["environment"]["device"]
    rows = {(r["variant"], r["format"]): r for r in data["rows"]}
    ours = rows[("ours kernels=stable", "int8 per-channel")]
    assert ours["kernel"] == "kernel:pallas_int8_pc_mgpu"  # 16-bit activations: Mosaic GPU
    assert ours["relative_error"] < 0.02  # int8 rounding only
    assert rows[("XLA int8 dot", "int8 per-channel")]["relative_error"] < 0.05
    assert rows[("dense bf16", "")]["speedup"] == 1.0
    for key in [
        ("ours kernels=all", "int8 per-channel"),
        ("materialize+matmul", "int8 per-channel"),
    ]:
        assert rows[key]["ms"] > 0 and rows[key]["relative_error"] < 0.02
    assert ("qwix", "int8 per-channel") in rows  # measured, or why not
    markdown = (tmp_path / "t.md").read_text()
    assert "cpu-smoke" in markdown and "pallas_int8_pc_mgpu" in markdown
    assert "## Targets (64x32" in markdown
