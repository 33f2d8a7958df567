"""NaN and Inf weights under ``jax.jit``: never turned finite, and ``jc.checked`` refuses them.

One NaN and one +Inf are planted in an (8, 4) kernel. A traced transform cannot raise,
so each test pins what the method does instead (README, "Bad input"): the planted
entries stay non-finite, and every other entry is what the same jitted transform gives
for a finite stand-in, except in the documented poisoned unit of a format that cannot
hold NaN per entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxcompress as jc

NAN_AT, INF_AT = (2, 1), (5, 3)
WEIGHT = jnp.linspace(-1.55, 1.6, 32, dtype=jnp.float32).reshape(8, 4)
BIAS = jnp.zeros(4)


def _params(nan, inf):
    return {"dense": {"kernel": WEIGHT.at[NAN_AT].set(nan).at[INF_AT].set(inf), "bias": BIAS}}


DIRTY = _params(jnp.nan, jnp.inf)


def _kernel(tree):
    return np.asarray(jc.materialize(tree)["dense"]["kernel"])


def _planted_mask():
    mask = np.zeros(WEIGHT.shape, bool)
    mask[NAN_AT] = mask[INF_AT] = True
    return mask


def _assert_planted_kept(out):
    assert np.isnan(out[NAN_AT])
    assert np.isposinf(out[INF_AT])


# Quantized codes are integers: the scale of each group holding a non-finite entry is
# NaN, so exactly that group decodes to NaN (a column per channel, a column's run of
# group_size rows per group, the whole leaf per tensor).
@pytest.mark.parametrize(
    ("options", "poisoned"),
    [
        (dict(bits=8), np.s_[:, [1, 3]]),
        (dict(bits=4, group_size=4), (np.r_[0:4, 4:8], np.r_[[1] * 4, [3] * 4])),
        (dict(bits=8, axis=None), np.s_[:, :]),
    ],
    ids=["channel", "group", "tensor"],
)
def test_quantize_poisons_exactly_the_scale_groups_of_non_finite_entries(options, poisoned):
    run = jax.jit(jc.quantize(**options, where="kernel"))
    out = _kernel(run(DIRTY)[0])
    reference = _kernel(run(_params(0.0, 0.0))[0])
    expected_nan = np.zeros(WEIGHT.shape, bool)
    expected_nan[poisoned] = True
    np.testing.assert_array_equal(np.isnan(out), expected_nan)
    np.testing.assert_array_equal(out[~expected_nan], reference[~expected_nan])


@pytest.mark.parametrize(
    "options", [dict(bits=8), dict(bits=4, group_size=4)], ids=["channel", "group"]
)
def test_fake_quant_keeps_non_finite_entries_and_leaves_the_rest_unchanged(options):
    run = jax.jit(jc.training.fake_quant(**options, where="kernel"))
    out = np.asarray(run(DIRTY)["dense"]["kernel"])
    _assert_planted_kept(out)
    # Symmetric absmax scales come from the finite entries only, as if the planted
    # ones were zero.
    reference = np.asarray(run(_params(0.0, 0.0))["dense"]["kernel"])
    others = ~_planted_mask()
    np.testing.assert_array_equal(out[others], reference[others])


def test_cluster_gives_non_finite_entries_their_own_nan_centroid():
    leaf = jax.jit(jc.cluster(bits=2, where="kernel"))(DIRTY)[0]["dense"]["kernel"]
    out = _kernel({"dense": {"kernel": leaf}})
    codebook = np.asarray(leaf.codebook)
    assert np.isnan(codebook).sum() == 1
    np.testing.assert_array_equal(np.isnan(out), _planted_mask())
    # Every other entry takes the nearest of the other k - 1 centroids, fitted on the
    # finite entries alone.
    finite_codebook = codebook[np.isfinite(codebook)]
    others = np.asarray(WEIGHT)[~_planted_mask()]
    nearest = finite_codebook[np.abs(others[:, None] - finite_codebook).argmin(axis=1)]
    np.testing.assert_array_equal(out[~_planted_mask()], nearest)
    assert np.abs(others - nearest).max() < (others.max() - others.min()) / 3


def test_low_rank_poisons_exactly_the_rows_holding_non_finite_entries():
    run = jax.jit(jc.low_rank(1, where="kernel"))
    out = _kernel(run(DIRTY)[0])
    # A factored entry is u[i] @ v[:, j]: its row i of u is the smallest unit that can
    # carry NaN to it; the factors are those of the leaf with the entries set to zero.
    reference = _kernel(run(_params(0.0, 0.0))[0])
    rows = np.zeros(WEIGHT.shape, bool)
    rows[[NAN_AT[0], INF_AT[0]]] = True
    np.testing.assert_array_equal(np.isnan(out), rows)
    np.testing.assert_allclose(out[~rows], reference[~rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make", [lambda: jc.prune(0.5, where="kernel"), lambda: jc.prune_nm("2:4", where="kernel")]
)
def test_pruning_ranks_non_finite_entries_above_every_finite_magnitude(make):
    run = jax.jit(make())
    out = _kernel(run(DIRTY)[0])
    _assert_planted_kept(out)
    # The same mask as for the largest finite stand-ins: they are kept, never zeroed.
    reference = _kernel(run(_params(1e30, 1e30))[0])
    others = ~_planted_mask()
    np.testing.assert_array_equal(out[others], reference[others])


FACTORIES = {
    "quantize": lambda: jc.quantize(8, where="kernel"),
    "quantize_group": lambda: jc.quantize(4, group_size=4, where="kernel"),
    "cluster": lambda: jc.cluster(bits=2, where="kernel"),
    "low_rank": lambda: jc.low_rank(1, where="kernel"),
    "prune": lambda: jc.prune(0.5, where="kernel"),
    "prune_nm": lambda: jc.prune_nm("2:4", where="kernel"),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_checked_raises_naming_the_leaf_eagerly_and_under_checkify(name):
    tx = jc.checked(FACTORIES[name]())
    with pytest.raises(ValueError, match="'dense/kernel' contains NaN or Inf"):
        tx(DIRTY)
    error, _ = jax.jit(checkify.checkify(tx))(DIRTY)
    with pytest.raises(checkify.JaxRuntimeError, match="'dense/kernel' contains NaN or Inf"):
        error.throw()


@pytest.mark.bitwise
def test_checked_fake_quant_raises_naming_the_leaf():
    fq = jc.checked(jc.training.fake_quant(8, where="kernel"), jit=True)
    with pytest.raises(ValueError, match="'dense/kernel' contains NaN or Inf"):
        fq(DIRTY)
    np.testing.assert_array_equal(
        fq(_params(0.0, 0.0))["dense"]["kernel"],
        jc.training.fake_quant(8, where="kernel")(_params(0.0, 0.0))["dense"]["kernel"],
    )


@pytest.mark.bitwise
def test_checked_with_jit_runs_the_transform_on_finite_input_and_composes():
    chained = jc.chain(jc.prune(0.5, where="kernel"), jc.quantize(8, where="kernel"))
    tx = jc.checked(chained, jit=True)
    assert isinstance(tx, jc.Transform)
    clean = _params(0.0, 0.0)
    np.testing.assert_array_equal(_kernel(tx(clean)[0]), _kernel(chained(clean)[0]))
    with pytest.raises(ValueError, match="'dense/kernel'"):
        tx(DIRTY)


def test_checked_under_plain_jit_raises_instead_of_dropping_the_check():
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(jc.checked(jc.prune(0.5, where="kernel")))(DIRTY)


def test_checked_where_ignores_leaves_outside_it():
    tx = jc.checked(jc.prune(0.5, where="kernel"), where="bias", jit=True)
    out, _ = tx(DIRTY)
    _assert_planted_kept(_kernel(out))
