# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/05_structured_pruning.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # Structured pruning: a physically smaller model, found by tracing
#
# Unstructured zeros save bytes but rarely time. Removing whole units (Dense
# outputs, conv channels, attention heads) leaves *smaller dense matrices*,
# which are faster on any hardware. `jc.prune_units` finds which axes must be
# cut together by reading the traced computation, the way Torch-Pruning's
# DepGraph does for PyTorch, so it needs no layer rules: a Dense layer's
# output units go with its bias and the next layer's input rows, conv
# channels with their BatchNorm statistics, residual branches with each
# other, attention heads across query, key, value and output.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/05_structured_pruning.ipynb)

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
# ## A trained model and its coupled groups
#
# LeNet-300-100 on the embedded 8x8 digits. `jc.coupled_groups` traces
# `apply(params, x)` and lists each group of units that must go together, with
# why a group is left whole (here the output layer: its units are the logits).

# %%
train_x, train_y = load_digits(split="train")
test_x, test_y = load_digits(split="test")
model = LeNet300100()
params = model.init(jax.random.key(0), train_x[:1])["params"]
epochs = 8 if SMALL else 20
params = fit_classifier(model, params, train_x, train_y, epochs=epochs, learning_rate=1e-3, seed=0)


def apply(p, x):
    return model.apply({"params": p}, x)


example = train_x[:64]
groups = jc.coupled_groups(apply, params, example)
show_table(
    ["group", "units", "slices cut together", "left whole because"],
    [
        [g.name, g.size, ", ".join(f"{p}[{a}]" for p, a in g.members), g.reason or ""]
        for g in groups
    ],
)
dense_accuracy = accuracy(model, params, test_x, test_y)
print(f"dense test accuracy: {dense_accuracy:.2%}")

# %% [markdown]
# ## Remove half of every hidden layer's units
#
# `thinned` has the same structure as `params`, with smaller arrays.
# `stats.apply_fn` runs it: the traced program replayed with the new shapes
# (a linen module would refuse parameters of other shapes). It equals the
# dense model with the removed units' weights zeroed (`stats.masked`).

# %%
tx = jc.prune_units(0.5, importance="l2", apply_fn=apply, example_input=example)
thinned, stats = tx(params)
print(jax.tree.map(jnp.shape, thinned))
display(Markdown(stats.table()))
run_thinned = jax.jit(stats.apply_fn)
gap = jnp.max(jnp.abs(run_thinned(thinned, test_x) - apply(stats.masked(params), test_x)))
print(f"max |thinned - masked dense| = {float(gap):.2e}")


def thinned_accuracy(tree):
    return float(jnp.mean(jnp.argmax(run_thinned(tree, test_x), -1) == test_y))


print(f"thinned, no fine-tune: {thinned_accuracy(thinned):.2%}")

# %% [markdown]
# ## Fine-tune the thinned model
#
# The thinned tree trains like any pytree: differentiate through
# `stats.apply_fn`.

# %%
optimizer = optax.adam(1e-3)


@jax.jit
def step(tree, opt_state, x, y):
    def loss_fn(t):
        logits = stats.apply_fn(t, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jc.training.value_and_grad(loss_fn)(tree)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(tree, updates), opt_state, loss


tuned, opt_state = thinned, optimizer.init(thinned)
order = np.random.default_rng(0)
for _ in range(3 if SMALL else 10):
    perm = order.permutation(len(train_y))
    for start in range(0, len(perm) - 63, 64):
        batch = perm[start : start + 64]
        tuned, opt_state, loss = step(tuned, opt_state, train_x[batch], train_y[batch])
print(f"thinned + fine-tune: {thinned_accuracy(tuned):.2%}")

# %% [markdown]
# ## Which layer can lose more? Sensitivity and a budget
#
# `jc.sensitivity(..., method="units")` prunes one group at a time at each
# level and records the metric; `allocate` then spreads a global budget where
# it costs least, and the result feeds `prune_units` directly.


# %%
def eval_fn(p):
    return accuracy(model, p, train_x[:512], train_y[:512])


by_units = {"method": "units", "example_input": example}
report = jc.sensitivity(apply, params, eval_fn, levels=(0.25, 0.5, 0.75, 0.9), **by_units)
display(Markdown(report.table()))
report.plot()
plt.show()
allocation = report.allocate(0.6)
print({name: round(float(f), 3) for name, f in allocation.items()})
rows = []
for label, fraction in (("uniform 60 %", 0.6), ("allocated, 60 % overall", allocation)):
    tree, pruned = jc.prune_units(fraction, apply_fn=apply, example_input=example)(params)
    logits = jax.jit(pruned.apply_fn)(tree, test_x)
    rows.append(
        [
            label,
            ", ".join(f"{g.size - g.removed}/{g.size}" for g in pruned.groups),
            f"{float(jnp.mean(jnp.argmax(logits, -1) == test_y)):.2%}",
            f"{pruned.flops[0] / pruned.flops[1]:.2f}x",
        ]
    )
show_table(["pruning", "units kept", "test accuracy (no fine-tune)", "fewer FLOPs"], rows)
