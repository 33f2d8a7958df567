"""The ``jaxcompress demo`` job: Deep Compression of LeNet-300-100 on the embedded digits.

Train dense, prune gradually, cluster the kept weights, fine-tune the centroids, and
save the result with :func:`jaxcompress.save`. Everything runs on the embedded digits
data, so the demo needs no network.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from rich.progress import Progress

from jaxcompress.arrays import Sparse, is_compressed
from jaxcompress.arrays.tree import nbytes
from jaxcompress.core.paths import path_to_str
from jaxcompress.examples.classifier import fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100
from jaxcompress.examples.pipeline import deep_compression
from jaxcompress.io.files import FileReport, save
from jaxcompress.methods.prune import prune
from jaxcompress.runtime.report import Report, summarize


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One parameter leaf through the pipeline's stages.

    Attributes:
        path: the leaf path.
        shape: its shape.
        kept: fraction of entries kept by pruning (1.0 for unpruned leaves).
        index_bits: bits per stored value (cluster index or quantized code), or ``None``.
        dense_bytes: float32 bytes.
        pruned_bytes: bytes after pruning (kept values + bitmap).
        clustered_bytes: bytes after clustering or quantization (bit-packed in memory).
        file_bytes: bytes in the saved file (relative indices, rANS-coded streams).
    """

    path: str
    shape: tuple[int, ...]
    kept: float
    index_bits: int | None
    dense_bytes: int
    pruned_bytes: int
    clustered_bytes: int
    file_bytes: int


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured.

    Attributes:
        stage_accuracies: test accuracy after each stage (``dense``, ``pruned``,
            ``clustered``, ``fine-tuned``).
        stage_bytes: bytes after each stage (in memory) and of the saved ``file``.
        sparsity: fraction of kernel entries pruned.
        scope: ``"layer"`` or ``"global"``.
        bits: cluster index bits for the kernels.
        layers: one :class:`LayerRow` per parameter leaf.
        report: the per-leaf :class:`~jaxcompress.Report` of dense against fine-tuned.
        file: the :class:`~jaxcompress.FileReport` of the saved file.
        seed: the seed used for init and data order.
        seconds: wall time of the whole run.
    """

    stage_accuracies: dict[str, float]
    stage_bytes: dict[str, int]
    sparsity: float
    scope: str
    bits: int
    layers: tuple[LayerRow, ...]
    report: Report
    file: FileReport
    seed: int
    seconds: float

    @property
    def dense_accuracy(self) -> float:
        """Test accuracy of the trained dense model."""
        return self.stage_accuracies["dense"]

    @property
    def compressed_accuracy(self) -> float:
        """Test accuracy of the final (fine-tuned, saved) model."""
        return self.stage_accuracies["fine-tuned"]

    @property
    def ratio(self) -> float:
        """Dense bytes over the saved file's bytes (header included)."""
        return self.stage_bytes["dense"] / self.stage_bytes["file"]

    def to_dict(self) -> dict[str, Any]:
        """The result as plain values for JSON."""
        return {
            "dense_accuracy": self.dense_accuracy,
            "compressed_accuracy": self.compressed_accuracy,
            "stage_accuracies": self.stage_accuracies,
            "stage_bytes": self.stage_bytes,
            "sparsity": self.sparsity,
            "scope": self.scope,
            "bits": self.bits,
            "ratio": self.ratio,
            "original_bytes": self.stage_bytes["dense"],
            "compressed_bytes": self.stage_bytes["file"],
            "output": self.file.path,
            "seed": self.seed,
            "seconds": self.seconds,
            "layers": [
                {**dataclasses.asdict(row), "shape": list(row.shape)} for row in self.layers
            ],
            "report": self.report.to_dict(),
            "file": self.file.to_dict(),
        }


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
    return {path_to_str(key_path): leaf for key_path, leaf in flat}


def _layer_rows(dense: Any, sparse: Any, shared: Any, file: FileReport) -> tuple[LayerRow, ...]:
    pruned_leaves, shared_leaves = _leaves_by_path(sparse), _leaves_by_path(shared)
    stored = {leaf.path: leaf.stored_bytes for leaf in file.leaves}
    rows = []
    for path, weight in _leaves_by_path(dense).items():
        pruned_leaf, final = pruned_leaves[path], shared_leaves[path]
        kept = pruned_leaf.density if isinstance(pruned_leaf, Sparse) else 1.0
        inner = final.values if isinstance(final, Sparse) else final
        bits = getattr(inner, "bits", None)  # Clustered index or Quantized code width
        rows.append(
            LayerRow(
                path=path,
                shape=tuple(weight.shape),
                kept=kept,
                index_bits=bits,
                dense_bytes=nbytes(weight),
                pruned_bytes=nbytes(pruned_leaf),
                clustered_bytes=nbytes(final),
                file_bytes=stored[path],
            )
        )
    return tuple(rows)


def run_demo(
    *,
    seed: int = 0,
    sparsity: float = 0.94,
    scope: str = "global",
    bits: int = 4,
    epochs: int = 40,
    prune_epochs: int = 60,
    finetune_epochs: int = 10,
    output: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Deep Compression of LeNet-300-100 on the embedded digits, saved to a file.

    The steps (see :func:`jaxcompress.examples.pipeline.deep_compression`): train dense; prune
    gradually to ``sparsity`` with the cubic schedule; cluster the kept kernel values
    to ``2**bits`` shared values and the biases to 8 bits; fine-tune the centroids;
    :func:`jaxcompress.save` with entropy coding.

    Args:
        seed: seed for initialization and data order.
        sparsity: fraction of kernel entries to prune, in ``[0, 1)``.
        scope: ``"global"`` (one threshold over all kernels) or ``"layer"``.
        bits: cluster index bits for the kernels, 1 to 8.
        epochs: dense training epochs.
        prune_epochs: gradual pruning epochs.
        finetune_epochs: centroid fine-tuning epochs.
        output: where to save; by default a new temporary directory.
        progress: a ``rich`` progress display to report training on, or ``None``.

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> result = run_demo(sparsity=0.8, epochs=2, prune_epochs=2, finetune_epochs=1)
        >>> result.sparsity, result.ratio > 10, os.path.exists(result.file.path)
        (0.8, True, True)
    """
    prune(sparsity, scope=scope)  # validates sparsity and scope before training
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")
    start = time.perf_counter()
    train, test = load_digits(split="train"), load_digits(split="test")
    model = LeNet300100()
    params = model.init(jax.random.key(seed), train[0][:1])["params"]
    dense = fit_classifier(
        model, params, *train, epochs=epochs, learning_rate=1e-3, seed=seed,
        progress=progress, description="dense training",
    )  # fmt: skip
    stages = deep_compression(
        model, dense, train, test, sparsity=sparsity, scope=scope, bits=bits,
        prune_epochs=prune_epochs, finetune_epochs=finetune_epochs, seed=seed,
        progress=progress,
    )  # fmt: skip
    final = stages[-1].params
    path = Path(output) if output else Path(tempfile.mkdtemp()) / "lenet-300-100.jxc"
    file = save(path, final, metadata={"model": "LeNet-300-100", "data": "UCI digits 8x8"})
    stage_bytes = {stage.name: nbytes(stage.params) for stage in stages}
    stage_bytes["file"] = file.file_bytes
    return DemoResult(
        stage_accuracies={stage.name: stage.accuracy for stage in stages},
        stage_bytes=stage_bytes,
        sparsity=float(sparsity),
        scope=scope,
        bits=bits,
        layers=_layer_rows(dense, stages[1].params, final, file),
        report=summarize(dense, final),
        file=file,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
