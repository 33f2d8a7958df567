"""jc.sensitivity: per-layer sensitivity sweeps, their report, and budget allocation."""

import io
import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from rich.console import Console
from rich.progress import Progress

import jaxcompress as jc
from jaxcompress.examples.classifier import fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX

LAYERS = ("dense1/kernel", "dense2/kernel", "dense3/kernel")


@pytest.fixture(scope="module")
def digits():
    return load_digits(split="train"), load_digits(split="test")


@pytest.fixture(scope="module")
def model():
    return LeNet300100()


@pytest.fixture(scope="module")
def trained(model, digits):
    (images, labels), _ = digits
    params = model.init(jax.random.key(0), images[:1])["params"]
    return fit_classifier(model, params, images, labels, epochs=3, learning_rate=1e-3, seed=0)


@pytest.fixture(scope="module")
def accuracy(model, digits):
    _, (images, labels) = digits

    @jax.jit
    def score(params):
        logits = model.apply({"params": params}, images)
        return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))

    return score


@pytest.fixture(scope="module")
def report(trained, accuracy):
    return jc.sensitivity(None, trained, accuracy, progress=False)


def _by_hand(weight, level):
    """``weight`` with the floor(level * n) smallest magnitudes zeroed (numpy, stable ties)."""
    flat = np.array(weight).reshape(-1)
    count = math.floor(Fraction(str(level)) * flat.size)
    flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0.0
    return flat.reshape(np.shape(weight))


def _replace(params, layer, value):
    module, name = layer.split("/")
    return {**params, module: {**params[module], name: value}}


def _predicted_drop(report, allocation):
    return sum(
        np.interp(allocation[layer], (0.0, *report.levels), (0.0, *report.drops(layer)))
        for layer in report.layers
    )


def _pruned_share(report, allocation):
    total = sum(report.sizes.values())
    return sum(report.sizes[layer] * allocation[layer] for layer in report.layers) / total


def test_report_describes_the_sweep(report, trained, accuracy):
    assert report.baseline == float(accuracy(trained))
    assert report.levels == (0.25, 0.5, 0.75, 0.9)
    assert report.method == "magnitude"
    assert report.higher_is_better
    assert report.layers == LAYERS  # kernels only: biases are not layers
    assert report.sizes == {"dense1/kernel": 64 * 300, "dense2/kernel": 300 * 100,
                            "dense3/kernel": 100 * 10}  # fmt: skip
    assert all(len(report.metrics[layer]) == 4 for layer in LAYERS)


def test_each_metric_is_that_layer_pruned_alone(report, trained, accuracy):
    for layer in LAYERS:
        module, name = layer.split("/")
        for level, metric in zip(report.levels, report.metrics[layer], strict=True):
            pruned = _replace(trained, layer, _by_hand(trained[module][name], level))
            assert metric == float(accuracy(pruned)), (layer, level)
    # The same through the public prune + materialize, for one layer.
    for index in (0, 3):
        level, metric = report.levels[index], report.metrics["dense3/kernel"][index]
        compressed, _ = jc.prune(level, where="^dense3/kernel$")(trained)
        assert metric == float(accuracy(jc.materialize(compressed)))
    # Pruning hurts the small output layer at 90 %.
    assert report.metrics["dense3/kernel"][-1] < report.baseline


def test_eval_fn_gets_dense_params_with_only_one_leaf_changed():
    params = {
        "a": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)},
        "b": {"kernel": -jnp.arange(1.0, 9.0).reshape(4, 2)},
    }
    seen = []

    def record(p):
        seen.append(p)
        return 1.0

    report = jc.sensitivity(None, params, record, levels=(0.5, 0.75), progress=False)
    assert report.layers == ("a/kernel", "b/kernel")
    assert len(seen) == 1 + 2 * 2
    expected = [("a/kernel", 0.5, 6), ("a/kernel", 0.75, 9), ("b/kernel", 0.5, 4),
                ("b/kernel", 0.75, 6)]  # fmt: skip
    for p, (layer, level, zeros) in zip(seen[1:], expected, strict=True):
        assert jax.tree.structure(p) == jax.tree.structure(params)
        for path, leaf in jax.tree_util.tree_leaves_with_path(p):
            name = "/".join(key.key for key in path)
            original = np.asarray(params[path[0].key][path[1].key])
            assert not jc.is_compressed(leaf)
            assert leaf.shape == original.shape and leaf.dtype == original.dtype
            if name == layer:
                np.testing.assert_array_equal(leaf, _by_hand(original, level))
                assert int(np.sum(np.asarray(leaf) == 0)) == zeros
            else:
                np.testing.assert_array_equal(leaf, original)


