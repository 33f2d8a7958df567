"""Training and scoring flax linen classifiers on in-memory arrays (demo and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import Progress

from jaxcompress.arrays.tree import materialize
from jaxcompress.training.grads import grad

_BATCH = 64


def train_classifier(
    model: Any,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    seed: int,
    masks: Any = None,
    forward: Callable[[Any], Any] | None = None,
    progress: Progress | None = None,
    description: str = "training",
    teacher: Any = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
) -> tuple[Any, Any]:
    """Trains a flax linen classifier with any optax optimizer and softmax cross-entropy.

    With ``teacher`` (the dense parameters of the same model), the loss also
    distils from it (Hinton et al. 2015): ``(1 - a) * CE(labels) + a * T^2 *
    KL(softmax(teacher / T) || softmax(student / T))`` with ``a = distill_weight`` and
    ``T = temperature``, so a pruned or clustered student learns the dense model's
    soft targets as well as the labels.

    The loss sees :func:`jaxcompress.materialize` of the params, and gradients are
    taken with :func:`jaxcompress.training.grad` (floating children only), so
    compressed params (``Clustered`` leaves for
    centroid fine-tuning) train as they are, with an optimizer such as
    :func:`jaxcompress.training.clustered`; wrappers that need the params in
    ``update`` (such as :func:`jaxcompress.training.pruned`) get them.

    Args:
        model: a linen module whose ``apply({"params": p}, x)`` returns logits.
        params: its initial parameters (dense or compressed).
        images: training inputs.
        labels: int32 class labels.
        optimizer: the optax transformation.
        epochs: passes over the data, in full batches of 64 (the remainder is dropped).
        seed: seed of the data order.
        masks: optional pytree of 0/1 arrays like ``params`` (dense params only);
            gradients and weights are multiplied by it, so masked weights stay zero.
        forward: optional ``params -> params`` applied inside the loss, for example
            ``jaxcompress.training.fake_quant(4)`` for quantization-aware training.
        progress: a ``rich`` progress display to advance once per epoch.
        description: the progress bar's label.
        teacher: optional dense parameters of ``model`` to distil from.
        distill_weight: the weight ``a`` of the distillation term, in ``[0, 1]``.
        temperature: the softmax temperature ``T > 0`` of the distillation term.

    Returns:
        ``(params, opt_state)`` after training.

    Raises:
        ValueError: ``distill_weight`` outside ``[0, 1]`` or ``temperature <= 0``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
        >>> images, labels = np.zeros((64, 64), np.float32), np.zeros(64, np.int32)
        >>> trained, state = train_classifier(model, params, images, labels,
        ...     optimizer=optax.sgd(0.1), epochs=1, seed=0)
        >>> jax.tree.structure(trained) == jax.tree.structure(params)
        True
    """
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(
            f"train_classifier: distill_weight must be in [0, 1], got {distill_weight}"
        )
    if not temperature > 0.0:
        raise ValueError(f"train_classifier: temperature must be > 0, got {temperature}")
    teacher_params = None if teacher is None else materialize(teacher)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            dense = materialize(p)
            logits = model.apply({"params": forward(dense) if forward else dense}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if teacher_params is None:
                return loss
            soft = jax.nn.softmax(model.apply({"params": teacher_params}, x) / temperature)
            # Cross-entropy to the soft targets: KL up to the teacher's entropy, a constant.
            kd = optax.softmax_cross_entropy(logits / temperature, soft).mean()
            return (1.0 - distill_weight) * loss + distill_weight * temperature**2 * kd

        grads = grad(loss_fn)(params)
        if masks is not None:
            grads = jax.tree.map(jnp.multiply, grads, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            # Re-applying the mask keeps pruned weights exactly zero.
            params = jax.tree.map(jnp.multiply, params, masks)
        return params, opt_state

    order_rng = np.random.default_rng(seed)
    steps_per_epoch = len(labels) // _BATCH
    task = progress.add_task(description, total=epochs) if progress is not None else None
    # optax's Adam bias correction mixes float and int32 counts; keep standard promotion
    # here so the demo also runs for users who switched on strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
        for _ in range(epochs):
            permutation = order_rng.permutation(len(labels))
            for batch in range(steps_per_epoch):
                index = permutation[batch * _BATCH : (batch + 1) * _BATCH]
                params, opt_state = step(params, opt_state, images[index], labels[index])
            if progress is not None and task is not None:
                progress.advance(task)
    return params, opt_state


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
    """Trains a flax linen classifier with Adam; :func:`train_classifier` without the state.

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
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
        >>> images, labels = np.zeros((64, 64), np.float32), np.zeros(64, np.int32)
        >>> trained = fit_classifier(model, params, images, labels, epochs=1,
        ...                          learning_rate=1e-3, seed=0)
        >>> jax.tree.structure(trained) == jax.tree.structure(params)
        True
    """
    trained, _ = train_classifier(
        model, params, images, labels,
        optimizer=optax.adam(learning_rate), epochs=epochs, seed=seed, masks=masks,
        forward=forward, progress=progress, description=description,
    )  # fmt: skip
    return trained


def accuracy(model: Any, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` with (dense or compressed) ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
        >>> images, labels = np.zeros((4, 64), np.float32), np.zeros(4, np.int32)
        >>> 0.0 <= accuracy(model, params, images, labels) <= 1.0
        True
    """
    logits = jax.jit(model.apply)({"params": materialize(params)}, images)
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))
