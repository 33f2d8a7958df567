"""Throughput of compressed inference against device count: pmap and jit + NamedSharding.

The model is the 4-layer 4096-wide MLP of ``benchmarks/inference.py`` with int8
per-channel kernels, served by ``jaxcompress.accelerate`` after ``prepare``. For 1, 2,
4 and 8 devices (as many as there are) a fixed global batch of 512 rows is run

- with ``jaxcompress.pmap_apply`` (the batch split over the devices by ``pmap``, the
  parameters broadcast), and
- with ``jax.jit`` on a one-axis ``("data",)`` mesh: the parameters replicated with
  ``NamedSharding(mesh, P())`` once, the batch placed with
  ``jaxcompress.data_parallel``.

Each device count's output is checked against the one-device output. Throughput is
rows per second from the median of interleaved calls, each ended by
``block_until_ready``. On CPU the devices are ``--xla_force_host_platform_device_count=8``
fake devices sharing this machine's cores, so this measures correctness and overhead,
not scaling; on a host with several GPUs or TPU cores it measures scaling.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/pmap_scaling.py``
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from _common import RESULTS, command, force_host_devices, markdown_table, time_once, write

force_host_devices(8)  # before jax is imported; GPU and TPU backends ignore it

# The imports below load jax, so they come after the flag, on purpose.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from inference import mlp_apply, mlp_params  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxcompress as jc  # noqa: E402

COMMAND = command(__file__)
GLOBAL_BATCH = 512
SECONDS = 8.0
MIN_ROUNDS = 7


def main() -> None:
    load_before = os.getloadavg()
    devices = jax.devices()
    counts = [c for c in (1, 2, 4, 8) if c <= len(devices)]
    fast = jc.accelerate(mlp_apply)
    served = fast.prepare(jc.quantize(bits=8, axis=-1, where=r"kernel")(mlp_params())[0])
    x = jax.random.normal(jax.random.key(5), (GLOBAL_BATCH, 4096), jnp.float32)
    reference = np.asarray(jax.jit(fast)(served, x))

    calls, outputs = {}, {}
    for count in counts:
        subset = devices[:count]
        calls[("pmap", count)] = (jc.pmap_apply(fast, devices=subset), (served, x))
        mesh = Mesh(np.array(subset), ("data",))
        replicated = jax.device_put(served, NamedSharding(mesh, P()))
        x_sharded = jax.device_put(x, jc.data_parallel(mesh))
        calls[("jit + NamedSharding", count)] = (jax.jit(fast), (replicated, x_sharded))
    for key, (fn, args) in calls.items():
        outputs[key] = np.asarray(fn(*args))
        time_once(fn, *args)
    samples = {key: [] for key in calls}
    start, rounds = time.perf_counter(), 0
    while rounds < MIN_ROUNDS or (time.perf_counter() - start < SECONDS and rounds < 200):
        for key, (fn, args) in calls.items():
            samples[key].append(time_once(fn, *args))
        rounds += 1

    rows, data = [], []
    for (style, count), times in samples.items():
        median = float(np.median(times))
        error = float(np.max(np.abs(outputs[(style, count)] - reference)))
        throughput = GLOBAL_BATCH / median
        base = GLOBAL_BATCH / float(np.median(samples[(style, 1)]))
        data.append(
            {
                "style": style,
                "devices": count,
                "median_ms": median * 1e3,
                "rows_per_s": throughput,
                "speedup_vs_1": throughput / base,
                "max_abs_diff_vs_1_device": error,
                "rounds": rounds,
            }
        )
        rows.append(
            [
                style,
                count,
                f"{median * 1e3:.2f}",
                f"{throughput:,.0f}",
                f"{throughput / base:.2f}x",
                f"{error:.1e}",
            ]
        )
        print(rows[-1], file=sys.stderr, flush=True)

    kind, backend = devices[0].device_kind, jax.default_backend()
    name = backend if kind == backend else f"{kind} ({backend})"
    device = f"{name}, {len(devices)} device(s)"
    plot_name = f"pmap_scaling_{backend}.png"
    _plot(data, RESULTS / plot_name, device)
    table = markdown_table(
        ["style", "devices", "median ms / call", "rows / s", "vs 1 device", "max |diff| vs 1"],
        rows,
    )
    load_after = os.getloadavg()
    body = f"""
Device: {device}. Global batch {GLOBAL_BATCH} rows of 4096 features through the int8
MLP, {rounds} interleaved rounds. Load average {load_before[0]:.2f} before and
{load_after[0]:.2f} after, on {os.cpu_count()} CPUs.

{table}

![throughput]({plot_name})

The pmap path broadcasts the parameters on every call (``in_axes=None``); the jit
path places them once. On CPU the fake devices share the same cores, so more
devices cannot raise throughput; the rows show the overhead of splitting and that
every device count gives the one-device result.
"""
    path = write(
        f"pmap_scaling_{backend}",
        title=f"pmap and sharded throughput of int8 inference ({device})",
        command=COMMAND,
        body_markdown=body,
        data={"device": device, "global_batch": GLOBAL_BATCH, "rows": data},
    )
    print(path)


def _plot(data: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for style in dict.fromkeys(d["style"] for d in data):
        points = [d for d in data if d["style"] == style]
        ax.plot(
            [d["devices"] for d in points], [d["rows_per_s"] for d in points], "o-", label=style
        )
    ax.set_xlabel("devices")
    ax.set_ylabel("rows / s")
    ax.set_xscale("log", base=2)
    ax.set_title(device, fontsize=8)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
