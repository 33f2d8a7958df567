"""Data-free against data-aware compression of the real MiniLM-L6 encoder.

The 36 encoder matrices of all-MiniLM-L6-v2 are compressed one-shot, with no
retraining, by each naive recipe and its data-aware counterpart:

- int4 with groups of 128: round-to-nearest against GPTQ (``method="gptq"``), with and
  without ``act_order``;
- 50 % unstructured: magnitude against Wanda and SparseGPT (``importance=``);
- 2:4 (``jc.prune_nm``): magnitude against Wanda.

Calibration: ``jc.calibrate`` statistics of each matrix's inputs on 256 sentences.
Evaluation: 512 *different* sentences (both sets are the docstring first sentences of
``benchmarks/minilm.py``). Reported per recipe: bytes of the matrices against dense
float32, the cosine of each sentence embedding to the dense one (mean and minimum),
and top-1 nearest-neighbour agreement (for each sentence, whether its most similar
other sentence is the same as with the dense model).

Not covered yet (issue 10): AWQ, sensitivity-weighted k-means, SparseGPT with N:M
patterns, and the digits MLP / LeNet-5 accuracy rows.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/data_aware.py``
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minilm as sentences  # noqa: E402
from _results import markdown_table, write  # noqa: E402

import jaxcompress as jc  # noqa: E402
from jaxcompress.minilm import encode, load_minilm  # noqa: E402

COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/data_aware.py"
MATRICES = r"layer_\d+/.*/kernel"
TARGETS = {"int4 g128": 0.99, "50 % unstructured": 0.97, "2:4": 0.95}
RECIPES = [
    ("int4 g128", "round to nearest", jc.quantize(4, group_size=128, where=MATRICES)),
    ("int4 g128", "GPTQ", jc.quantize(4, group_size=128, method="gptq", where=MATRICES)),
    (
        "int4 g128",
        "GPTQ, act_order",
        jc.quantize(4, group_size=128, method="gptq", act_order=True, where=MATRICES),
    ),
    ("50 % unstructured", "magnitude", jc.prune(0.5, where=MATRICES)),
    ("50 % unstructured", "Wanda", jc.prune(0.5, importance="wanda", where=MATRICES)),
    ("50 % unstructured", "SparseGPT", jc.prune(0.5, importance="sparsegpt", where=MATRICES)),
    ("2:4", "magnitude", jc.prune_nm("2:4", where=MATRICES)),
    ("2:4", "Wanda", jc.prune_nm("2:4", importance="wanda", where=MATRICES)),
]


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def matrix_bytes(tree) -> int:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jc.is_compressed)[0]
    return sum(
        jc.nbytes(leaf)
        for path, leaf in flat
        if sentences._matches(MATRICES, jc.filters.path_to_str(path))
    )


def main() -> None:
    evaluation, calibration, _ = sentences.split_sentences(512, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused pooler is named in a warning
        params, config = load_minilm(dtype=jnp.float32)
    embed = jax.jit(functools.partial(encode, config=config))
    batches, _ = sentences.bucketed_batches(evaluation)
    n = len(evaluation)
    dense = sentences.embed_all(embed, params, batches, n)
    dense_neighbours = nearest_neighbours(dense)
    print("calibrating", file=sys.stderr, flush=True)
    data = sentences.calibration_statistics(params, config, calibration)
    dense_bytes = matrix_bytes(params)
    rows, table = [], []
    for recipe, method, transform in RECIPES:
        start = time.perf_counter()
        tree, _ = transform(params, data=data)
        jax.block_until_ready(tree)
        seconds = time.perf_counter() - start
        compressed = sentences.embed_all(embed, jc.materialize(tree), batches, n)
        cosine = (compressed * dense).sum(axis=-1)
        agreement = float(np.mean(nearest_neighbours(compressed) == dense_neighbours))
        target = TARGETS[recipe]
        row = {
            "recipe": recipe,
            "method": method,
            "ratio": dense_bytes / matrix_bytes(tree),
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
            "nn_agreement": agreement,
            "compress_seconds": seconds,
            "target": target,
            "target_met": bool(cosine.mean() >= target),
        }
        rows.append(row)
        verdict = "met" if row["target_met"] else f"**missed** by {target - cosine.mean():.4f}"
        table.append(
            [
                recipe,
                method,
                f"{row['ratio']:.2f}x",
                f"{row['cosine_mean']:.5f}",
                f"{row['cosine_min']:.5f}",
                f"{agreement:.3f}",
                f"{seconds:.1f}",
                f">= {target}: {verdict}",
            ]
        )
        print(table[-1], file=sys.stderr, flush=True)
    body = f"""
{n} evaluation sentences, 256 other sentences for calibration; the 36 encoder matrices
only (embeddings, biases and norms dense). No retraining.

{
        markdown_table(
            [
                "recipe",
                "method",
                "ratio (matrices)",
                "cos mean",
                "cos min",
                "top-1 NN agreement",
                "compress s",
                "target (mean cosine)",
            ],
            table,
        )
    }

The data-aware methods use the inputs' Gram matrices (damping 0.01 of their mean
diagonal). Compression time includes compiling the per-layer programs.
"""
    path = write(
        "data_aware",
        title="MiniLM-L6: data-free against data-aware compression (no retraining)",
        command=COMMAND,
        body_markdown=body,
        data={"rows": rows, "evaluation_sentences": n, "calibration_sentences": 256},
    )
    print(path)


if __name__ == "__main__":
    main()