def test_a_loss_with_higher_is_better_false():
    params = {"a": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)},
              "b": {"kernel": jnp.ones((4, 4)).at[0, 0].set(10.0)}}  # fmt: skip

    def distance(p):
        return sum(jnp.sum((p[k]["kernel"] - params[k]["kernel"]) ** 2) for k in p)

    report = jc.sensitivity(
        None, params, distance, levels=(0.5, 0.75), higher_is_better=False, progress=False
    )
    assert report.baseline == 0.0
    assert report.metrics == {"a/kernel": (204.0, 650.0), "b/kernel": (8.0, 12.0)}
    assert report.drops("a/kernel") == (204.0, 650.0)  # a larger loss is a drop
    assert report.allocate(0.5) == {"a/kernel": 0.25, "b/kernel": 0.75}


def test_allocation_meets_the_target_and_prunes_an_insensitive_layer_most(model, trained, digits):
    _, (images, labels) = digits

    @jax.jit
    def loss(params):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # dense1 made insensitive: its smallest 90 % are already zero, so pruning it up to
    # 90 % removes only zeros and costs nothing.
    kernel = trained["dense1"]["kernel"]
    params = _replace(trained, "dense1/kernel", jnp.asarray(_by_hand(kernel, 0.9)))
    report = jc.sensitivity(None, params, loss, higher_is_better=False, progress=False)
    assert report.drops("dense1/kernel") == (0.0, 0.0, 0.0, 0.0)
    for layer in ("dense2/kernel", "dense3/kernel"):  # the loss grows as they lose weights
        drops = report.drops(layer)
        assert all(b > a > 0 for a, b in itertools.pairwise(drops)), (layer, drops)
    sensitive = max(LAYERS, key=lambda layer: report.drops(layer)[-1] / report.sizes[layer])

    allocation = report.allocate(0.6)
    assert list(allocation) == list(LAYERS)
    assert abs(_pruned_share(report, allocation) - 0.6) <= 1e-6
    assert allocation["dense1/kernel"] == 0.9
    assert allocation[sensitive] < allocation["dense1/kernel"]
    assert all(0.0 <= f <= 0.9 for f in allocation.values())
    # Without the change, dense1 costs something and gets less.
    plain = jc.sensitivity(None, trained, loss, higher_is_better=False, progress=False)
    assert plain.allocate(0.6)["dense1/kernel"] < 0.9


def test_allocation_is_the_optimum_for_convex_curves():
    # Convex drops (per-level increments grow), different sizes.
    report = jc.SensitivityReport(
        baseline=1.0,
        levels=(0.25, 0.5, 0.75, 0.9),
        metrics={
            "a": (0.99, 0.97, 0.9, 0.8),
            "b": (0.999, 0.99, 0.95, 0.85),
            "c": (0.95, 0.85, 0.6, 0.3),
        },
        sizes={"a": 300, "b": 1000, "c": 50},
        method="magnitude",
    )
    grid = np.linspace(0.0, 0.9, 181)
    for target in (0.1, 0.37, 0.6, 0.8):
        allocation = report.allocate(target)
        assert abs(_pruned_share(report, allocation) - target) <= 1e-6
        # Brute force over a and c on a grid, b taking up the rest.
        best = math.inf
        for fa in grid:
            for fc in grid:
                fb = (target * 1350 - 300 * fa - 50 * fc) / 1000
                if 0.0 <= fb <= 0.9:
                    best = min(best, _predicted_drop(report, {"a": fa, "b": fb, "c": fc}))
        assert _predicted_drop(report, allocation) <= best + 1e-9, target


def test_allocation_grows_with_the_target(report):
    previous = dict.fromkeys(report.layers, 0.0)
    for target in np.linspace(0.0, 0.9, 19):
        allocation = report.allocate(float(target))
        assert abs(_pruned_share(report, allocation) - target) <= 1e-6
        for layer in report.layers:
            assert allocation[layer] >= previous[layer], (target, layer)
        previous = allocation
    assert previous == dict.fromkeys(report.layers, 0.9)


def test_allocation_bounds(report):
    capped = report.allocate(0.5, max_fraction=0.6)
    assert max(capped.values()) <= 0.6
    assert abs(_pruned_share(report, capped) - 0.5) <= 1e-6
    floored = report.allocate(0.5, min_fraction={"dense3/kernel": 0.4})
    assert floored["dense3/kernel"] >= 0.4
    assert abs(_pruned_share(report, floored) - 0.5) <= 1e-6
    # A max_fraction above the largest level is capped there: no extrapolation.
    assert max(report.allocate(0.85, max_fraction=0.99).values()) <= 0.9
    with pytest.raises(ValueError, match=r"not reachable.*0\.9"):
        report.allocate(0.95)
    with pytest.raises(ValueError, match=r"not reachable.*0\.5"):
        report.allocate(0.6, max_fraction=0.5)
    with pytest.raises(ValueError, match="min_fraction already prunes"):
        report.allocate(0.1, min_fraction=0.5)
    with pytest.raises(ValueError, match="not in the report"):
        report.allocate(0.5, max_fraction={"dense9/kernel": 0.5})
    with pytest.raises(ValueError, match="above its largest allowed"):
        report.allocate(0.5, min_fraction=0.8, max_fraction=0.7)
    with pytest.raises(ValueError, match="target"):
        report.allocate(1.2)


