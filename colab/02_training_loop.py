# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/02_training_loop.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # Gradual pruning inside an optax training loop
#
# Instead of pruning a trained model in one shot, prune while training (Zhu &
# Gupta, 2017): the sparsity rises from 0 to its final value along a cubic
# schedule, and the network adapts as weights are removed.
# `jc.training.pruned` wraps any optax optimizer: it keeps the keep-masks in the
# optimizer state, recomputes them every few steps, and its updates leave pruned
# weights at exactly zero after `optax.apply_updates`. At the end,
# `jc.training.finalize` turns the parameters into `jc.Sparse` leaves.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/02_training_loop.ipynb)

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
import optax
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
# ## The schedule and the optimizer
#
# Two epochs of dense training first, then the sparsity follows the cubic
# schedule to 90 % at half of the run, leaving the second half to recover. The
# masks are recomputed every half epoch (`every`), so the sparsity actually
# applied is a staircase under the schedule. `scope="global"` ranks all kernels
# together with one magnitude threshold (under `jit`, too), so each layer finds
# its own sparsity and the kernels end at exactly 90 % zeros overall.

# %%
train_x, train_y = load_digits(split="train")
test_x, test_y = load_digits(split="test")

BATCH = 64
EPOCHS = 20 if SMALL else 40
STEPS_PER_EPOCH = len(train_y) // BATCH
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
FINAL_SPARSITY = 0.9
BEGIN = 2 * STEPS_PER_EPOCH
END = TOTAL_STEPS // 2
EVERY = STEPS_PER_EPOCH // 2

schedule = jc.training.cubic_sparsity(FINAL_SPARSITY, begin=BEGIN, end=END)
tx = jc.training.pruned(optax.adam(1e-3), schedule, scope="global", every=EVERY)
print(
    f"{EPOCHS} epochs of {STEPS_PER_EPOCH} steps; pruning from step {BEGIN} "
    f"to {END}, masks recomputed every {EVERY} steps"
)

# %% [markdown]
# ## The training loop
#
# An ordinary jitted optax step. The only differences from dense training: the
# optimizer is wrapped, and `tx.update` needs the current `params` (to rank the
# weights and to zero the pruned ones). `jc.training.grad` is `jax.grad` for this
# dense tree; it also takes compressed trees, whose integer children `jax.grad`
# refuses.

# %%
model = LeNet300100()
init = model.init(jax.random.key(0), train_x[:1])["params"]


@jax.jit
def train_step(params, opt_state, x, y):
    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jc.training.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@jax.jit
def predict(params, x):
    return jnp.argmax(model.apply({"params": params}, x), axis=-1)


def top1(params, x, y):
    return float(np.mean(np.asarray(predict(params, x)) == y))


def kernel_sparsity(params):
    kernels = [layer["kernel"] for layer in params.values()]
    return sum(int(jnp.sum(k == 0.0)) for k in kernels) / sum(k.size for k in kernels)


params, opt_state = init, tx.init(init)
history = {"train": [], "test": [], "sparsity": []}
order_rng = np.random.default_rng(0)
for epoch in range(1, EPOCHS + 1):
    order = order_rng.permutation(len(train_y))
    for batch in range(STEPS_PER_EPOCH):
        index = order[batch * BATCH : (batch + 1) * BATCH]
        params, opt_state = train_step(params, opt_state, train_x[index], train_y[index])
    history["train"].append(top1(params, train_x, train_y))
    history["test"].append(top1(params, test_x, test_y))
    history["sparsity"].append(kernel_sparsity(params))
    if epoch % 4 == 0 or epoch == EPOCHS:
        print(
            f"epoch {epoch:3d}: sparsity {history['sparsity'][-1]:6.1%}, "
            f"train {history['train'][-1]:.2%}, test {history['test'][-1]:.2%}"
        )

# Pruned weights are exactly zero, and exactly where the masks say.
for path, keep in opt_state.masks.items():
    layer, name = path.split("/")
    assert bool(jnp.all(params[layer][name][~keep] == 0.0)), path

# %% [markdown]
# ## Schedule and accuracy curves
#
# Left: the cubic schedule, the staircase the masks follow, and the fraction of
# kernel weights that are zero after each epoch. Right: train and test
# accuracy per epoch; the shaded band is the pruning phase.

# %%
steps = np.arange(TOTAL_STEPS + 1)  # updates done
epochs = np.arange(1, EPOCHS + 1)
# After t updates, the masks are those computed at the last multiple of EVERY below t.
last_mask_update = np.maximum(steps - 1, 0) // EVERY * EVERY
applied = np.where(steps > 0, np.asarray(schedule(last_mask_update)), 0.0)

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
left.plot(steps, np.asarray(schedule(steps)), label="cubic_sparsity(step)")
left.step(steps, applied, where="post", label=f"applied (masks every {EVERY} steps)")
measured = history["sparsity"]
left.plot(epochs * STEPS_PER_EPOCH, measured, "o", ms=4, label="measured after each epoch")
left.set_xlabel("step")
left.set_ylabel("kernel sparsity")
left.legend()
right.axvspan(BEGIN / STEPS_PER_EPOCH, END / STEPS_PER_EPOCH, color="0.9", label="pruning phase")
right.plot(epochs, history["train"], "o-", ms=3, label="train")
right.plot(epochs, history["test"], "o-", ms=3, label="test")
right.set_xlabel("epoch")
right.set_ylabel("accuracy")
right.legend(loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Finalize and report
#
# `finalize(params, opt_state)` finds the `PrunedState` in the optimizer state
# (also inside `optax.chain`, a linen `TrainState` or an `nnx.Optimizer`) and
# returns the parameters with `jc.Sparse` kernels. The pruned weights already
# are zero, so the error column is exactly 0. One more transform, 5-bit k-means
# on the kept values, is Deep Compression's second stage. For comparison, a
# dense model trained with the same optimizer, epochs and batches.

# %%
final = jc.training.finalize(params, opt_state)
rich.print(jc.summarize(params, final).table(title="after gradual pruning"))
assert bool(jnp.all(jc.materialize(final)["dense1"]["kernel"] == params["dense1"]["kernel"]))

clustered, _ = jc.cluster(bits=5)(final)
dense = fit_classifier(model, init, train_x, train_y, epochs=EPOCHS, learning_rate=1e-3, seed=0)
rows = [
    ("dense, same training", dense),
    ("gradual pruning 90 %", final),
    ("+ 5-bit k-means", clustered),
]
show_table(
    ["parameters", "bytes", "ratio", "test accuracy"],
    [
        (
            name,
            f"{jc.nbytes(tree):,}",
            f"{jc.nbytes(dense) / jc.nbytes(tree):.1f}x",
            f"{accuracy(model, tree, test_x, test_y):.2%}",
        )
        for name, tree in rows
    ],
)

# %% [markdown]
# Is gradual pruning better than pruning once and retraining with the mask
# fixed, as in `01_quickstart.ipynb`? Not on these digits:
# `benchmarks/schedule_ablation.py` compares both at equal epochs over three
# seeds, and one-shot pruning plus retraining came out ahead (see
# `benchmarks/results/schedule_ablation.md`).
