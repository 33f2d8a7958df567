"""The ``jaxcompress demo`` job: train LeNet-300-100 on digits, prune it, fine-tune, report.

Everything runs on the embedded digits data, so the demo needs no network.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import Progress

from jaxcompress.arrays import Sparse, is_compressed
from jaxcompress.data import load_digits
from jaxcompress.models import LeNet300100
from jaxcompress.prune import prune
from jaxcompress.report import Report, summarize
from jaxcompress.runtime import materialize

_BATCH = 64


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured.

    Attributes:
        dense_accuracy: test accuracy of the trained dense model.
        compressed_accuracy: test accuracy of the pruned, fine-tuned model.
        sparsity: fraction of kernel entries pruned.
        scope: ``"layer"`` or ``"global"``.
        ratio: original bytes over true compressed bytes, whole parameter tree.
        report: the per-leaf :class:`~jaxcompress.Report`.
        seed: the seed used for init and data order.
        seconds: wall time of the whole run.
    """

    dense_accuracy: float
    compressed_accuracy: float
    sparsity: float
    scope: str
    ratio: float
    report: Report
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as plain values for JSON."""
        return {
            "dense_accuracy": self.dense_accuracy,
            "compressed_accuracy": self.compressed_accuracy,
            "sparsity": self.sparsity,
            "scope": self.scope,
            "ratio": self.ratio,
            "original_bytes": self.report.original_bytes,
            "compressed_bytes": self.report.compressed_bytes,
            "seed": self.seed,
            "seconds": self.seconds,
            "report": self.report.to_dict(),
        }


def _keep_masks(compressed: Any) -> Any:
    """1.0 where a weight is kept, 0.0 where pruned; all ones for untouched leaves."""

    def mask_of(leaf):
        if isinstance(leaf, Sparse):
            return leaf.keep_mask().astype(leaf.dtype)
        return jnp.ones_like(leaf)

    return jax.tree.map(mask_of, compressed, is_leaf=is_compressed)


def fit_classifier(
    model: Any,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    seed: int,
    masks: Any = None,
    forward: Callable[[Any], Any] | None = None,
    progress: Progress | None = None,
    description: str = "training",
) -> Any:
    """Trains a flax linen classifier with Adam and softmax cross-entropy.

    Args:
        model: a linen module whose ``apply({"params": p}, x)`` returns logits.
        params: its initial parameters.
        images: training inputs.
        labels: int32 class labels.
        epochs: passes over the data, in full batches of 64 (the remainder is dropped).
        learning_rate: Adam's step size.
        seed: seed of the data order.
        masks: optional pytree of 0/1 arrays like ``params``; gradients and weights are
            multiplied by it, so masked weights stay exactly zero.
        forward: optional ``params -> params`` applied inside the loss, for example
            ``jaxcompress.training.fake_quant(4)`` for quantization-aware training.
        progress: a ``rich`` progress display to advance once per epoch.
        description: the progress bar's label.

    Returns:
        The trained parameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.models import LeNet300100
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
        >>> images, labels = np.zeros((64, 64), np.float32), np.zeros(64, np.int32)
        >>> trained = fit_classifier(model, params, images, labels, epochs=1,
        ...                          learning_rate=1e-3, seed=0)
        >>> jax.tree.structure(trained) == jax.tree.structure(params)
        True
    """
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    masks = masks if masks is not None else jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": forward(p) if forward else p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.tree.map(jnp.multiply, jax.grad(loss_fn)(params), masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Re-applying the mask keeps pruned weights exactly zero.
        params = jax.tree.map(jnp.multiply, optax.apply_updates(params, updates), masks)
        return params, opt_state

    order_rng = np.random.default_rng(seed)
    steps_per_epoch = len(labels) // _BATCH
    task = progress.add_task(description, total=epochs) if progress else None
    # optax's Adam bias correction mixes float and int32 counts; keep standard promotion
    # here so the demo also runs for users who switched on strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(epochs):
            permutation = order_rng.permutation(len(labels))
            for batch in range(steps_per_epoch):
                index = permutation[batch * _BATCH : (batch + 1) * _BATCH]
                params, opt_state = step(params, opt_state, images[index], labels[index])
            if progress is not None:
                progress.advance(task)
    return params


def accuracy(model: Any, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` with (dense or compressed) ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.models import LeNet300100
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
        >>> images, labels = np.zeros((4, 64), np.float32), np.zeros(4, np.int32)
        >>> 0.0 <= accuracy(model, params, images, labels) <= 1.0
        True
    """
    logits = jax.jit(model.apply)({"params": materialize(params)}, images)
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


def run_demo(
    *,
    seed: int = 0,
    sparsity: float = 0.9,
    scope: str = "global",
    epochs: int = 40,
    finetune_epochs: int = 40,
    progress: Progress | None = None,
) -> DemoResult:
    """Trains LeNet-300-100 on the embedded digits, prunes it, fine-tunes it, measures it.

    The steps: train dense; :func:`jaxcompress.prune` the kernels one-shot; fine-tune the
    kept weights with the mask fixed; prune again (the pruned weights are exactly zero,
    so the mask does not change) to get the final :class:`~jaxcompress.Sparse` tree.

    Args:
        seed: seed for initialization and data order.
        sparsity: fraction of kernel entries to prune, in ``[0, 1)``.
        scope: ``"global"`` (one threshold over all kernels) or ``"layer"``.
        epochs: dense training epochs.
        finetune_epochs: masked fine-tuning epochs after pruning.
        progress: a ``rich`` progress display to report training on, or ``None``.

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> result = run_demo(sparsity=0.8, epochs=2, finetune_epochs=1)
        >>> result.sparsity, result.ratio > 3
        (0.8, True)
    """
    prune_tx = prune(sparsity, scope=scope)  # validates sparsity and scope before training
    start = time.perf_counter()
    train_images, train_labels = load_digits(split="train")
    test_images, test_labels = load_digits(split="test")
    model = LeNet300100()
    params = model.init(jax.random.key(seed), train_images[:1])["params"]
    fit = dict(progress=progress, seed=seed)
    dense = fit_classifier(
        model, params, train_images, train_labels,
        epochs=epochs, learning_rate=1e-3, description="dense training", **fit,
    )  # fmt: skip
    one_shot, _ = prune_tx(dense)
    tuned = fit_classifier(
        model, materialize(one_shot), train_images, train_labels,
        epochs=finetune_epochs, learning_rate=1e-3, masks=_keep_masks(one_shot),
        description="masked fine-tune", **fit,
    )  # fmt: skip
    compressed, _ = prune_tx(tuned)
    report = summarize(dense, compressed)
    return DemoResult(
        dense_accuracy=accuracy(model, dense, test_images, test_labels),
        compressed_accuracy=accuracy(model, compressed, test_images, test_labels),
        sparsity=float(sparsity),
        scope=scope,
        ratio=report.ratio,
        report=report,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
