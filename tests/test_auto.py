"""jc.auto and jc.budget: the per-weight format choice under a budget, and its exact knapsack."""

import dataclasses
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.hybrid.output_metrics import cosine, kl, mse
from jaxcompress.numerics.knapsack import pareto_frontier, solve

# Every kernel 16 x 16, so each candidate compiles once for all of them.
WIDTH = 16


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(WIDTH, name="l1")(x))
        x = jnp.tanh(nn.Dense(WIDTH, name="l2")(x))
        return nn.Dense(WIDTH, name="l3")(x)


class MLPNNX(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.l2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def linen():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (8, WIDTH))
    params = model.init(jax.random.key(0), x)["params"]
    # A weak middle layer: compressing it costs less output loss.
    params["l2"]["kernel"] = params["l2"]["kernel"] * 0.1
    return (lambda p, inputs: model.apply({"params": p}, inputs)), params, [x]


CANDIDATES = ["dense", "int8", "kmeans3"]


def _sizes(params):
    kernels = {f"{k}/kernel": 4 * v["kernel"].size for k, v in params.items()}
    biases = sum(4 * v["bias"].size for v in params.values())
    return kernels, biases


@pytest.fixture(scope="module")
def mixed(linen):
    apply_fn, params, batches = linen
    kernels, biases = _sizes(params)
    # All int8 takes 3 x 320 bytes, 3-bit k-means 128 a kernel: 900 forces a mix.
    limit = biases + 900
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(bytes=limit),
        candidates=CANDIDATES,
        progress=False,
    )
    return tx, plan, limit


def test_result_respects_the_byte_budget(linen, mixed):
    _, params, _ = linen
    tx, plan, limit = mixed
    compressed, _ = tx(params)
    assert isinstance(tx, jc.Transform)
    assert jc.nbytes(compressed) <= limit
    assert plan.bytes == jc.nbytes(compressed)
    assert plan.dense_bytes == jc.nbytes(params)
    # Biases are not selected: they stay as they were.
    assert all(not jc.is_compressed(compressed[k]["bias"]) for k in compressed)
    assert sorted(row.format for row in plan.rows) == ["int8", "int8", "kmeans3"]
    # The weak middle layer takes the coarse format.
    assert plan.formats["l2/kernel"] == "kmeans3"


def test_choice_is_the_brute_force_optimum_of_the_measurements(linen, mixed):
    _, params, _ = linen
    _, plan, limit = mixed
    kernels, biases = _sizes(params)
    paths = list(plan.measurements)
    best = math.inf
    for combo in itertools.product(*(plan.measurements[p].items() for p in paths)):
        size = biases + sum(bytes_ for _, (bytes_, _) in combo)
        if size <= limit:
            best = min(best, sum(loss for _, (_, loss) in combo))
    assert plan.predicted_loss == pytest.approx(best, rel=1e-12, abs=1e-15)
    assert plan.predicted_loss == pytest.approx(sum(row.loss for row in plan.rows))
    # Every format was measured on every kernel, dense at zero loss and its own bytes.
    for path in paths:
        assert set(plan.measurements[path]) == set(CANDIDATES)
        assert plan.measurements[path]["dense"] == (kernels[path], 0.0)


def test_frontier_is_pareto_and_holds_the_chosen_point(mixed):
    _, plan, limit = mixed
    sizes = [size for size, _ in plan.frontier]
    losses = [loss for _, loss in plan.frontier]
    assert sizes == sorted(set(sizes)) and losses == sorted(set(losses), reverse=True)
    assert (plan.bytes, plan.predicted_loss) in plan.frontier
    assert plan.frontier[-1][1] == 0.0  # all dense
    later = [loss for size, loss in plan.frontier if size <= limit]
    assert plan.predicted_loss == later[-1]


def test_measured_loss_of_the_whole_tree_is_close_to_the_prediction(linen, mixed):
    apply_fn, params, batches = linen
    tx, plan, _ = mixed
    compressed, _ = tx(params)
    dense_out = apply_fn(params, batches[0])
    out = apply_fn(jc.materialize(compressed), batches[0])
    # 1 - cos of nearly equal float32 outputs: jitted and eager differ in the last digits.
    assert plan.measured_loss == pytest.approx(float(cosine(dense_out, out)), rel=1e-2)
    assert plan.measured_loss > 0.0


def test_single_weight_prediction_equals_its_measurement(linen):
    apply_fn, params, batches = linen
    kernels, biases = _sizes(params)
    # All dense but room for exactly one int8 kernel (int8 saves most of one kernel).
    limit = biases + sum(kernels.values()) - 1
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(bytes=limit),
        candidates=["dense", "int8"],
        progress=False,
    )
    chosen = [row for row in plan.rows if row.format != "dense"]
    assert len(chosen) == 1
    # The cheapest single int8 weight by its measured loss.
    losses = {path: m["int8"][1] for path, m in plan.measurements.items()}
    assert chosen[0].path == min(losses, key=losses.get)
    assert plan.predicted_loss == chosen[0].loss
    assert plan.measured_loss == pytest.approx(plan.predicted_loss, rel=1e-6)