def test_as_transform_prunes_each_layer_by_its_exact_count(report, trained):
    allocation = report.allocate(0.6)
    compressed, _ = report.as_transform(0.6)(trained)
    for layer in LAYERS:
        module, name = layer.split("/")
        leaf, fraction = compressed[module][name], allocation[layer]
        if fraction == 0.0:
            assert leaf is trained[module][name]
            continue
        assert isinstance(leaf, jc.Sparse)
        expected = math.floor(Fraction(repr(fraction)) * report.sizes[layer])
        assert report.sizes[layer] - leaf.nnz == expected
        assert compressed[module]["bias"] is trained[module]["bias"]
    assert sum(isinstance(compressed[m]["kernel"], jc.Sparse) for m in trained) >= 2


def test_table_and_rows_name_every_layer(report):
    table = report.table()
    lines = table.splitlines()
    assert str(report) == table
    assert lines[0].startswith("| layer | size | 25% | 50% | 75% | 90% | drop at 90%")
    assert len(lines) == 2 + len(LAYERS)
    for layer, line in zip(LAYERS, lines[2:], strict=True):
        assert line.startswith(f"| {layer} |")
        assert line.count("|") == lines[0].count("|")
    rows = report.rows()
    assert [row["layer"] for row in rows] == list(LAYERS)
    assert rows[2]["drop"] == pytest.approx(report.baseline - report.metrics["dense3/kernel"][-1])


def test_plot_draws_one_line_per_layer_and_a_dashed_baseline(report):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    figure = report.plot()
    try:
        assert isinstance(figure, Figure)
        lines = figure.axes[0].get_lines()
        layer_lines = [line for line in lines if line.get_label() in LAYERS]
        assert len(layer_lines) == len(LAYERS)
        for line in layer_lines:
            np.testing.assert_allclose(line.get_xdata(), (0.0, *report.levels))
            assert line.get_ydata()[0] == report.baseline
        (baseline,) = [line for line in lines if line.get_linestyle() == "--"]
        assert baseline.get_label() == "baseline"
    finally:
        plt.close(figure)
    own_figure, ax = plt.subplots()
    try:
        assert report.plot(ax=ax) is own_figure
    finally:
        plt.close(own_figure)


def test_nnx_state(digits):
    _, (images, labels) = digits
    graphdef, state = nnx.split(LeNet300100NNX(rngs=nnx.Rngs(0)))

    @jax.jit
    def loss(s):
        logits = nnx.merge(graphdef, s)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    report = jc.sensitivity(
        None, state, loss, levels=(0.5, 0.9), higher_is_better=False, progress=False
    )
    assert report.layers == LAYERS
    assert report.baseline == float(loss(state))
    compressed, _ = jc.prune(0.9, where="^dense2/kernel$")(state)
    assert report.metrics["dense2/kernel"][1] == float(loss(jc.materialize(compressed)))
    allocation = report.allocate(0.5)
    compressed, _ = report.as_transform(0.5)(state)
    sparse = [
        leaf
        for leaf in jax.tree_util.tree_leaves(compressed, is_leaf=jc.is_compressed)
        if isinstance(leaf, jc.Sparse)
    ]
    assert len(sparse) == sum(fraction > 0 for fraction in allocation.values()) >= 1
    assert sum(math.prod(leaf.shape) - leaf.nnz for leaf in sparse) == sum(
        math.floor(Fraction(repr(allocation[layer])) * report.sizes[layer]) for layer in LAYERS
    )


def test_progress_bar_does_not_change_the_result(report, trained, accuracy):
    assert jc.sensitivity(None, trained, accuracy, progress=True) == report
    with Progress(console=Console(file=io.StringIO())) as bar:
        assert jc.sensitivity(None, trained, accuracy, progress=bar) == report
        (task,) = bar.tasks
        assert task.completed == task.total == 1 + 3 * 4


def _tiny():
    return {"a": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)}}


