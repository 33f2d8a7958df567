"""Differential tests of more fast paths against slow numpy references (issue 19).

Each fast path runs on adversarial inputs drawn by hypothesis (duplicated values,
constant leaves, heavy tails, outliers, tiny ranges, subnormals, bf16/fp16 leaves,
odd shapes) and is compared with a numpy reference; a disagreement beyond the
guarantee that ``docs/architecture.md`` states for the path fails:

* histogram k-means (``jc.cluster`` on a leaf of more than 65536 values): every value
  coded to its nearest centroid, the reported inertia exact, a finite sorted codebook,
  an exact codebook when the values are few and far apart, and
  ``rms <= rms(linear init) + 2 h`` with ``h`` the histogram's bin width.
* the global threshold (``jc.prune(scope="global")``): the kept set of a stable sort
  of every magnitude (ties in leaf, then row-major order), with each output unit's
  largest magnitude kept where the threshold would empty the unit.
* the sharded block prune: bit-identical to one device, on shapes that split into
  blocks and shapes that do not.
* every ``accelerate`` route: within its stated bound of ``x @ materialize(W)``
  computed in float64.

Compiles dominate the cost, so every test draws its shapes from a short fixed list.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.arrays.serving import ClusteredMatrix

TINY32 = float(np.finfo(np.float32).tiny)

# --------------------------------------------------------------------- histogram k-means

KMEANS_SHAPE = (1031, 67)  # 69077 values (> 65536: the histogram path); both primes
KMEANS_K = 16
HISTOGRAM_BINS = 2**14  # the bin count cluster's docstring states


def kmeans_values(style: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` float64 values of one adversarial kind."""
    if style == "normal":
        return rng.standard_normal(n)
    if style == "heavy":  # Cauchy-like tails: the bulk sits in a few histogram bins
        return rng.standard_t(1.0, n)
    if style == "outlier":
        x = rng.standard_normal(n)
        x[rng.integers(n)] = 1e6
        return x
    if style == "clustered":  # tight clusters, some closer together than a bin
        centers = np.array([-3.0, 0.0, 1e-5, 2e-5, 5.0])
        return rng.choice(centers, n) + 1e-7 * rng.standard_normal(n)
    if style == "few":  # at most k distinct values: an exact codebook is possible
        return rng.choice(rng.standard_normal(rng.integers(1, KMEANS_K + 1)), n)
    if style == "constant":
        return np.full(n, rng.standard_normal())
    if style == "tiny":  # normal float32 values whose range / bins is subnormal
        return rng.standard_normal(n) * 1e-36
    # "subnormal": flushed to zero by XLA on CPU, next to a few normal values
    return rng.choice([0.0, 1e-40, -3e-41, 2e-39, 1.0, -0.5], n)


