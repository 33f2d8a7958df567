"""Two processes (4 CPU devices each) run a compressed model on one 8-device mesh.

Both start ``tests/multihost_worker.py`` once, which joins ``jax.distributed`` with
gloo CPU collectives. It places a compressed model with ``jaxcompress.sharding.place``
and gathers the logits, which must equal the same forward pass computed here in one
process; then it compresses a sharded model in both processes, saves and reloads it,
and every array must equal the one-process result bit for bit.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import multihost_worker as worker  # tests/ is on sys.path: it has no __init__.py
import numpy as np
import pytest

pytestmark = pytest.mark.slow


WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    # 4 devices per process instead of conftest's 8.
    flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append("--xla_force_host_platform_device_count=4")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory) -> Path:
    """Runs the two worker processes once; returns their output prefix."""
    out = tmp_path_factory.mktemp("multihost") / "out"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(out)],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, stderr))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = "\n".join(f"--- process {i}:\n{p.communicate()[1]}" for i, p in enumerate(procs))
        pytest.fail(f"workers did not finish in {TIMEOUT_S} s\n{logs}")
    if any(code == worker.NO_COLLECTIVES for code, _ in results):
        pytest.skip(next(err for code, err in results if code == worker.NO_COLLECTIVES))
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{stderr}"
    return out


def test_two_processes_equal_one(worker_outputs):
    want = jax.jit(worker.forward)(worker.compressed_model(), worker.batch())
    got = np.load(f"{worker_outputs}.logits.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.bitwise
def test_two_processes_compress_save_and_load_bit_identical_to_one(worker_outputs):
    # One global threshold agreed across processes, each process saving only its
    # own blocks, and a reload onto the mesh: all bit-identical to one process.
    want = worker.flat_arrays(worker.save_chain()(worker.dense_model())[0])
    with np.load(f"{worker_outputs}.arrays.npz") as got:
        arrays = [got[f"arr_{i}"] for i in range(len(got.files))]
    assert len(arrays) == 2 * len(want)
    for i, expected in enumerate(want + want):
        assert arrays[i].dtype == expected.dtype
        np.testing.assert_array_equal(arrays[i], expected)
