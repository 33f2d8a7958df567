"""Reference models for compression experiments, in both flax linen and flax nnx.

Each architecture exists twice with identical layer names (``dense1``, ``conv1``, ...), so
parameter paths such as ``dense1/kernel`` line up between the two APIs. Inputs are float32:
``(batch, features)`` for the MLPs and NHWC ``(batch, height, width, channels)`` for the CNNs.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax import nnx

__all__ = ["LeNet5", "LeNet5NNX", "LeNet300100", "LeNet300100NNX"]


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    # flax's avg_pool divides by an int32 window count, which strict dtype promotion rejects.
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


class LeNet300100(nn.Module):
    """LeNet-300-100 MLP (linen): ``in -> 300 -> 100 -> num_classes`` with ReLU.

    The input width is inferred at ``init`` time from the example input.

    Attributes:
        num_classes: Number of output logits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = LeNet300100()
        >>> params = model.init(jax.random.key(0), jnp.zeros((3, 64)))["params"]
        >>> params["dense1"]["kernel"].shape
        (64, 300)
        >>> model.apply({"params": params}, jnp.zeros((3, 64))).shape
        (3, 10)
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for ``x`` of shape ``(batch, in)``."""
        x = nn.relu(nn.Dense(300, name="dense1")(x))
        x = nn.relu(nn.Dense(100, name="dense2")(x))
        return nn.Dense(self.num_classes, name="dense3")(x)


class LeNet300100NNX(nnx.Module):
    """LeNet-300-100 MLP (nnx): ``in_features -> 300 -> 100 -> num_classes`` with ReLU.

    Args:
        in_features: Width of the flattened input.
        num_classes: Number of output logits.
        rngs: Random streams used to initialise the parameters.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = LeNet300100NNX(rngs=nnx.Rngs(0))
        >>> model.dense1.kernel.shape
        (64, 300)
        >>> model(jnp.zeros((3, 64))).shape
        (3, 10)
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, *, rngs: nnx.Rngs) -> None:
        self.dense1 = nnx.Linear(in_features, 300, rngs=rngs)
        self.dense2 = nnx.Linear(300, 100, rngs=rngs)
        self.dense3 = nnx.Linear(100, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for ``x`` of shape ``(batch, in)``."""
        x = nnx.relu(self.dense1(x))
        x = nnx.relu(self.dense2(x))
        return self.dense3(x)


class LeNet5(nn.Module):
    """LeNet-5-style CNN (linen) sized for small NHWC images such as 8x8x1 digits.

    ``conv1`` (6 @ 3x3, SAME) -> ReLU -> 2x2 avg pool -> ``conv2`` (16 @ 3x3, SAME) -> ReLU
    -> 2x2 avg pool -> flatten -> ``dense1`` (120) -> ReLU -> ``dense2`` (84) -> ReLU ->
    ``dense3`` (num_classes). 3x3 kernels replace LeNet-5's 5x5 because 8x8 inputs are tiny.

    Attributes:
        num_classes: Number of output logits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = LeNet5()
        >>> params = model.init(jax.random.key(0), jnp.zeros((3, 8, 8, 1)))["params"]
        >>> params["conv1"]["kernel"].shape, params["dense1"]["kernel"].shape
        ((3, 3, 1, 6), (64, 120))
        >>> model.apply({"params": params}, jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for NHWC input ``x``."""
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = _avg_pool_2x2(x)
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="conv2")(x))
        x = _avg_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="dense1")(x))
        x = nn.relu(nn.Dense(84, name="dense2")(x))
        return nn.Dense(self.num_classes, name="dense3")(x)


class LeNet5NNX(nnx.Module):
    """LeNet-5-style CNN (nnx), layer for layer the same as :class:`LeNet5`.

    Args:
        in_channels: Channels of the NHWC input.
        num_classes: Number of output logits.
        input_size: Height and width of the (square) input; sets ``dense1``'s input width.
            Must be divisible by 4 (two 2x2 pools).
        rngs: Random streams used to initialise the parameters.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = LeNet5NNX(rngs=nnx.Rngs(0))
        >>> model.dense1.kernel.shape
        (64, 120)
        >>> model(jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        input_size: int = 8,
        rngs: nnx.Rngs,
    ) -> None:
        if input_size % 4:
            raise ValueError(f"input_size must be divisible by 4, got {input_size}")
        self.conv1 = nnx.Conv(in_channels, 6, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (3, 3), padding="SAME", rngs=rngs)
        # Two 2x2 pools shrink each spatial side by 4 before flattening.
        flat = 16 * (input_size // 4) ** 2
        self.dense1 = nnx.Linear(flat, 120, rngs=rngs)
        self.dense2 = nnx.Linear(120, 84, rngs=rngs)
        self.dense3 = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for NHWC input ``x``."""
        x = _avg_pool_2x2(nnx.relu(self.conv1(x)))
        x = _avg_pool_2x2(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense1(x))
        x = nnx.relu(self.dense2(x))
        return self.dense3(x)
