"""Differential tests of the fast paths against slow, obviously correct numpy references.

Each fast path is run on adversarial inputs drawn by hypothesis and compared with a
float64 / sort-based reference; a disagreement beyond the path's stated guarantee
fails:

* PCA ``method="randomized"`` / ``"auto"``: the summed explained variance within 1e-4
  (relative) of a float64 ``eigh``, and each component within Davis-Kahan's
  ``sin∠ ≤ 1e-4 λ₁ / gap`` (plus float32 rounding) where its exact eigen-gap is known.
* radix-select pruning counts (``global_counts``): exactly the counts of a stable
  sort of every magnitude, ties in leaf then row-major order.
* rANS: ``decode(encode(s)) == s`` bit for bit, and ``coded_size`` within the 1 % +
  64 bytes that ``io/streams.py`` relies on.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.io import ans
from jaxcompress.methods.prune import global_counts
from jaxcompress.numerics.decomposition import PCA_PATHS, pca_fit, pca_fit_checked

SPECTRA = ("flat", "power-law", "exponential", "clustered", "rank-deficient", "offset")
EV_RTOL = 1e-4
RESIDUAL_RTOL = 1e-4


def spectrum_data(n: int, d: int, kind: str, seed: int) -> np.ndarray:
    """``n x d`` float32 rows whose covariance has the named kind of spectrum."""
    rng = np.random.default_rng(seed)
    if kind == "flat":  # Gaussian data times a Gaussian mixing matrix (issue 19)
        return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d))).astype(np.float32)
    i = np.arange(d, dtype=np.float64)
    variances = {
        "power-law": (i + 1.0) ** -1.0,
        "exponential": 0.9**i,
        "clustered": np.repeat(2.0 ** -np.arange(d // 6 + 1.0), 6)[:d],
        "rank-deficient": np.where(i < d // 5, 1.0 + i[::-1] / d, 0.0),
        "offset": (i + 1.0) ** -1.0,
    }[kind]
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * np.sqrt(variances)) @ basis.T
    if kind == "offset":
        x += 300.0  # float32 keeps ~5 digits of the spread under this mean
    return x.astype(np.float32)


def exact_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the float64 covariance."""
    x = x.astype(np.float64)
    xc = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(xc.T @ xc / (x.shape[0] - 1))
    return values[::-1], vectors[:, ::-1]


def assert_within_guarantee(x: np.ndarray, k: int, result) -> None:
    values, vectors = exact_pca(x)
    ours = np.asarray(result.explained_variance, np.float64)
    exact_sum = values[:k].sum()
    assert abs(ours.sum() - exact_sum) <= EV_RTOL * exact_sum, (ours.sum(), exact_sum)
    components = np.asarray(result.components, np.float64)
    for i in range(k):
        gap = min(
            values[i - 1] - values[i] if i > 0 else np.inf,
            values[i] - values[i + 1] if i + 1 < values.size else np.inf,
        )
        if gap <= 0:
            continue
        # Davis-Kahan with the certified residual, plus float32 rounding of an exact eigh.
        bound = (RESIDUAL_RTOL + 1e-5) * values[0] / gap + 1e-3
        if bound >= 1.0:
            continue  # the gap does not allow a statement about this component
        cosine = abs(components[i] @ vectors[:, i])
        sine = np.sqrt(max(0.0, 1.0 - cosine**2))
        assert sine <= bound, (i, sine, bound)


@pytest.mark.parametrize("kind", SPECTRA)
def test_randomized_pca_is_certified_on_every_spectrum(kind):
    # Tall (block Krylov) path: before the check, the flat, power-law, exponential and
    # offset spectra came back 0.1-5 % short of the exact explained variance.
    x = spectrum_data(3000, 300, kind, seed=0)
    result, check = pca_fit_checked(jnp.asarray(x), 20, method="randomized")
    assert_within_guarantee(x, 20, result)
    if PCA_PATHS[int(check.path)].startswith("randomized"):
        assert float(check.error_bound) <= EV_RTOL / 4
        assert float(check.max_residual) <= RESIDUAL_RTOL


def test_unchecked_krylov_is_wrong_on_a_flat_spectrum():
    # The reason the check exists: without it the flat spectrum loses several percent.
    x = spectrum_data(3000, 300, "flat", seed=0)
    raw, check = pca_fit_checked(jnp.asarray(x), 20, method="randomized", certify=False)
    values, _ = exact_pca(x)
    shortfall = (
        1.0 - float(np.sum(np.asarray(raw.explained_variance, np.float64))) / values[:20].sum()
    )
    assert shortfall > 1e-2
    assert float(check.error_bound) >= shortfall  # the bound is a bound


def test_auto_falls_back_on_the_issue_case():
    # Issue 19: 10000 x 784 Gaussian data times a Gaussian mixing matrix, k = 50.
    x = spectrum_data(10000, 784, "flat", seed=0)
    result, check = pca_fit_checked(jnp.asarray(x), 50)
    assert check.path_name == "full after a failed check"
    assert_within_guarantee(x, 50, result)


