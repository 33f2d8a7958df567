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
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.hybrid.latency import MODEL, UseBench, median_times, use_program
from jaxcompress.hybrid.output_metrics import cosine, kl, mse
from jaxcompress.jaxpr.graph import trace_uses
from jaxcompress.numerics.knapsack import pareto_frontier, solve, solve2

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


# Latency budgets, with a fake timer: the selection is checked exactly, nothing is timed.

MICRO = 1e-6
# Per weight, per format: its uses' time in microseconds; the whole dense model 1000.
USE_TIMES = {
    "l1/kernel": {"dense": 100, "int8": 70, "kmeans3": 40},
    "l2/kernel": {"dense": 100, "int8": 50, "kmeans3": 45},
    "l3/kernel": {"dense": 100, "int8": 80, "kmeans3": 20},
}
MODEL_TIME = 1000


class FakeTimer:
    """Times from the tables above; the chosen model takes ``chosen`` µs."""

    def __init__(self, chosen):
        self.chosen = chosen
        self.calls = []

    def __call__(self, calls):
        self.calls.append(dict(calls))
        times = {}
        for path, name in calls:
            if path == MODEL:
                times[(path, name)] = (MODEL_TIME if name == "dense" else self.chosen) * MICRO
            else:
                times[(path, name)] = USE_TIMES[path][name] * MICRO
        return times


def _predicted(combo_times):
    # In integer microseconds, as exact as the plan's integer nanoseconds.
    return MODEL_TIME - sum(t["dense"] for t in USE_TIMES.values()) + sum(combo_times)


def _best(plan, *, latency=None, byte_limit=None, biases=0):
    """Brute force over the plan's measurements: the least loss within both limits."""
    paths = list(plan.measurements)
    best = math.inf
    for combo in itertools.product(*(plan.measurements[p].items() for p in paths)):
        size = biases + sum(bytes_ for _, (bytes_, _) in combo)
        time = _predicted(USE_TIMES[p][name] for p, (name, _) in zip(paths, combo, strict=True))
        if (byte_limit is None or size <= byte_limit) and (latency is None or time <= latency):
            best = min(best, sum(loss for _, (_, loss) in combo))
    return best


@pytest.fixture(scope="module")
def latency_only(linen):
    apply_fn, params, batches = linen
    # All dense is 1000 µs; 850 needs about 150 µs saved across the three uses.
    timer = FakeTimer(chosen=800)
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(latency=850 * MICRO),
        candidates=CANDIDATES,
        progress=False,
        timer=timer,
    )
    return tx, plan, timer


def test_latency_budget_holds_the_predicted_latency_exactly(linen, latency_only):
    _, params, _ = linen
    _, plan, _ = latency_only
    chosen = [USE_TIMES[row.path][row.format] for row in plan.rows]
    assert plan.predicted_latency == pytest.approx(_predicted(chosen) * MICRO, abs=1e-12)
    assert _predicted(chosen) <= 850
    assert plan.dense_latency == pytest.approx(MODEL_TIME * MICRO)
    # The least loss among every choice predicted within 850 µs, bytes unlimited.
    assert plan.predicted_loss == pytest.approx(_best(plan, latency=850), rel=1e-12, abs=1e-15)
    assert plan.predicted_loss > 0.0  # all dense would be 1000 µs
    for row in plan.rows:
        assert row.latency == pytest.approx(USE_TIMES[row.path][row.format] * MICRO)
        assert row.dense_latency == pytest.approx(100 * MICRO)
    assert plan.latencies["l2/kernel"]["kmeans3"] == pytest.approx(45 * MICRO)
    assert plan.latency_notes == {}
    # The latency frontier: predicted seconds up, loss down, the choice on it.
    times = [time for time, _ in plan.latency_frontier]
    losses = [loss for _, loss in plan.latency_frontier]
    assert times == sorted(set(times)) and losses == sorted(set(losses), reverse=True)
    assert plan.latency_frontier[-1] == (pytest.approx(MODEL_TIME * MICRO), 0.0)


def test_plan_reports_predicted_and_measured_latency(latency_only):
    _, plan, timer = latency_only
    assert plan.measured_latency == pytest.approx(800 * MICRO)
    assert plan.latency_exceeded is False
    table = plan.table()
    assert "use µs (dense)" in table
    assert f"predicted {plan.predicted_latency * 1e6:.4g}, measured 800" in table
    assert "over budget" not in table
    assert "latency predicted" in repr(plan)
    # Two timer calls: every use in every format with the dense model, then the choice.
    first, second = timer.calls
    expected = {(MODEL, "dense")} | {(p, n) for p in USE_TIMES for n in CANDIDATES}
    assert set(first) == expected
    assert set(second) == {(MODEL, "chosen")}