def test_eval_fn_must_return_one_finite_number():
    def nan_when_half_pruned(p):
        return float("nan") if int(jnp.sum(p["a"]["kernel"] == 0)) == 6 else 1.0

    with pytest.raises(ValueError, match=r"'a/kernel' at level 0\.5.*finite"):
        jc.sensitivity(None, _tiny(), nan_when_half_pruned, levels=(0.25, 0.5), progress=False)
    with pytest.raises(ValueError, match="baseline"):
        jc.sensitivity(None, _tiny(), lambda p: jnp.inf, progress=False)
    with pytest.raises(ValueError, match=r"one real number.*shape \(2,\)"):
        jc.sensitivity(None, _tiny(), lambda p: jnp.ones(2), progress=False)
    with pytest.raises(ValueError, match="one real number"):
        jc.sensitivity(None, _tiny(), lambda p: "good", progress=False)


@pytest.mark.parametrize(
    "levels", [(), (0.5, 0.25), (0.5, 0.5), (0.0, 0.5), (0.5, 1.0), (-0.1,), (True,)]
)
def test_levels_must_be_strictly_increasing_fractions(levels):
    with pytest.raises(ValueError, match="levels"):
        jc.sensitivity(None, _tiny(), lambda p: 1.0, levels=levels, progress=False)


def test_argument_errors():
    with pytest.raises(ValueError, match="selects no leaf"):
        jc.sensitivity(None, _tiny(), lambda p: 1.0, where="nothing_here", progress=False)
    with pytest.raises(ValueError, match="method"):
        jc.sensitivity(None, _tiny(), lambda p: 1.0, method="random", progress=False)
    with pytest.raises(ValueError, match="example_input"):
        jc.sensitivity(lambda p, x: x, _tiny(), lambda p: 1.0, method="units", progress=False)
    with pytest.raises(ValueError, match="apply_fn"):
        jc.sensitivity(None, _tiny(), lambda p: 1.0, method="units", example_input=jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="floating"):
        jc.sensitivity(None, {"w": jnp.ones((2, 2), jnp.int32)}, lambda p: 1.0,
                       where="w", progress=False)  # fmt: skip


def test_report_is_checked_on_construction():
    good = {"baseline": 1.0, "levels": (0.5,), "metrics": {"w": (0.9,)}, "sizes": {"w": 4},
            "method": "magnitude"}  # fmt: skip
    assert jc.SensitivityReport(**good).layers == ("w",)
    for change in (
        {"metrics": {"w": (0.9, 0.8)}},
        {"sizes": {"v": 4}},
        {"sizes": {"w": 0}},
        {"method": "units?"},
        {"levels": (0.5, 0.25)},
        {"metrics": {"w": (float("nan"),)}},
    ):
        with pytest.raises(ValueError):
            jc.SensitivityReport(**{**good, **change})
    units = jc.SensitivityReport(**{**good, "method": "units"})
    with pytest.raises(ValueError, match="prune_units"):
        units.as_transform(0.25)


def test_units_method(model, trained, accuracy, digits):
    (images, _), _ = digits
    example = images[:8]

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    groups = [g for g in jc.coupled_groups(apply_fn, trained, example) if g.prunable]
    report = jc.sensitivity(
        apply_fn, trained, accuracy, method="units", example_input=example,
        levels=(0.25, 0.5), progress=False,
    )  # fmt: skip
    assert report.method == "units"
    assert report.layers == tuple(g.name for g in groups)
    assert report.sizes == {g.name: g.size for g in groups}
    assert report.baseline == float(accuracy(trained))
    for name in report.layers:
        for level, metric in zip(report.levels, report.metrics[name], strict=True):
            tx = jc.prune_units({name: level}, apply_fn=apply_fn, example_input=example)
            _, stats = tx(trained)
            assert metric == float(accuracy(stats.masked(trained))), (name, level)
    allocation = report.allocate(0.3)
    assert abs(_pruned_share(report, allocation) - 0.3) <= 1e-6
    thinned, _ = jc.prune_units(allocation, apply_fn=apply_fn, example_input=example)(trained)
    assert jax.tree.structure(thinned) == jax.tree.structure(trained)
    with pytest.raises(ValueError, match="prune_units"):
        report.as_transform(0.3)
    # where= picks groups by the leaves producing them.
    only = jc.sensitivity(
        apply_fn, trained, accuracy, method="units", example_input=example,
        levels=(0.5,), where="^dense2/", progress=False,
    )  # fmt: skip
    assert only.layers == ("dense2/kernel",)
    assert only.metrics["dense2/kernel"] == report.metrics["dense2/kernel"][1:]
    with pytest.raises(ValueError, match="no prunable unit group"):
        jc.sensitivity(
            apply_fn, trained, accuracy, method="units", example_input=example,
            where="^dense3/", progress=False,
        )  # fmt: skip