def test_covariance_krylov_retries_under_jit():
    # 3000 x 600, k = 40: the Krylov space (3 blocks of 48) is built from the covariance,
    # and variances 0.93^i fall just short of converging in it. The retry with twice the
    # space and the exact eigh reuse that covariance inside one jit call, so they run
    # under the caller's jit too (before, a traced check went straight to the exact path).
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((600, 600)))[0]
    scales = np.sqrt(0.93 ** np.arange(600.0))
    x = ((rng.standard_normal((3000, 600)) * scales) @ basis.T).astype(np.float32)
    result, check = jax.jit(lambda x: pca_fit_checked(x, 40, method="randomized"))(x)
    assert check.path_name == "randomized, larger space"
    assert_within_guarantee(x, 40, result)


@pytest.mark.parametrize("kind", ["flat", "power-law"])
def test_wide_sketch_path_is_certified(kind):
    x = spectrum_data(200, 600, kind, seed=1)
    result = pca_fit(jnp.asarray(x), 10, method="randomized")
    assert_within_guarantee(x, 10, result)


def test_check_runs_under_jit():
    x = jnp.asarray(spectrum_data(3000, 300, "flat", seed=2))
    fit = jax.jit(lambda x: pca_fit_checked(x, 20, method="randomized"))
    result, check = fit(x)
    assert int(check.path) == len(PCA_PATHS) - 1  # the exact path ran inside lax.cond
    assert_within_guarantee(np.asarray(x), 20, result)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(SPECTRA),
    shape=st.sampled_from([(700, 64), (1500, 96), (96, 600)]),
    k=st.sampled_from([1, 5, 12]),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["randomized", "auto"]),
)
def test_pca_fast_paths_match_float64_eigh(kind, shape, k, seed, method):
    x = spectrum_data(*shape, kind, seed)
    result = pca_fit(jnp.asarray(x), k, method=method)
    assert_within_guarantee(x, k, result)


# --------------------------------------------------------------------------- pruning


def sorted_counts(weights: list[np.ndarray], total: int) -> list[int]:
    """The reference: a stable sort of every magnitude (leaf order, then row-major)."""
    magnitudes = np.concatenate([np.abs(w.astype(np.float64)).ravel() for w in weights])
    owner = np.concatenate([np.full(w.size, i) for i, w in enumerate(weights)])
    pruned = owner[np.argsort(magnitudes, kind="stable")[:total]]
    return [int(np.sum(pruned == i)) for i in range(len(weights))]


_SPECIALS = [0.0, -0.0, 1e-40, -1e-45, 1.0, -1.0, 2.0, 65504.0]


@st.composite
def leaves(draw):
    dtype = draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16]))
    count = draw(st.integers(1, 4))
    out = []
    for _ in range(count):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=7))
        style = draw(st.sampled_from(["normal", "constant", "duplicated", "specials"]))
        size = int(np.prod(shape))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        if style == "normal":
            values = rng.standard_t(1.5, size)  # heavy tails
        elif style == "constant":
            values = np.full(size, draw(st.sampled_from(_SPECIALS)))
        elif style == "duplicated":
            values = rng.choice([-1.0, 0.5, 0.0, 1.0], size)
        else:
            values = rng.choice(_SPECIALS, size)
        out.append(np.asarray(values.reshape(shape)).astype(dtype))
    return out


@settings(max_examples=60, deadline=None)
@given(weights=leaves(), fraction=st.floats(0.0, 1.0))
def test_radix_select_counts_match_a_sort(weights, fraction):
    total = int(fraction * sum(w.size for w in weights))
    counts = global_counts([jnp.asarray(w) for w in weights], total)
    assert [int(c) for c in counts] == sorted_counts(weights, total)


# --------------------------------------------------------------------------- rANS


@st.composite
def symbol_streams(draw):
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 256, 4097]))
    size = draw(st.integers(0, 5000))
    style = draw(st.sampled_from(["uniform", "skewed", "constant", "two"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if style == "uniform":
        symbols = rng.integers(0, alphabet, size)
    elif style == "skewed":
        symbols = np.minimum(rng.geometric(0.3, size) - 1, alphabet - 1)
    elif style == "constant":
        symbols = np.full(size, alphabet - 1)
    else:
        symbols = rng.choice([0, alphabet - 1], size, p=[0.999, 0.001])
    return symbols.astype(np.uint16), alphabet


@settings(max_examples=60, deadline=None)
@given(stream=symbol_streams())
def test_rans_round_trip_and_size_estimate(stream):
    symbols, alphabet = stream
    data = ans.encode(symbols, alphabet)
    assert np.array_equal(ans.decode(data, symbols.size, alphabet), symbols)
    estimate = ans.coded_size(np.bincount(symbols, minlength=alphabet))
    assert len(data) <= estimate * 1.01 + 64, (len(data), estimate)