def test_nnx_model_with_a_ratio_budget():
    graphdef, state = nnx.split(MLPNNX(nnx.Rngs(0)))

    def apply_fn(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jax.random.normal(jax.random.key(2), (8, WIDTH))
    tx, plan = jc.auto(
        apply_fn,
        state,
        [x],
        budget=jc.budget(ratio=3.0),
        candidates=["dense", "int8"],
        progress=False,
    )
    compressed, _ = tx(state)
    assert isinstance(compressed, nnx.State)
    kernel_bytes = sum(
        jc.nbytes(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            compressed, is_leaf=jc.is_compressed
        )[0]
        if "kernel" in jax.tree_util.keystr(path)
    )
    assert kernel_bytes <= 2 * 4 * WIDTH * WIDTH / 3.0  # int8: 3.2x here
    assert {row.path for row in plan.rows} == {"l1/kernel", "l2/kernel"}
    assert {row.format for row in plan.rows} == {"int8"}
    out = apply_fn(jc.materialize(compressed), x)
    assert out.shape == (8, WIDTH)


def test_data_aware_candidate_gets_the_calibration(linen):
    apply_fn, params, batches = linen
    candidates = {"dense": None, "gptq4": jc.quantize(4, method="gptq", axis=None)}
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(ratio=6.0),
        candidates=candidates,
        progress=False,
    )
    assert {row.format for row in plan.rows} == {"gptq4"}
    compressed, _ = tx(params)  # no data= needed: the transform carries it
    assert jc.nbytes(compressed) == plan.bytes


def test_a_candidate_raising_on_one_weight_is_offered_for_the_others(linen):
    apply_fn, params, batches = linen
    int8 = jc.quantize(8)

    def picky(tree, *, key=None, data=None):
        paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        if any("l2" in jax.tree_util.keystr(path) for path in paths):
            raise ValueError("picky: cannot take l2")
        return int8(tree, key=key, data=data)

    candidates = {"dense": None, "picky": jc.Transform(picky, "picky")}
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(bytes=10**6),
        candidates=candidates,
        progress=False,
    )
    assert set(plan.measurements["l1/kernel"]) == {"dense", "picky"}
    assert set(plan.measurements["l2/kernel"]) == {"dense"}
    # A large budget: everything dense, no loss.
    assert set(plan.formats.values()) == {"dense"} and plan.measured_loss == 0.0
    compressed, _ = tx(params)
    assert jc.nbytes(compressed) == jc.nbytes(params)