def test_timed_thunks_run_the_uses_and_the_chosen_model(linen, latency_only):
    apply_fn, params, batches = linen
    tx, plan, timer = latency_only
    first, second = timer.calls
    (out,) = first[("l1/kernel", "int8")]()  # one use: x @ W, W served by accelerate
    assert out.shape == (batches[0].shape[0], WIDTH)
    (dense,) = first[("l1/kernel", "dense")]()
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=0.1, atol=0.1)
    compressed, _ = tx(params)
    expected = apply_fn(jc.materialize(compressed), batches[0])
    got = second[(MODEL, "chosen")]()
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=0.05)
    assert first[(MODEL, "dense")]().shape == expected.shape


def test_bytes_and_latency_budget_holds_both(linen):
    apply_fn, params, batches = linen
    kernels, biases = _sizes(params)
    byte_limit = biases + 900  # forces a mix, as in `mixed`
    tx, plan = jc.auto(
        apply_fn,
        params,
        batches,
        budget=jc.budget(bytes=byte_limit, latency=830 * MICRO),
        candidates=CANDIDATES,
        progress=False,
        timer=FakeTimer(chosen=700),
    )
    compressed, _ = tx(params)
    assert jc.nbytes(compressed) <= byte_limit
    chosen = [USE_TIMES[row.path][row.format] for row in plan.rows]
    assert _predicted(chosen) <= 830
    assert plan.predicted_latency == pytest.approx(_predicted(chosen) * MICRO, abs=1e-12)
    best = _best(plan, latency=830, byte_limit=byte_limit, biases=biases)
    assert plan.predicted_loss == pytest.approx(best, rel=1e-12, abs=1e-15)
    # The latency limit binds: the bytes-only choice is predicted at 895 µs.
    assert _best(plan, byte_limit=byte_limit, biases=biases) < plan.predicted_loss


def test_measured_latency_over_budget_is_flagged_and_warned(linen):
    apply_fn, params, batches = linen
    with pytest.warns(UserWarning, match="latency_exceeded"):
        _, plan = jc.auto(
            apply_fn,
            params,
            batches,
            budget=jc.budget(latency=900 * MICRO),
            candidates=["dense", "int8"],
            progress=False,
            timer=FakeTimer(chosen=950),
        )
    assert plan.predicted_latency <= 900 * MICRO
    assert plan.latency_exceeded is True
    assert "**over budget**" in plan.table()


def test_unreachable_latency_names_the_smallest_prediction(linen):
    apply_fn, params, batches = linen
    # Fastest: 700 + 40 + 45 + 20 = 805 µs.
    with pytest.raises(ValueError, match="smallest predicted latency is 0.000805 s"):
        jc.auto(
            apply_fn,
            params,
            batches,
            budget=jc.budget(latency=800 * MICRO),
            candidates=CANDIDATES,
            progress=False,
            timer=FakeTimer(chosen=0),
        )
    with pytest.raises(ValueError, match="timer gave"):
        jc.auto(
            apply_fn,
            params,
            batches,
            budget=jc.budget(latency=1.0),
            candidates=["dense"],
            progress=False,
            timer=lambda calls: {},
        )
    with pytest.raises(TypeError, match="timer must be callable"):
        jc.auto(apply_fn, params, batches, budget=jc.budget(latency=1.0), timer=3)


def test_use_programs_rebuild_dots_transposed_uses_and_convolutions():
    x = jnp.ones((2, 6, 6, 3))
    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 3, 8)),
        "out": jax.random.normal(jax.random.key(1), (5, 8)),  # used as x @ W.T
    }

    def apply_fn(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=dn)
        return jnp.mean(y, axis=(1, 2)) @ p["out"].T

    uses = trace_uses(apply_fn, params, x)
    program, spec = use_program(uses["conv"][0])
    assert spec.shape == (2, 6, 6, 3)
    assert program({"w": params["conv"]}, jnp.ones(spec.shape)).shape == (2, 6, 6, 8)
    program, spec = use_program(uses["out"][0])
    assert spec.shape == (2, 8)
    got = program({"w": params["out"]}, jnp.ones(spec.shape))
    expected = np.ones((2, 8)) @ np.asarray(params["out"]).T
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    bench = UseBench(apply_fn, params, x, ["conv", "out"])
    assert bench.notes == {}
    low, _ = jc.low_rank(rank=2)({"out": params["out"]})
    (served,) = bench.use("out", low["out"])()  # factored by accelerate
    (dense,) = bench.use("out", jc.materialize(low)["out"])()  # the same activation
    np.testing.assert_allclose(np.asarray(served), np.asarray(dense), rtol=1e-4, atol=1e-5)
    (conv,) = bench.use("conv", params["conv"])()
    assert conv.shape == (2, 6, 6, 8)