def nearest_distances(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    return np.min(np.abs(x[:, None] - codebook[None, :]), axis=1)


@pytest.fixture(scope="module")
def cluster_tx():
    return jc.cluster(k=KMEANS_K)


@settings(max_examples=20, deadline=None)
@given(
    style=st.sampled_from(
        ["normal", "heavy", "outlier", "clustered", "few", "constant", "tiny", "subnormal"]
    ),
    dtype=st.sampled_from([np.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_histogram_kmeans_holds_its_guarantee(cluster_tx, style, dtype, seed):
    rng = np.random.default_rng(seed)
    w = kmeans_values(style, rng, math.prod(KMEANS_SHAPE)).astype(dtype).reshape(KMEANS_SHAPE)
    clustered, stats = cluster_tx({"w": jnp.asarray(w)})
    leaf, stats = clustered["w"], stats["w"]
    x = np.asarray(w, np.float64).reshape(-1)
    codebook = np.asarray(leaf.codebook, np.float64)
    assert codebook.shape == (KMEANS_K,)
    assert np.isfinite(codebook).all() and (np.diff(codebook) >= 0).all(), codebook
    # XLA on CPU flushes subnormals to zero: distances below TINY32 are not resolved.
    slack = 4 * np.spacing(np.float32(np.abs(codebook).max())) + TINY32
    codes = np.asarray(leaf.codes()).reshape(-1)
    chosen = np.abs(x - codebook[codes])
    best = nearest_distances(x, codebook)
    assert (chosen <= best + slack).all(), np.max(chosen - best)
    sse = float(np.sum(chosen**2))
    assert abs(float(stats["inertia"]) - sse) <= 1e-4 * sse + x.size * slack**2
    # The stated bound: the binned Lloyd never ends above its linear init on the bins,
    # and each value is within h of its bin's mean, so rms <= rms(init) + 2 h.
    h = max((x.max() - x.min()) / HISTOGRAM_BINS, TINY32)
    init = np.linspace(x.min(), x.max(), KMEANS_K)
    rms, rms_init = math.sqrt(sse / x.size), math.sqrt(np.mean(nearest_distances(x, init) ** 2))
    assert rms <= (rms_init + 2 * h) * (1 + 1e-5) + slack, (rms, rms_init, h)
    distinct = np.unique(x)
    if distinct.size <= KMEANS_K and np.min(np.diff(distinct), initial=np.inf) > 2 * h:
        # Few values, each alone in its bin: the codebook holds them exactly.
        assert sse <= x.size * slack**2
        assert set(distinct) <= set(codebook)


# ------------------------------------------------------------------ global threshold

_SPECIALS = [0.0, -0.0, 1e-40, -3e-41, 1.0, -1.0, 2.0, 65504.0]
# Each (shape, dtype) compiles its own radix-selection programs (seconds each), so
# leaves draw from a few: odd and prime sizes, 1 x n and n x 1, all three float types.
PRUNE_LEAVES = [
    ((1, 7), np.float32),
    ((7, 1), jnp.bfloat16),
    ((3, 5), np.float16),
    ((13,), np.float32),
    ((2, 3, 4), jnp.bfloat16),
]


def adversarial(style: str, rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """One leaf of ``shape`` and ``dtype`` with values of an adversarial ``style``."""
    size = math.prod(shape)
    if style == "heavy":
        values = rng.standard_t(1.5, size)
    elif style == "constant":
        values = np.full(size, rng.choice(_SPECIALS))
    elif style == "duplicated":
        values = rng.choice([-1.0, 0.5, 0.0, 1.0], size)
    elif style == "subnormal":
        values = rng.choice([0.0, -0.0, 1e-40, 2e-40, -3e-40, 5e-39], size)
    else:
        values = rng.choice(_SPECIALS, size)
    return np.asarray(values.reshape(shape)).astype(dtype)


@st.composite
def prune_trees(draw, kinds=PRUNE_LEAVES):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    count = draw(st.integers(1, 4))
    styles = st.sampled_from(["heavy", "constant", "duplicated", "subnormal", "specials"])
    return {
        f"w{i}": adversarial(draw(styles), rng, *draw(st.sampled_from(kinds))) for i in range(count)
    }


def stable_prune_order(w: np.ndarray) -> np.ndarray:
    """Row-major indices of ``w`` from smallest to largest magnitude, ties by index."""
    return np.argsort(np.abs(w.astype(np.float64)).reshape(-1), kind="stable")


def global_reference(tree: dict, sparsity: float) -> tuple[dict, dict]:
    """The keep masks and pruned counts of one global magnitude threshold, by sorting.

    ``floor(sparsity * total)`` entries go, smallest magnitudes first, ties in leaf then
    row-major order; a leaf whose share would empty an output unit (an index of its
    last axis) keeps each unit's largest magnitude (the first, in row-major order) and
    prunes its share (at most its size less its units) from the rest.
    """
    names = list(tree)
    magnitudes = np.concatenate([np.abs(tree[n].astype(np.float64)).ravel() for n in names])
    owner = np.concatenate([np.full(tree[n].size, i) for i, n in enumerate(names)])
    total = math.floor(Fraction(repr(sparsity)) * magnitudes.size)
    pruned_owner = owner[np.argsort(magnitudes, kind="stable")[:total]]
    keeps, counts = {}, {}
    for i, name in enumerate(names):
        w = tree[name]
        count = int(np.sum(pruned_owner == i))
        keep = np.ones(w.size, bool)
        keep[stable_prune_order(w)[:count]] = False
        units = w.shape[-1] if w.ndim >= 2 else 1
        if not keep.reshape(-1, units).any(axis=0).all():
            strongest = np.argmax(np.abs(w.astype(np.float64)).reshape(-1, units), axis=0)
            protected = strongest * units + np.arange(units)
            count = min(count, w.size - units)
            order = [j for j in stable_prune_order(w) if j not in set(protected)]
            keep = np.ones(w.size, bool)
            keep[order[:count]] = False
        keeps[name], counts[name] = keep.reshape(w.shape), count
    return keeps, counts


@settings(max_examples=25, deadline=None)
@given(tree=prune_trees(), sparsity=st.sampled_from([0.0, 0.29, 0.5, 0.9, 0.999]))
def test_global_threshold_keeps_what_a_sort_keeps(tree, sparsity):
    pruned, stats = jc.prune(sparsity, scope="global", where="")(
        {name: jnp.asarray(w) for name, w in tree.items()}
    )
    keeps, counts = global_reference(tree, sparsity)
    for name, w in tree.items():
        keep = np.asarray(pruned[name].keep_mask())
        np.testing.assert_array_equal(keep, keeps[name], err_msg=name)
        assert stats[name]["pruned"] == counts[name], name
        dense = np.asarray(jc.materialize(pruned[name]))
        np.testing.assert_array_equal(
            dense.view(np.uint8), np.where(keep, w, np.zeros_like(w)).view(np.uint8)
        )
        if w.ndim >= 2:  # no output unit is emptied
            assert keep.reshape(-1, w.shape[-1]).any(axis=0).all(), name


# ------------------------------------------------------------------ sharded block prune

# Shapes that split into blocks (the block-by-block path) and shapes whose split axis
# leaves a block of columns that is not whole bytes of mask (the gathered path).
SHARDED_CASES = [
    ((12, 16), P("data", "model")),  # 3 x 8 blocks
    ((4, 7), P("data", None)),  # one row of 7 per block
    ((24,), P(("data", "model"))),  # 1-D, 3 per block
    ((8, 12), P("data", "model")),  # 6 columns per block: gathered
    ((2, 40), P(None, ("data", "model"))),  # 5 columns per block: gathered
]


@settings(max_examples=8, deadline=None)
@given(
    case=st.sampled_from(SHARDED_CASES),
    dtype=st.sampled_from([np.float32, jnp.bfloat16]),
    style=st.sampled_from(["heavy", "constant", "duplicated", "subnormal", "specials"]),
    sparsity=st.sampled_from([0.25, 0.75]),
    scope=st.sampled_from(["layer", "global"]),
    seed=st.integers(0, 2**16),
)
def test_sharded_prune_equals_one_device(mesh8, case, dtype, style, sparsity, scope, seed):
    shape, spec = case
    w = adversarial(style, np.random.default_rng(seed), shape, dtype)
    tx = jc.prune(sparsity, scope=scope, where="")
    want, want_stats = tx({"w": jnp.asarray(w)})
    got, got_stats = tx({"w": jax.device_put(w, NamedSharding(mesh8, spec))})
    assert got_stats == want_stats
    for name in ("values", "mask"):
        a, b = np.asarray(getattr(got["w"], name)), np.asarray(getattr(want["w"], name))
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)


# ------------------------------------------------------------------ accelerate routes

COMPRESSIONS = {
    "int8/channel": jc.quantize(bits=8, axis=-1),
    "int8/asymmetric": jc.quantize(bits=8, axis=-1, symmetric=False),
    "int4/channel": jc.quantize(bits=4, axis=-1),
    "int4/groups": jc.quantize(bits=4, axis=-1, group_size=8),
    "k-means": jc.cluster(bits=3),
    "low rank": jc.low_rank(rank=1),
    "pruned": jc.prune(0.5),
}
# (compression, weight shape, route): each compiles once per batch shape.
ROUTE_CASES = [
    ("int8/channel", (16, 7), "int8"),
    ("int8/channel", (13, 5), "int8"),
    ("int8/asymmetric", (16, 7), "int8"),
    ("int4/channel", (16, 7), "int8"),  # packed two codes per byte
    ("k-means", (16, 7), "int8"),  # prepared onto the int8 grid
    ("int4/channel", (13, 5), "blocked"),
    ("int4/groups", (16, 7), "blocked"),
    ("k-means", (13, 5), "blocked"),
    ("int4/groups", (16, 7), "dequantize"),
    ("k-means", (1, 9), "dequantize"),
    ("low rank", (13, 5), "auto"),
    ("pruned", (16, 7), "materialize"),
    ("int8/channel", (1, 9), "materialize"),
]
EXPECTED_ROUTE = {"low rank": "factored", "pruned": "materialize"}
_ACCELERATED: dict = {}


def apply_matmul(params, x):
    return x @ params["w"]


def accelerated(route: str) -> jc.Accelerated:
    """One ``Accelerated`` per route, so each case compiles once per shape."""
    if route not in _ACCELERATED:
        _ACCELERATED[route] = jc.accelerate(
            apply_matmul, route=route, int8_activations=route == "int8"
        )
    return _ACCELERATED[route]


def route_weight(style: str, rng: np.random.Generator, shape) -> np.ndarray:
    w = rng.standard_normal(shape)
    if style == "outlier":
        w[rng.integers(shape[0]), rng.integers(shape[1])] = 300.0
    elif style == "constant column":
        w[:, rng.integers(shape[1])] = 0.75
    elif style == "constant row":
        w[rng.integers(shape[0]), :] = -2.0
    elif style == "zero column":
        w[:, rng.integers(shape[1])] = 0.0
    return w.astype(np.float32)


def route_activation(style: str, rng: np.random.Generator, shape) -> np.ndarray:
    x = rng.standard_normal(shape)
    if style == "outlier":
        x.reshape(-1)[rng.integers(x.size)] = 1e4
    elif style == "constant rows":
        x[...] = rng.standard_normal(shape[:-1] + (1,))
    elif style == "zero row":
        x.reshape(-1, shape[-1])[0] = 0.0
    elif style == "heavy":
        x = rng.standard_t(1.0, shape)
    return x.astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from(ROUTE_CASES),
    batch=st.sampled_from([(1,), (3,), (2, 5)]),
    w_style=st.sampled_from(
        ["normal", "outlier", "constant column", "constant row", "zero column"]
    ),
    x_style=st.sampled_from(["normal", "outlier", "constant rows", "zero row", "heavy"]),
    seed=st.integers(0, 2**16),
)
def test_accelerate_routes_stay_within_their_bounds(case, batch, w_style, x_style, seed):
    name, shape, route = case
    rng = np.random.default_rng(seed)
    compressed, _ = COMPRESSIONS[name]({"w": jnp.asarray(route_weight(w_style, rng, shape))})
    x = route_activation(x_style, rng, batch + shape[:1])
    fast = accelerated(route)
    prepared = fast.prepare(compressed)
    y = np.asarray(fast(prepared, jnp.asarray(x)), np.float64)
    assert set(fast.last_plan.routes().values()) == {EXPECTED_ROUTE.get(name, route)}
    # The reference: the materialized (prepared) weight times x, in float64.
    w = np.asarray(jc.materialize(prepared)["w"], np.float64)
    x64 = x.astype(np.float64).reshape(-1, shape[0])
    reference = x64 @ w
    # Float routes: rounding of K-term float32 sums (both orders), relative to the terms'
    # magnitudes; a low-rank product rounds the magnitudes of its factors instead.
    magnitude = np.abs(w)
    if name == "low rank":
        leaf = compressed["w"]
        magnitude = np.abs(np.asarray(leaf.u, np.float64)) @ np.abs(np.asarray(leaf.v, np.float64))
    served = prepared["w"]
    if getattr(served, "offset", None) is not None:
        # The zero point's share is summed apart and cancels: it rounds on its own.
        shift = np.abs(np.asarray(served.offset) * np.asarray(served.scale)).max(axis=0)
        magnitude = magnitude + shift[None, :]
    bound = 4 * (shape[0] + 2) * 2.0**-24 * (np.abs(x64) @ magnitude)
    if route == "int8":
        # Each activation is rounded to a step of max|x_row| / 127: at most half of it.
        step = np.abs(x64).max(axis=1, keepdims=True) / 127
        bound = bound + step / 2 * np.abs(w).sum(axis=0, keepdims=True)
        if isinstance(served, ClusteredMatrix):
            # prepare kept exact indices (its int8 grid moved a channel past
            # int8_tolerance); the forced int8 kernel rounds the codebook to that grid
            # in the program, moving each weight by at most half its step.
            grid = np.abs(np.asarray(served.codebook, np.float64)).max() / 127
            bound = bound + grid / 2 * np.abs(x64).sum(axis=1, keepdims=True)
    error = np.abs(y.reshape(-1, shape[1]) - reference)
    assert (error <= bound + 1e-30).all(), np.max(error - bound)
    if name == "k-means":
        # prepare moves a clustered weight by at most half its int8 grid step.
        original = np.asarray(jc.materialize(compressed)["w"], np.float64)
        step = np.abs(np.asarray(compressed["w"].codebook)).max() / 127
        assert np.abs(w - original).max() <= step / 2 * (1 + 1e-6)
