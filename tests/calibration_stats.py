"""Calibration statistics built by hand for tests (as ``jaxcompress.calibrate`` gives them)."""

import jax.numpy as jnp
import numpy as np

from jaxcompress.calibration.calibrate import InputStats


def stats_of(x):
    """InputStats of activations ``x`` (rows are samples), as calibration would give."""
    x = np.asarray(x, np.float32)
    return InputStats(
        count=jnp.float32(x.shape[0]),
        mean=jnp.asarray(x.mean(0)),
        gram=jnp.asarray(x.T @ x / np.float32(x.shape[0])),
        class_count=None,
        class_mean=None,
    )


def gram_stats(gram):
    """InputStats whose Gram is ``gram`` (one sample, zero mean)."""
    gram = jnp.asarray(gram, jnp.float32)
    return InputStats(jnp.float32(1), jnp.zeros(gram.shape[0]), gram, None, None)
