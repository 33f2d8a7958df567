"""Friendly defaults: the default filter skips leaves a method cannot take (issue 19)."""

from __future__ import annotations

import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cli.files import COMPRESS_HELP
from jaxcompress.cli.recipes import parse_recipe
from jaxcompress.examples.models import LeNet5, LeNet300100
from jaxcompress.methods.prune import magnitude_sparse


@pytest.fixture(scope="module")
def cnn():
    return LeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]


@pytest.fixture(scope="module")
def mlp():
    return LeNet300100().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]


def _mlp(*sizes: int) -> dict:
    """A plain MLP of Dense layers ``layer0, layer1, ...`` between ``sizes``."""
    keys = jax.random.split(jax.random.key(1), len(sizes) - 1)
    return {
        f"layer{i}": {
            "kernel": jax.random.normal(key, (fan_in, fan_out)) / fan_in**0.5,
            "bias": jnp.zeros(fan_out),
        }
        for i, (key, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


@pytest.fixture(scope="module")
def head4():
    return _mlp(32, 16, 4)


@pytest.fixture(scope="module")
def head10():
    return _mlp(256, 100, 10)


def _run_recording(tx, params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = tx(params)
    return out, stats, [w for w in caught if issubclass(w.category, UserWarning)]


CASES = [
    # (factory, options, model fixture, the leaves it cannot take)
    (jc.low_rank, {"rank": 4}, "head4", {"layer1/kernel"}),
    (jc.low_rank, {"rank": 16}, "cnn", {"conv1/kernel", "conv2/kernel", "dense3/kernel"}),
    (jc.low_rank, {"rank": 12}, "mlp", {"dense3/kernel"}),
    # quantize has no unfit leaves: a group_size that does not divide pads the last group.
    (jc.prune_nm, {"pattern": "2:4"}, "cnn", {"conv1/kernel", "conv2/kernel"}),
    (
        jc.prune_blocks,
        {"sparsity": 0.5, "block": (4, 4)},
        "cnn",
        {"conv1/kernel", "conv2/kernel", "dense3/kernel"},
    ),
    (
        jc.prune_blocks,
        {"sparsity": 0.5, "block": (4, 4), "scope": "global"},
        "cnn",
        {"conv1/kernel", "conv2/kernel", "dense3/kernel"},
    ),
]
IDS = [f"{factory.__name__}-{model}-{i}" for i, (factory, _, model, _) in enumerate(CASES)]


@pytest.mark.parametrize(("factory", "options", "model", "unfit"), CASES, ids=IDS)
def test_default_filter_skips_unfit_leaves_with_one_warning(
    factory, options, model, unfit, request
):
    params = request.getfixturevalue(model)
    out, stats, caught = _run_recording(factory(**options), params)
    skipped = {path for path, leaf_stats in stats.items() if "skipped" in leaf_stats}
    assert skipped == unfit
    for path in unfit:
        assert stats[path] == {"skipped": stats[path]["skipped"]}
        assert path in stats[path]["skipped"]
        layer, name = path.split("/")
        assert out[layer][name] is params[layer][name]
    assert len(caught) == 1
    assert all(repr(path) in str(caught[0].message) for path in unfit)
    # Every other kernel was compressed, and the report reads the mixed tree.
    kernels = {p for p in stats if p.endswith("kernel")}
    for path in kernels - unfit:
        layer, name = path.split("/")
        assert jc.is_compressed(out[layer][name]), path
    assert jc.summarize(params, out).ratio > 1


@pytest.mark.parametrize(("factory", "options", "model", "unfit"), CASES, ids=IDS)
def test_own_filter_naming_an_unfit_leaf_still_raises(factory, options, model, unfit, request):
    params = request.getfixturevalue(model)
    path = sorted(unfit)[0]
    with pytest.raises(ValueError, match=path):
        factory(**options, where=path)(params)


def test_skipped_leaves_under_jit_and_in_a_chain(head4):
    out, stats = jax.jit(jc.low_rank(4))(head4)
    assert bool(stats["layer1/kernel"]["skipped"]) is True
    assert out["layer1"]["kernel"].shape == (16, 4)
    # A later stage of a chain runs leaf by leaf and still skips.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tx = jc.chain(jc.quantize(8, axis=None, where="layer1/bias"), jc.low_rank(4))
        out, (first, second) = tx(head4)
    assert "skipped" in second["layer1/kernel"] and "skipped" not in second["layer0/kernel"]
    assert out["layer1"]["kernel"] is head4["layer1"]["kernel"]
    assert isinstance(out["layer1"]["bias"], jc.Quantized)


def _units_kept(leaf) -> jax.Array:
    """How many weights each output unit (index of the last axis) keeps."""
    keep = leaf.keep_mask()
    return jnp.sum(keep.reshape(-1, keep.shape[-1]), axis=0)


@pytest.fixture(scope="module")
def narrow_mlp():
    """LeNet-300-100 on 64 inputs, untrained: its 300 x 100 layer has the smallest weights."""
    return LeNet300100().init(jax.random.key(0), jnp.zeros((1, 64)))["params"]


def test_global_pruning_keeps_a_weight_in_every_output_unit(narrow_mlp, cnn):
    # A 0.9 global threshold would take every weight of dense2 (30000 of them).
    out, stats = jc.prune(0.9, scope="global")(narrow_mlp)
    for path, leaf_stats in stats.items():
        layer, name = path.split("/")
        assert int(jnp.min(_units_kept(out[layer][name]))) >= 1, path
        assert leaf_stats["pruned"] == leaf_stats["size"] - out[layer][name].nnz
    assert stats["dense2/kernel"]["pruned"] == 30000 - 100  # exactly one weight per unit
    kept = out["dense2"]["kernel"].materialize()
    strongest = jnp.argmax(jnp.abs(narrow_mlp["dense2"]["kernel"]), axis=0)
    np.testing.assert_array_equal(
        kept[strongest, jnp.arange(100)], narrow_mlp["dense2"]["kernel"][strongest, jnp.arange(100)]
    )
    # Leaves none of whose units was emptied keep exactly the magnitude mask.
    for layer in ("dense1", "dense3"):
        expected = magnitude_sparse(narrow_mlp[layer]["kernel"], stats[f"{layer}/kernel"]["pruned"])
        np.testing.assert_array_equal(out[layer]["kernel"].keep_mask(), expected.keep_mask())
    # LeNet-5 at 0.95 would empty 18 of dense1's 120 units.
    out, _ = jc.prune(0.95, scope="global")(cnn)
    assert int(jnp.min(_units_kept(out["dense1"]["kernel"]))) >= 1


def test_global_wanda_refuses_to_empty_a_layer_naming_it(narrow_mlp):
    x = jax.random.normal(jax.random.key(2), (32, 64))
    data = jc.calibrate(LeNet300100().apply, {"params": narrow_mlp}, [x])
    with pytest.raises(ValueError, match="dense2/kernel"):
        jc.prune(0.9, scope="global", importance="wanda")(narrow_mlp, data=data["params"])


def test_global_prune_then_cluster_on_an_untrained_model(narrow_mlp):
    tx = jc.chain(jc.prune(0.9, scope="global"), jc.cluster(bits=5))
    out, (pruned, clustered) = tx(narrow_mlp)
    assert set(clustered) == set(pruned)
    assert isinstance(out["dense2"]["kernel"].values, jc.Clustered)


def test_the_recipe_in_compress_help_runs_on_an_untrained_model(narrow_mlp):
    text = COMPRESS_HELP.split("applied in order:")[1].split("Every other key")[0]
    out, _ = parse_recipe(textwrap.dedent(text))(narrow_mlp)
    assert jc.summarize(narrow_mlp, out).ratio > 5
