# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/01_quickstart.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # jaxcompress quick start: prune, cluster and quantize LeNet-300-100
#
# Train a small MLP on the 8×8 digits that ship with the package, then compress
# its parameters with two one-line transforms: magnitude pruning followed by
# 4-bit k-means weight sharing (the first two stages of Deep Compression), and
# int8 linear quantization. A transform takes any parameter pytree and returns
# the same tree with compressed leaves that store only what they need, so the
# byte counts below are true storage costs.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/01_quickstart.ipynb)

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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import rich
from IPython.display import Markdown, display

import jaxcompress as jc
from jaxcompress.examples.classifier import accuracy, fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100


def show_table(header, rows):
    """Displays rows as a markdown table: first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


# %% [markdown]
# ## Train a dense model
#
# The UCI digits are embedded in the package (1437 training and 360 test images
# of 8×8 pixels), so nothing is downloaded. `fit_classifier` is the small Adam
# loop that the demo and the benchmarks use; `accuracy` evaluates dense or
# compressed parameters alike.

# %%
train_x, train_y = load_digits(split="train")
test_x, test_y = load_digits(split="test")
EPOCHS = 15 if SMALL else 40

model = LeNet300100()
init = model.init(jax.random.key(0), train_x[:1])["params"]
dense = fit_classifier(model, init, train_x, train_y, epochs=EPOCHS, learning_rate=1e-3, seed=0)
dense_accuracy = accuracy(model, dense, test_x, test_y)
print(f"trained {EPOCHS} epochs on {len(train_y)} images")
print(f"dense test accuracy: {dense_accuracy:.2%}")

# %% [markdown]
# ## Compress
#
# * `jc.prune(0.9, scope="global")` zeroes the 90 % smallest kernel weights with
#   one magnitude threshold across all layers; `jc.cluster(bits=4)` then replaces
#   the kept values of each kernel by indices into a 16-entry k-means codebook.
#   The pruned zeros stay exact.
# * `jc.quantize(8)` stores each kernel as int8 codes with one float32 scale per
#   output channel.
#
# Both select the kernels only (the default filter `jc.filters.kernels`); biases
# stay dense. This is post-training compression: no data, no retraining.

# %%
deep = jc.chain(jc.prune(0.9, scope="global"), jc.cluster(bits=4))
int8 = jc.quantize(8)

deep_params, _ = deep(dense)  # a global threshold needs concrete arrays: run eagerly
int8_params, _ = jax.jit(int8)(dense)  # other transforms can be jitted whole
print(deep_params["dense1"]["kernel"], "holding", deep_params["dense1"]["kernel"].values)
print(int8_params["dense1"]["kernel"])

# %% [markdown]
# `jc.summarize(original, compressed)` compares the trees leaf by leaf: bytes
# before and after (packed masks, codes and codebooks included), the ratio, the
# fraction of nonzero entries and the relative Frobenius error. It prints as a
# table; `.ratio`, `.compressed_bytes` and `.to_dict()` give the numbers.

# %%
deep_report = jc.summarize(dense, deep_params)
int8_report = jc.summarize(dense, int8_params)
rich.print(deep_report.table(title="prune 90 % (global) + 4-bit k-means"))
rich.print(int8_report.table(title="int8, one scale per output channel"))

# %% [markdown]
# ## Accuracy, and getting it back
#
# int8 costs nothing here, but removing 90 % of the weights in one shot does.
# Deep Compression retrains between pruning and clustering: fine-tune the kept
# weights with the mask fixed (`fit_classifier(..., masks=...)` multiplies
# gradients and weights by the 0/1 mask), then apply the same transform again.
# The pruned weights are exactly zero by then, so pruning picks the same mask.

# %%
FINETUNE_EPOCHS = 30 if SMALL else 40
pruned, _ = jc.prune(0.9, scope="global")(dense)
masks = jax.tree.map(
    lambda leaf: leaf.keep_mask().astype(jnp.float32) if isinstance(leaf, jc.Sparse) else 1.0,
    pruned,
    is_leaf=jc.is_compressed,
)
tuned = fit_classifier(
    model,
    jc.materialize(pruned),
    train_x,
    train_y,
    epochs=FINETUNE_EPOCHS,
    learning_rate=1e-3,
    seed=1,
    masks=masks,
)
tuned_params, _ = deep(tuned)

rows = [
    ("dense float32", dense),
    ("prune 90 % + 4-bit k-means, one shot", deep_params),
    (f"prune 90 %, fine-tune {FINETUNE_EPOCHS} epochs, 4-bit k-means", tuned_params),
    ("int8 per channel", int8_params),
]
dense_bytes = jc.nbytes(dense)
table = []
for name, params in rows:
    acc = accuracy(model, params, test_x, test_y)
    size = jc.nbytes(params)
    change = f"{100 * (acc - dense_accuracy):+.2f}"
    table.append((name, f"{size:,}", f"{dense_bytes / size:.1f}x", f"{acc:.2%}", change))
show_table(["parameters", "bytes", "ratio", "test accuracy", "change (points)"], table)

# %% [markdown]
# ## What 4-bit k-means does to one layer
#
# Left: the weights of `dense1` before pruning (grey), the kept ones after
# fine-tuning (blue) and the 16 codebook values k-means chose for them (red
# lines). Right: the decoded layer, where every kept weight is one of the 16
# values. The `Sparse` leaf stores the kept values, which here are themselves a
# `Clustered` leaf with a `.codebook` and packed `.indices`.

# %%
LAYER = "dense1"
before = np.asarray(dense[LAYER]["kernel"]).ravel()
leaf = tuned_params[LAYER]["kernel"]  # jc.Sparse(values=jc.Clustered(...))
kept = np.asarray(leaf.keep_mask()).ravel()
tuned_kept = np.asarray(tuned[LAYER]["kernel"]).ravel()[kept]
codebook = np.asarray(leaf.values.codebook)
decoded = np.asarray(jc.materialize(leaf)).ravel()

bins = np.linspace(min(before.min(), tuned_kept.min()), max(before.max(), tuned_kept.max()), 121)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
left.hist(before, bins=bins, color="lightgray", label="dense, before pruning")
left.hist(tuned_kept, bins=bins, color="tab:blue", label="kept, after fine-tuning")
right.hist(decoded[kept], bins=bins, color="tab:blue", label="decoded kept weights")
for ax in (left, right):
    for i, centroid in enumerate(codebook):
        ax.axvline(centroid, color="tab:red", lw=0.8, label="k-means codebook" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel(f"{LAYER}/kernel weight")
    ax.legend(loc="upper right", fontsize=8)
left.set_ylabel("count")
left.set_title(f"{LAYER}: {kept.sum()} of {kept.size} weights kept")
right.set_title(f"after 4-bit clustering: {len(codebook)} distinct values")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The same with flax nnx
#
# Transforms take any pytree, so an `nnx.State` works as it is. The nnx model
# has the same layer names as the linen one, so the fine-tuned weights load into
# it, and paths such as `dense1/kernel` (and therefore filters) agree: the
# compressed kernels are identical. Compressed leaves sit inside the `nnx.Param`
# variables; `nnx.merge` with the materialized state gives a runnable model.

# %%
from flax import nnx

from jaxcompress.examples.models import LeNet300100NNX

nnx_model = LeNet300100NNX(rngs=nnx.Rngs(0))
state = nnx.state(nnx_model, nnx.Param)
nnx.replace_by_pure_dict(state, tuned)  # same names as the linen params
nnx.update(nnx_model, state)

nnx_compressed, _ = deep(nnx.state(nnx_model, nnx.Param))
print(nnx_compressed["dense1"]["kernel"])  # an nnx.Param holding a jc.Sparse leaf

graphdef, _, rest = nnx.split(nnx_model, nnx.Param, ...)
compressed_model = nnx.merge(graphdef, jc.materialize(nnx_compressed), rest)
predictions = jnp.argmax(compressed_model(test_x), axis=-1)
nnx_accuracy = float(jnp.mean(predictions == test_y))
same = all(
    np.array_equal(
        np.asarray(jc.materialize(nnx_compressed)[name]["kernel"].get_value()),
        np.asarray(jc.materialize(tuned_params)[name]["kernel"]),
    )
    for name in ("dense1", "dense2", "dense3")
)
print(f"nnx compressed test accuracy: {nnx_accuracy:.2%}")
print(f"same compressed kernels as linen: {same}")
print(repr(jc.summarize(state, nnx_compressed)))

# %% [markdown]
# ## Next
#
# * `02_training_loop.ipynb`: prune gradually during training, with an optax
#   wrapper, instead of in one shot.
# * `03_pmap_benchmark.ipynb`: dense and compressed inference across devices.
# * `jaxcompress demo` runs a complete compression pipeline on the same model
#   from the command line.
