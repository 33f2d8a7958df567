"""accelerate's int8 route checks itself: outlier activations take the exact float route.

The int8 route rounds each activation row to int8. ``int8_tolerance`` bounds the
relative L2 error of that rounding per row (checked in the program, ``lax.cond`` to
the float route otherwise) and the relative change of each output channel of a
clustered weight put on an int8 grid (checked by ``prepare``). Compared here with the
exact float route (``int8_activations=False``) bit for bit where the check must fall
back, and with ``x @ materialize(W)`` in float64 against the stated bound.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix, channel_error
from jaxcompress.runtime import kernels
from jaxcompress.runtime.accelerate import DEFAULT_INT8_TOLERANCE

K, N, M = 1024, 48, 16
RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
GAUSSIAN = jnp.asarray(RNG.standard_normal((M, K)), jnp.float32)
# One input channel 1000 times the others: rounding to int8 wipes out the rest.
OUTLIER = GAUSSIAN.at[:, 7].multiply(1000.0)


def matmul(params, x):
    return x @ params["w"]


def _int8_tree():
    return jc.quantize(bits=8, axis=-1)({"w": W})[0]


def _clustered_tree():
    return jc.cluster(bits=4)({"w": W})[0]


def test_the_inputs_are_on_either_side_of_the_default_tolerance():
    assert float(kernels.int8_row_error(GAUSSIAN)) < DEFAULT_INT8_TOLERANCE / 1.5
    assert float(kernels.int8_row_error(OUTLIER)) > 2 * DEFAULT_INT8_TOLERANCE


@pytest.mark.bitwise
@pytest.mark.parametrize("jit", [False, True])
def test_outlier_activations_take_the_float_route_for_an_int8_leaf(jit):
    guarded, exact = jc.accelerate(matmul), jc.accelerate(matmul, int8_activations=False)
    tree = _int8_tree()
    served = guarded.prepare(tree)
    assert isinstance(served["w"], QuantizedMatrix)
    assert guarded.explain(served, OUTLIER).routes() == {"w": "int8"}

    def run(fast, params):
        return jax.jit(lambda x: fast(params, x))(OUTLIER) if jit else fast(params, OUTLIER)

    got, want = run(guarded, served), run(exact, exact.prepare(tree))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and the unchecked int8 route really differs on these inputs
    unchecked = jc.accelerate(matmul, int8_tolerance=math.inf)
    assert not np.array_equal(np.asarray(unchecked(served, OUTLIER)), np.asarray(want))


@pytest.mark.bitwise
@pytest.mark.parametrize("jit", [False, True])
def test_outlier_activations_take_the_exact_lookup_for_a_clustered_leaf(jit):
    # An exact ClusteredMatrix on the forced int8 route: the fallback is its own
    # codebook lookup, as with int8_activations=False.
    exact = jc.accelerate(matmul, route="int8", int8_activations=False)
    served = exact.prepare(_clustered_tree())
    assert isinstance(served["w"], ClusteredMatrix)
    guarded = jc.accelerate(matmul, route="int8")
    assert guarded.explain(served, OUTLIER).routes() == {"w": "int8"}

    def run(fast):
        return jax.jit(lambda x: fast(served, x))(OUTLIER) if jit else fast(served, OUTLIER)

    got, want = run(guarded), run(exact)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    reference = np.asarray(OUTLIER, np.float64) @ np.asarray(jc.materialize(served)["w"])
    np.testing.assert_allclose(np.asarray(got), reference, rtol=1e-4, atol=1e-2)


@pytest.mark.bitwise
def test_benign_activations_stay_on_the_int8_route():
    tree = _int8_tree()
    guarded = jc.accelerate(matmul)
    served = guarded.prepare(tree)
    got = np.asarray(guarded(served, GAUSSIAN))
    unchecked = jc.accelerate(matmul, int8_tolerance=math.inf)
    np.testing.assert_array_equal(got, np.asarray(unchecked(served, GAUSSIAN)))
    floating = jc.accelerate(matmul, int8_activations=False)
    exact = np.asarray(floating(served, GAUSSIAN))
    assert not np.array_equal(got, exact)
    x_norm = np.linalg.norm(np.asarray(GAUSSIAN), axis=1, keepdims=True)
    w_norm = np.linalg.norm(np.asarray(jc.materialize(served)["w"]), axis=0, keepdims=True)
    bound = DEFAULT_INT8_TOLERANCE * x_norm * w_norm + 1e-4
    assert np.all(np.abs(got - exact) <= bound)


def test_explain_says_the_route_is_checked_and_against_what():
    note = jc.accelerate(matmul).explain(_int8_tree(), GAUSSIAN).decisions[0].note
    assert "checked" in note and f"{DEFAULT_INT8_TOLERANCE:g}" in note and "blocked" in note
    loose = jc.accelerate(matmul, int8_tolerance=math.inf)
    assert "unchecked" in loose.explain(_int8_tree(), GAUSSIAN).decisions[0].note


def test_prepare_keeps_a_clustered_leaf_exact_when_its_int8_grid_moves_a_channel_too_far():
    # An outlier centroid makes the grid coarse for all the small ones.
    w = np.asarray(W).copy()
    w[0, 0] = 50.0
    tree = jc.cluster(bits=4)({"w": jnp.asarray(w)})[0]
    guarded = jc.accelerate(matmul).prepare(tree)["w"]
    loose = jc.accelerate(matmul, int8_tolerance=math.inf).prepare(tree)["w"]
    assert isinstance(guarded, ClusteredMatrix)
    assert isinstance(loose, QuantizedMatrix)
    assert channel_error(tree["w"].materialize(), loose.materialize()) > DEFAULT_INT8_TOLERANCE
    # a codebook without the outlier passes
    assert isinstance(jc.accelerate(matmul).prepare(_clustered_tree())["w"], QuantizedMatrix)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), -math.inf])
def test_a_bad_tolerance_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="int8_tolerance"):
        jc.accelerate(matmul, int8_tolerance=bad)


def test_a_tolerance_that_is_not_a_number_is_a_type_error():
    with pytest.raises(TypeError, match="int8_tolerance"):
        jc.accelerate(matmul, int8_tolerance="0.1")


@st.composite
def _case(draw):
    k = draw(st.sampled_from([8, 33, 64]))
    n = draw(st.integers(1, 6))
    m = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    outlier = draw(st.sampled_from([1.0, 10.0, 100.0, 1000.0, 1e6]))
    leaf = draw(st.sampled_from(["int8", "int8 asymmetric", "clustered"]))
    zero_row = draw(st.booleans())
    return k, n, m, seed, outlier, leaf, zero_row


@settings(max_examples=30, deadline=None)
@given(_case())
def test_the_served_error_is_within_the_stated_bound(case):
    k, n, m, seed, outlier, kind, zero_row = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.integers(k)] *= outlier
    if zero_row:
        x[0] = 0.0
    transforms = {
        "int8": jc.quantize(bits=8, axis=-1),
        "int8 asymmetric": jc.quantize(bits=8, axis=-1, symmetric=False),
        "clustered": jc.cluster(k=5),
    }
    tree = transforms[kind]({"w": jnp.asarray(w)})[0]
    fast = jc.accelerate(matmul)
    got = np.asarray(fast(tree, jnp.asarray(x)), np.float64)
    exact = np.asarray(jc.materialize(tree)["w"], np.float64)  # the stored weights
    served = np.asarray(jc.materialize(fast.prepare(tree))["w"], np.float64)
    x64 = np.asarray(x, np.float64)
    reference = x64 @ exact
    x_norm = np.linalg.norm(x64, axis=1, keepdims=True)
    tol = DEFAULT_INT8_TOLERANCE
    # |x W - x' W'| <= ||x - x'|| ||W'_n|| + ||x|| ||W_n - W'_n||, with ||x - x'||
    # <= tol ||x|| checked per row and ||W_n - W'_n|| <= tol ||W_n|| by prepare;
    # plus float32 rounding of the sums.
    bound = (
        tol * x_norm * np.linalg.norm(served, axis=0)
        + x_norm * np.linalg.norm(served - exact, axis=0)
        + 1e-5 * (np.abs(x64) @ np.abs(exact))
        + 1e-6
    )
    assert np.all(np.linalg.norm(served - exact, axis=0) <= tol * np.linalg.norm(exact, axis=0))
    assert np.all(np.abs(got - reference) <= bound)