def test_saved_and_loaded_result_materializes_the_same(linen, mixed, tmp_path):
    _, params, _ = linen
    tx, _, _ = mixed
    compressed, _ = tx(params)
    jc.save(tmp_path / "auto.jxc", compressed)
    loaded = jc.load(tmp_path / "auto.jxc")
    for a, b in zip(
        jax.tree.leaves(jc.materialize(compressed)),
        jax.tree.leaves(jc.materialize(loaded)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plan_table_and_plot(mixed):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, plan, limit = mixed
    table = plan.table()
    assert str(plan) == table == plan._repr_markdown_()
    for row in plan.rows:
        assert row.path in table
    assert f"budget {limit:,} bytes" in table
    assert "AutoPlan(3 weights" in repr(plan)
    figure = plan.plot()
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["frontier (predicted)", "chosen (predicted)", "chosen (measured)", "budget"]
    frontier = figure.axes[0].get_lines()[0]
    assert list(frontier.get_xdata()) == [size for size, _ in plan.frontier]
    plt.close(figure)


def test_infeasible_budget_names_the_smallest_reachable_size(linen):
    apply_fn, params, batches = linen
    with pytest.raises(ValueError, match=f"smallest reachable size is {jc.nbytes(params):,}"):
        jc.auto(
            apply_fn,
            params,
            batches,
            budget=jc.budget(bytes=100),
            candidates=["dense"],
            progress=False,
        )


def test_bad_options(linen):
    apply_fn, params, batches = linen
    ok = jc.budget(bytes=10**6)
    with pytest.raises(TypeError, match="budget must be"):
        jc.auto(apply_fn, params, batches, budget=10**6)
    with pytest.raises(NotImplementedError, match="latency"):
        jc.auto(apply_fn, params, batches, budget=jc.budget(latency=0.01))
    with pytest.raises(ValueError, match="metric must be one of"):
        jc.auto(apply_fn, params, batches, budget=ok, metric="l1", candidates=["dense"])
    with pytest.raises(ValueError, match="kept for leaving"):
        jc.auto(apply_fn, params, batches, budget=ok, candidates={"dense": jc.quantize(8)})
    with pytest.raises(ValueError, match="not default candidates"):
        jc.auto(apply_fn, params, batches, budget=ok, candidates=["dense", "int3"])
    with pytest.raises(TypeError, match="candidate 'x' must be a transform"):
        jc.auto(apply_fn, params, batches, budget=ok, candidates={"x": 3})
    with pytest.raises(ValueError, match="selects no leaf"):
        jc.auto(apply_fn, params, batches, budget=ok, candidates=["dense"], where="nothing")
    with pytest.raises(ValueError, match="batches is empty"):
        jc.auto(apply_fn, params, [], budget=ok, candidates=["dense"])
    with pytest.raises(ValueError, match="no candidate"):
        # Low rank never saves bytes on these 16 x 16 kernels at 90 % energy.
        jc.auto(apply_fn, params, batches, budget=ok, candidates=["lowrank-e90"], progress=False)


def test_budget_is_checked():
    with pytest.raises(ValueError, match="at least one"):
        jc.budget()
    with pytest.raises(ValueError, match="positive"):
        jc.budget(bytes=0)
    with pytest.raises(TypeError, match="integer"):
        jc.budget(bytes=1.5)
    with pytest.raises(ValueError, match="positive"):
        jc.budget(ratio=float("inf"))
    with pytest.raises(TypeError, match="real number"):
        jc.budget(ratio="8")
    both = jc.budget(bytes=1000, ratio=2)
    assert both.limit(selected_float32=1600, unselected=100) == 800
    assert both.limit(selected_float32=4000, unselected=100) == 900
    with pytest.raises(dataclasses.FrozenInstanceError):
        both.bytes = 5  # type: ignore[misc]


def test_metrics_are_zero_on_equal_outputs_and_positive_otherwise():
    a = jax.random.normal(jax.random.key(0), (4, 6))
    b = a + 0.1 * jax.random.normal(jax.random.key(1), (4, 6))
    for metric in (cosine, mse, kl):
        assert float(metric(a, a)) == 0.0
        assert float(metric(a, b)) > 0.0
    # Zero rows: equal ones cost nothing.
    zeros = jnp.zeros((2, 3))
    assert float(cosine(zeros, zeros)) == 0.0
    pair = float(cosine({"x": a, "y": a}, {"x": a, "y": b}))
    assert pair == pytest.approx(float(cosine(a, b)), rel=1e-4)


# The solver on its own.


def _brute_force(options, capacity):
    best = None
    for combo in itertools.product(*(range(len(item)) for item in options)):
        size = sum(options[i][c][0] for i, c in enumerate(combo))
        cost = sum(options[i][c][1] for i, c in enumerate(combo))
        if size <= capacity and (best is None or cost < best[1] - 1e-12):
            best = (size, cost)
    return best


def test_knapsack_on_a_hand_made_instance():
    # The greedy "best loss per byte" order would take item 0's middle option first.
    options = [
        [(8, 0.0), (4, 1.0), (2, 5.0)],
        [(8, 0.0), (5, 0.5), (1, 9.0)],
        [(6, 0.0), (3, 2.0)],
    ]
    for capacity in range(6, 23):
        found = solve(options, capacity)
        expected = _brute_force(options, capacity)
        if expected is None:
            assert found is None
            continue
        choices, size, cost = found
        assert cost == pytest.approx(expected[1])
        assert size <= capacity
        assert size == sum(options[i][c][0] for i, c in enumerate(choices))
        assert cost == pytest.approx(sum(options[i][c][1] for i, c in enumerate(choices)))
    assert solve(options, 5) is None
    assert solve(options, 12) == ((1, 1, 1), 12, 3.5)


@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 30), st.floats(0.0, 10.0, allow_nan=False)),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 120),
)
def test_knapsack_matches_brute_force(options, capacity):
    found = solve(options, capacity)
    expected = _brute_force(options, capacity)
    if expected is None:
        assert found is None
        return
    assert found is not None
    choices, size, cost = found
    assert size <= capacity
    assert size == sum(options[i][c][0] for i, c in enumerate(choices))
    assert cost == pytest.approx(sum(options[i][c][1] for i, c in enumerate(choices)), abs=1e-9)
    assert cost == pytest.approx(expected[1], abs=1e-9)
    frontier = pareto_frontier(options)
    assert np.all(np.diff(frontier.sizes) > 0) and np.all(np.diff(frontier.costs) < 0)


def test_knapsack_rejects_bad_options():
    with pytest.raises(ValueError, match="item 1 has no option"):
        solve([[(1, 0.0)], []], 5)
    with pytest.raises(ValueError, match="non-negative integers"):
        solve([[(-1, 0.0)]], 5)
    with pytest.raises(ValueError, match="finite"):
        solve([[(1, float("nan"))]], 5)
