"""Data-free transforms on equinox weights, stored output first: ``(out, in)``, ``(out, in, h, w)``.

Each is compared with the same weights seen inputs first (``W.T``, a conv as
``(in, h, w, out)``) in a plain dict, which every transform already treats as linen's layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.arrays.leading import to_leading

eqx = pytest.importorskip("equinox")


class Tiny(eqx.Module):
    linear: eqx.nn.Linear
    conv: eqx.nn.Conv2d

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(16, 8, key=k1)  # (8, 16)
        self.conv = eqx.nn.Conv2d(2, 4, 2, key=k2)  # (4, 2, 2, 2): 8 inputs per output


@pytest.fixture(scope="module")
def tiny():
    model = Tiny(jax.random.key(0))
    twin = {
        "linear": {"kernel": model.linear.weight.T},
        "conv": {"kernel": to_leading(model.conv.weight, 3)},
    }
    return model, twin


def _weights(model):
    return jc.materialize(model.linear.weight), jc.materialize(model.conv.weight)


def _twin_weights(twin):
    dense = jc.materialize(twin)
    # Back to (out, in) and (out, in, h, w).
    return dense["linear"]["kernel"].T, jnp.moveaxis(dense["conv"]["kernel"], -1, 0)


def _same_as_twin(model, twin, **tolerance):
    for leaf, twin_leaf in zip(_weights(model), _twin_weights(twin), strict=True):
        np.testing.assert_allclose(leaf, twin_leaf, **tolerance)


def test_prune_nm_keeps_2_of_every_4_inputs_of_each_output(tiny):
    model, twin = tiny
    tx = jc.prune_nm("2:4", where="weight")
    pruned, stats = eqx.filter_jit(tx)(model)
    for weight in _weights(pruned):
        runs = np.asarray(weight).reshape(weight.shape[0], -1, 4)
        np.testing.assert_array_equal((runs != 0).sum(-1), 2)
    assert stats["linear/weight"]["pruned"] == 64
    _same_as_twin(pruned, jc.prune_nm("2:4", where="kernel")(twin)[0], rtol=0, atol=0)
    # A plain dict holding the same (8, 16) array is read as (in, out), as before.
    plain = jc.materialize(jc.prune_nm("2:4")({"w": model.linear.weight})[0])["w"]
    np.testing.assert_array_equal((np.asarray(plain).reshape(2, 4, 16) != 0).sum(1), 2)


def test_prune_blocks_tiles_the_inputs_first_view(tiny):
    model, twin = tiny
    pruned, _ = eqx.filter_jit(jc.prune_blocks(0.5, block=(4, 2), where="weight"))(model)
    expected, _ = jc.prune_blocks(0.5, block=(4, 2), where="kernel")(twin)
    _same_as_twin(pruned, expected, rtol=0, atol=0)
    # Global ranking too (eager: the sizes depend on the data).
    pruned, _ = jc.prune_blocks(0.5, block=(4, 2), scope="global", where="weight")(model)
    expected, _ = jc.prune_blocks(0.5, block=(4, 2), scope="global", where="kernel")(twin)
    _same_as_twin(pruned, expected, rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [None, 4])
def test_quantize_scales_each_output_channel_by_default(tiny, group_size):
    model, twin = tiny
    quantized, _ = eqx.filter_jit(jc.quantize(4, group_size=group_size, where="weight"))(model)
    assert quantized.linear.weight.axis == 0 and quantized.conv.weight.axis == 0
    expected, _ = jc.quantize(4, group_size=group_size, where="kernel")(twin)
    _same_as_twin(quantized, expected, rtol=0, atol=0)
    # An explicit axis is taken as given.
    explicit, _ = jc.quantize(4, axis=1, where="linear/weight")(model)
    assert explicit.linear.weight.axis == 1


def test_fake_quant_matches_quantize_on_output_first_weights(tiny):
    model, _ = tiny
    fake = jc.training.fake_quant(4, where="weight")(model)
    stored = jc.materialize(jc.quantize(4, where="weight")(model)[0])
    for leaf, expected in zip(_weights(fake), _weights(stored), strict=True):
        np.testing.assert_array_equal(leaf, expected)


def test_low_rank_splits_a_conv_after_its_output_axis(tiny):
    model, twin = tiny
    factored, stats = eqx.filter_jit(jc.low_rank(rank=2, where="weight"))(model)
    leaf = factored.conv.weight
    assert (leaf.u.shape, leaf.v.shape, leaf.fan_in_axes) == ((4, 2), (2, 8), 1)
    expected, _ = jc.low_rank(rank=2, where="kernel")(twin)
    _same_as_twin(factored, expected, rtol=1e-5, atol=1e-6)


def test_global_prune_never_empties_an_output_row():
    layer = eqx.nn.Linear(4, 3, key=jax.random.key(1))
    weight = jnp.array([[1e-3, 2e-3, 3e-3, 4e-3], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    layer = eqx.tree_at(lambda m: m.weight, layer, weight)
    pruned, stats = jc.prune(0.5, scope="global", where="weight")(layer)
    kept = np.asarray(pruned.weight.keep_mask())
    assert kept.any(axis=1).all(), kept
    assert stats["weight"]["pruned"] == 6
