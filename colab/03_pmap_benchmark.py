# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/03_pmap_benchmark.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # Dense vs compressed inference across devices
#
# Data-parallel inference with the parameters replicated on every device and the
# batch split across them, two ways: `jax.pmap`, and `jax.jit` with
# `jax.sharding.NamedSharding`. The compressed models are stored compressed on
# each device and decoded with `jc.materialize` inside the compiled function, on
# every call. We time a few batch sizes and compare throughput.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/03_pmap_benchmark.ipynb)

# %% [markdown]
# ## Setup
#
# On Colab, pick a GPU or TPU under *Runtime → Change runtime type* if you like;
# everything also runs on the CPU, in a smaller version (`SMALL` below).

# %%
# On Colab, install jaxcompress from GitHub (jax, flax, optax and matplotlib are already
# there). Anywhere else this cell does nothing: install the package first, for example
# with `pip install -e .` in a checkout of the repository.
import subprocess
import sys

if "google.colab" in sys.modules:
    package = "jaxcompress @ git+https://github.com/jaxcompress/jaxcompress"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)

# %%
import os
import sys

# On CPU, XLA can split the host into several devices, so that the data-parallel code
# has more than one device to use. The flag only affects the CPU backend (TPUs and GPUs
# are used as they are) and must be set before jax is first imported; an XLA_FLAGS that
# already sets it is left alone.
DEVICE_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    if "jax" in sys.modules:
        print("jax was imported before this cell: restart the kernel to get 8 CPU devices")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}=8".strip()

import jax  # noqa: E402 (after XLA_FLAGS, on purpose)

BACKEND = jax.default_backend()  # "tpu" or "gpu" when there is one, else "cpu"
# SMALL keeps CPU runs short; JAXCOMPRESS_NOTEBOOK_SMALL=1 or 0 forces it on or off.
small = os.environ.get("JAXCOMPRESS_NOTEBOOK_SMALL", "")
SMALL = small == "1" if small in ("0", "1") else BACKEND == "cpu"
print(f"backend: {BACKEND}, {jax.device_count()} device(s), SMALL = {SMALL}")
print(*jax.devices(), sep="\n")

# %%
# %matplotlib inline
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet300100


