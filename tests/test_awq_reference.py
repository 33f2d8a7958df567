"""awq_search against a brute-force numpy reference on adversarial small inputs.

The reference evaluates every candidate of both grids in float64, with the objective
written out plainly: the output error on the calibration rows, by blocks of inputs for
the search (``Σ_b ‖X_b E_b‖²``) and in full for the final pick (``‖X E‖²``). Ties and
float rounding can make two implementations pick different candidates of the same
loss, so the checks compare losses, not indices: the fast path's picks must reach the
reference's minima.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.arrays.quantized import decode
from jaxcompress.numerics.awq import awq_search, input_magnitudes, inverse_scales
from jaxcompress.numerics.uniform import quantize_codes

GROUP, BITS, GRID, CLIP_GRID = 4, 3, 5, 5


def _options(symmetric):
    return dict(
        bits=BITS,
        symmetric=symmetric,
        calibration="absmax",
        percentile=99.9,
        scale_dtype=jnp.float32,
    )


def _quantizer(symmetric):
    def quantize(v):
        codes, scale, zero, _ = quantize_codes(v, axis=1, group_size=GROUP, **_options(symmetric))
        return codes, scale, zero

    def restore(codes, scale, zero):
        return decode(
            codes,
            scale,
            zero,
            dtype=jnp.float32,
            shape=codes.shape,
            axis=1,
            group_size=GROUP,
            bits=BITS,
        )

    return quantize, restore


@functools.partial(jax.jit, static_argnames=("symmetric",))
def _fast(w, gram, symmetric):
    quantize, restore = _quantizer(symmetric)
    (codes, scale, zero, r), stats = awq_search(
        w,
        gram,
        fan_in=1,
        axis=-1,
        group_size=GROUP,
        symmetric=symmetric,
        grid=GRID,
        clip_grid=CLIP_GRID,
        scale_dtype=jnp.float32,
        quantize=quantize,
        decode=restore,
    )
    return restore(codes, scale, zero) * r[:, None], stats


def _reference_candidate(w, gram, alpha, ratio, symmetric):
    """Ŵ for one alpha and one clipping ratio for every group (numpy, plain loops)."""
    a = input_magnitudes(jnp.asarray(gram))  # the scales' own tests are in test_awq.py
    r = np.asarray(inverse_scales(a, alpha, jnp.float32))
    scaled = w / r[:, None]
    for g0 in range(0, w.shape[0], GROUP):
        for j in range(w.shape[1]):
            v = scaled[g0 : g0 + GROUP, j]
            if ratio < 1:
                if symmetric:
                    top = np.abs(v).max() * np.float32(ratio)
                    v = np.clip(v, -top, top)
                else:
                    centre = (v.max() + v.min()) * np.float32(0.5)
                    half = (v.max() - v.min()) * np.float32(0.5)
                    rho = np.float32(ratio)
                    v = np.clip(v, centre - rho * half, centre + rho * half)
                scaled[g0 : g0 + GROUP, j] = v
    quantize, restore = _quantizer(symmetric)
    restored = np.asarray(restore(*quantize(jnp.asarray(scaled, jnp.float32))))
    return restored * r[:, None]


def _group_losses(error, x):
    """``‖X_b e_bj‖² / rows`` per group ``b`` of inputs and column ``j``, float64."""
    m, n = error.shape
    return np.array(
        [
            [np.sum((x[:, g0 : g0 + GROUP] @ error[g0 : g0 + GROUP, j]) ** 2) for j in range(n)]
            for g0 in range(0, m, GROUP)
        ]
    ) / len(x)


@st.composite
def _problems(draw):
    m = draw(st.sampled_from([8, 16]))
    n = 3
    rows = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n))
    x = rng.standard_normal((rows, m))
    # Adversarial: huge or silent input channels, outlier and zero weight rows, ties.
    for channel in draw(st.lists(st.integers(0, m - 1), max_size=3)):
        x[:, channel] *= 10.0 ** draw(st.sampled_from([-6, -2, 0, 2, 3]))
    if draw(st.booleans()):
        x[:, draw(st.integers(0, m - 1))] = 0.0
    for row in draw(st.lists(st.integers(0, m - 1), max_size=3)):
        w[row] *= draw(st.sampled_from([0.0, 1e-3, 10.0, 1e3]))
    if draw(st.booleans()):
        w = np.round(w)  # many equal values and exact zeros
    return w.astype(np.float32), x.astype(np.float32), draw(st.booleans())


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(_problems())
def test_fast_search_reaches_the_brute_force_minima_and_never_loses_to_rtn(problem):
    w, x, symmetric = problem
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    gram = (x64.T @ x64 / x.shape[0]).astype(np.float32)
    restored, stats = _fast(jnp.asarray(w), jnp.asarray(gram), symmetric)
    restored = np.asarray(restored, np.float64)

    def full(w_hat):  # ‖X E‖² / rows, float64
        return np.sum((x64 @ (w_hat - w64)) ** 2) / x.shape[0]

    scale = np.sum((x64 @ w64) ** 2) / x.shape[0]
    tol = 1e-4 * scale + 1e-30
    rtn = full(_reference_candidate(w, gram, 0.0, 1.0, symmetric))
    got = full(restored)
    # The search sums its float32 objective in its own order: an error far above the
    # output's own size (a huge input channel on a badly rounded row) is known to
    # float32's relative precision, not to a fraction of the output.
    slack = tol + 1e-5 * rtn
    # Never worse than round to nearest, and the reported errors are the real ones.
    assert got <= rtn + slack
    reported = float(stats["relative_output_error"]) ** 2 * scale
    assert abs(reported - got) <= slack
    assert abs(float(stats["rtn_relative_output_error"]) ** 2 * scale - rtn) <= slack
    alpha, ratio = float(stats["alpha"]), float(stats["clip_ratio"])
    if alpha == 0.0 and ratio == 1.0:
        return  # round to nearest won the final pick
    # The searched alpha reaches the least block loss of the (unclipped) alpha grid.
    per_alpha = [
        np.sum(_group_losses(_reference_candidate(w, gram, a, 1.0, symmetric) - w64, x64))
        for a in np.linspace(0.0, 1.0, GRID)
    ]
    mine = np.sum(_group_losses(_reference_candidate(w, gram, alpha, 1.0, symmetric) - w64, x64))
    assert mine <= min(per_alpha) + tol
    # At that alpha, each group's clipping reaches its least loss over the coarse ratios
    # (every other one of the grid, and the last), and that of the grid neighbours of a
    # coarse ratio that reaches it (float32 may see near-ties of float64 in either order).
    per_ratio = np.stack(
        [
            _group_losses(_reference_candidate(w, gram, alpha, c, symmetric) - w64, x64)
            for c in np.linspace(1.0, 0.5, CLIP_GRID)
        ]
    )
    mine = _group_losses(restored - w64, x64)
    coarse = sorted(set(range(0, CLIP_GRID, 2)) | {CLIP_GRID - 1})
    least = per_ratio[coarse].min(axis=0)
    np.testing.assert_array_less(mine, least + tol + 1e-12)
    hood = [per_ratio[max(c - 1, 0) : c + 2].min(axis=0) for c in coarse]
    near = [
        np.where(per_ratio[c] <= least + tol, h, -np.inf) for c, h in zip(coarse, hood, strict=True)
    ]
    np.testing.assert_array_less(mine, np.max(near, axis=0) + tol + 1e-12)
    assert 0.5 <= ratio <= 1.0