def test_use_that_cannot_be_rebuilt_is_noted():
    params = {"w": jnp.ones((4, 6))}

    def apply_fn(p, x):
        return x @ p["w"].reshape(4, 2, 3).reshape(4, 6)[:, :3]  # a slice: no dot use

    bench = UseBench(apply_fn, params, jnp.ones((2, 4)), ["w"])
    assert "w" in bench.notes and bench.use("w", params["w"]) is None


def test_median_times_runs_every_thunk_in_rounds():
    counts = {"a": 0, "b": 0}

    def thunk(name):
        def run():
            counts[name] += 1
            return jnp.zeros(())

        return run

    times = median_times({("a", "x"): thunk("a"), ("b", "x"): thunk("b")}, rounds=3, min_time=0)
    assert set(times) == {("a", "x"), ("b", "x")} and all(t >= 0 for t in times.values())
    assert counts == {"a": 2 + 3, "b": 2 + 3}  # compile, calibrate, then one per round
    with pytest.raises(ValueError, match="rounds"):
        median_times({}, rounds=0)


def _brute_force2(options, capacities):
    best = None
    for combo in itertools.product(*(range(len(item)) for item in options)):
        a = sum(options[i][c][0] for i, c in enumerate(combo))
        b = sum(options[i][c][1] for i, c in enumerate(combo))
        cost = sum(options[i][c][2] for i, c in enumerate(combo))
        if a <= capacities[0] and b <= capacities[1] and (best is None or cost < best - 1e-12):
            best = cost
    return best


@settings(deadline=None)  # timing is not what this property checks
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 20),
                st.integers(0, 20),
                st.one_of(st.floats(0.0, 10.0, allow_nan=False), st.sampled_from([0.0, 1.0])),
            ),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 80),
    st.integers(0, 80),
)
def test_two_limit_knapsack_matches_brute_force(options, cap_a, cap_b):
    found = solve2(options, (cap_a, cap_b))
    expected = _brute_force2(options, (cap_a, cap_b))
    if expected is None:
        assert found is None
        return
    assert found is not None
    a = sum(options[i][c][0] for i, c in enumerate(found.choices))
    b = sum(options[i][c][1] for i, c in enumerate(found.choices))
    assert (a, b) == found.sizes and a <= cap_a and b <= cap_b
    assert found.cost == pytest.approx(expected, abs=1e-9)


def test_two_limit_knapsack_stays_small_on_forty_weights():
    rng = np.random.default_rng(0)
    options = []
    for _ in range(40):
        size, time = int(rng.integers(1000, 100_000)), float(rng.uniform(5e3, 2e5))
        item = [(4 * size, int(time), 0.0)]
        for _ in range(9):
            fraction = rng.uniform(0.05, 0.6)
            loss = float(rng.exponential(1e-3) / fraction**2)
            item.append((int(4 * size * fraction), int(time * rng.uniform(0.5, 3.0)), loss))
        options.append(item)
    total_a = sum(item[0][0] for item in options)
    total_b = sum(item[0][1] for item in options)
    found = solve2(options, (int(0.3 * total_a), total_b))
    assert found is not None and found.sizes[0] <= 0.3 * total_a
    # The bounds keep a few thousand points where the plain 3-D frontier holds ~1e5.
    assert found.points < 20_000
    # Exact: no single-option change of the optimum is feasible and cheaper.
    for i, item in enumerate(options):
        for a, b, cost in item:
            pick = options[i][found.choices[i]]
            a2, b2 = found.sizes[0] - pick[0] + a, found.sizes[1] - pick[1] + b
            if a2 <= 0.3 * total_a and b2 <= total_b:
                assert found.cost - pick[2] + cost >= found.cost - 1e-12


def test_two_limit_knapsack_rejects_bad_options():
    with pytest.raises(ValueError, match="item 0 has no option"):
        solve2([[]], (1, 1))
    with pytest.raises(ValueError, match="non-negative integers"):
        solve2([[(1, -1, 0.0)]], (1, 1))
    with pytest.raises(ValueError, match="incumbent has 2 choices"):
        solve2([[(1, 1, 0.0)]], (1, 1), incumbent=[0, 0])