def show_table(header, rows):
    """Displays rows as a markdown table: first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


# %% [markdown]
# ## Models
#
# LeNet-300-100 with freshly initialized weights: throughput does not depend on
# the weight values (see `01_quickstart.ipynb` for accuracy). Three versions of
# the same parameters: dense float32, int8 per channel, and 90 % pruning per
# layer followed by 4-bit k-means.

# %%
model = LeNet300100()
FEATURES = 64
params = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))["params"]
transforms = {
    "int8": jc.quantize(8),
    "prune 90 % + 4-bit": jc.chain(jc.prune(0.9), jc.cluster(bits=4)),
}
variants = {"dense": params}
for name, tx in transforms.items():
    variants[name], _ = jax.jit(tx)(params)  # one compiled program per transform
show_table(
    ["parameters", "bytes", "ratio"],
    [
        (name, f"{jc.nbytes(tree):,}", f"{jc.nbytes(params) / jc.nbytes(tree):.1f}x")
        for name, tree in variants.items()
    ],
)


def predict(params, x):
    # A no-op for dense params; compressed leaves are decoded here, in every call.
    return model.apply({"params": jc.materialize(params)}, x)


# %% [markdown]
# ## `jax.pmap`: one copy of the parameters per device
#
# `pmap` maps over a leading device axis. To replicate, stack one copy per device
# and let an identity `pmap` put copy *i* on device *i*; compressed leaves are
# pytrees, so their packed children are stacked and placed like any array. The
# batch is reshaped to `(devices, batch / devices, features)` and placed the same
# way, so the timings below measure compute, not host-to-device copies.

# %%
N = jax.device_count()
to_devices = jax.pmap(lambda tree: tree)  # places slice i of every leaf on device i


def replicate(tree):
    return to_devices(jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), tree))


pmap_predict = jax.pmap(predict)
pmap_params = {name: replicate(tree) for name, tree in variants.items()}
leaf = pmap_params["prune 90 % + 4-bit"]["dense1"]["kernel"]
print("replicated:", leaf.mask.shape, "mask bytes over", len(leaf.mask.devices()), "devices")

# %% [markdown]
# ## `jax.jit` with a device mesh
#
# The same with `jax.sharding`: a one-axis mesh over all devices, the parameters
# replicated (`PartitionSpec()`) and the batch split along its first axis
# (`PartitionSpec("data")`). `jit` partitions the program from those placements.

# %%
mesh = jax.make_mesh((N,), ("data",))
replicated = NamedSharding(mesh, P())
split_batch = NamedSharding(mesh, P("data"))

jit_predict = jax.jit(predict)
jit_params = {name: jax.device_put(tree, replicated) for name, tree in variants.items()}

# Both give the same logits as one device does, for every version. The batch has the
# first size timed below, so the timing reuses these compiled programs.
BATCH_SIZES = [N * 128, N * 1024, N * 8192] if SMALL else [N * 2**k for k in range(7, 16, 2)]
x = jax.random.normal(jax.random.key(1), (BATCH_SIZES[0], FEATURES))
for name in variants:
    reference = jax.jit(predict)(variants[name], x)
    by_pmap = pmap_predict(pmap_params[name], x.reshape(N, -1, FEATURES)).reshape(-1, 10)
    by_mesh = jit_predict(jit_params[name], jax.device_put(x, split_batch))
    np.testing.assert_allclose(by_pmap, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_mesh, reference, rtol=1e-5, atol=1e-5)
print("pmap and sharded jit agree with single-device inference")

# %% [markdown]
# ## Timing
#
# For each batch size (a multiple of the device count) and each version: one
# call to compile and warm up, then the median of several timed calls, each ended
# with `block_until_ready()` because jax dispatches asynchronously. The versions
# take turns call by call, so that a change in the machine's load hits them all
# alike. The table gives examples per second and, in brackets, the ratio to dense.

# %%
REPEATS = 7 if SMALL else 20


def median_seconds(fn, params_by_name, x):
    # Median seconds of fn(params, x) for each version, the versions taking turns.
    for params in params_by_name.values():
        fn(params, x).block_until_ready()  # compile and warm up
    times = {name: [] for name in params_by_name}
    for _ in range(REPEATS):
        for name, params in params_by_name.items():
            start = time.perf_counter()
            fn(params, x).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}


speed = {}  # (method, batch, version) -> examples per second
for batch in BATCH_SIZES:
    x = jax.random.normal(jax.random.key(batch), (batch, FEATURES))
    runs = {
        "pmap": (pmap_predict, pmap_params, to_devices(x.reshape(N, -1, FEATURES))),
        "jit + NamedSharding": (jit_predict, jit_params, jax.device_put(x, split_batch)),
    }
    for method, (fn, params_by_name, x_placed) in runs.items():
        for name, seconds in median_seconds(fn, params_by_name, x_placed).items():
            speed[method, batch, name] = batch / seconds

table = []
for method in ["pmap", "jit + NamedSharding"]:
    for batch in BATCH_SIZES:
        dense_speed = speed[method, batch, "dense"]
        cells = [f"{dense_speed:,.0f}"]
        for name in list(variants)[1:]:
            value = speed[method, batch, name]
            cells.append(f"{value:,.0f} ({value / dense_speed:.2f}x)")
        table.append((method, f"{batch:,}", *cells))
show_table(["method", "batch", *variants], table)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, method in zip(axes, ["pmap", "jit + NamedSharding"], strict=True):
    for name in variants:
        ax.plot(BATCH_SIZES, [speed[method, b, name] for b in BATCH_SIZES], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (all devices)")
    ax.set_title(f"{method}, {N} {BACKEND} device(s)")
    ax.legend()
axes[0].set_ylabel("examples / s")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the numbers honestly
#
# * Here the compressed versions decode their weights (unpack the bit-packed
#   masks and codes, look up codebooks, scatter the kept values) inside every
#   call, then run the same dense matrix products. That decoding is extra work
#   that does not depend on the batch size, so on a CPU compressed inference is
#   **slower** than dense at small batches; as batches grow the decoding is
#   spread over more examples and the gap closes, but the compressed versions
#   do not compute less. What compression buys in this notebook is memory:
#   each device holds only the compressed bytes.
# * On a CPU the "devices" are XLA's split of one host (`XLA_FLAGS` above), which
#   share the same cores, so more devices do not mean more compute. The timings
#   are only meaningful relative to each other, on the same machine, and on a
#   small or busy machine they are noisy: differences of a few tens of percent
#   between dense and int8 can flip from one run to the next.
# * A speed path that runs on compressed formats directly (sparse or low-bit
#   kernels, decoding fused into the matmul), `accelerate`, is planned and not
#   part of the library yet.
