"""jc.distill over a mesh (data parallel) and resumed from orbax checkpoints."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc

KEYS = jax.random.split(jax.random.key(1), 4)
PARAMS = {
    "l1": {"kernel": jax.random.normal(KEYS[0], (16, 32)) / 4, "bias": jnp.zeros(32)},
    "l2": {"kernel": jax.random.normal(KEYS[1], (32, 8)) / 5.6, "bias": jnp.zeros(8)},
}
BATCHES = jax.random.normal(KEYS[2], (3, 16, 16))  # 3 batches of 16 rows
HELD_OUT = [jax.random.normal(KEYS[3], (16, 16))]


def _apply(p, x):
    hidden = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
    return hidden @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


def _distill(tx, **options):
    options = {
        "optimizer": optax.adam(3e-3),
        "steps": 6,
        "loss": "mse",
        "eval_batches": HELD_OUT,
        "progress": False,
        **options,
    }
    return jc.distill(_apply, PARAMS, tx, BATCHES, **options)


def _assert_same_trees(got, want, **tolerance):
    got_leaves, got_def = jax.tree_util.tree_flatten(got)
    want_leaves, want_def = jax.tree_util.tree_flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        if tolerance and jnp.issubdtype(w.dtype, jnp.floating):
            np.testing.assert_allclose(g, w, **tolerance)
        else:
            np.testing.assert_array_equal(g, w)


# --- data parallel -----------------------------------------------------------------------

# Plain SGD: Adam divides each gradient by its own running size, so a gradient that is
# zero but for float noise (its sign set by the order of a sum) becomes a full step,
# and a sum split over devices adds in another order.
MESH_CASES = {
    "quantize int4 g8": jc.quantize(4, group_size=8),
    "prune 50%": jc.prune(0.5),
}


@pytest.mark.bitwise
@pytest.mark.parametrize("features", [None, True])
@pytest.mark.parametrize("name", list(MESH_CASES))
def test_data_parallel_equals_the_single_device_run(mesh8, name, features):
    tx = MESH_CASES[name]
    options = dict(optimizer=optax.sgd(0.1), features=features)
    single, single_report = _distill(tx, **options)
    parallel, report = _distill(tx, mesh=mesh8, **options)
    # Integer leaves (codes, masks) are equal, float ones equal up to the sum order.
    _assert_same_trees(parallel, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(report.loss, single_report.loss, rtol=1e-5)
    np.testing.assert_allclose(report.after, single_report.after, rtol=1e-5)
    assert report.after < report.before  # it trained
    # The batch was split over the 4 devices of "data" and the student stayed replicated.
    kernel = parallel["l1"]["kernel"]
    leaf = kernel.codes if isinstance(kernel, jc.Quantized) else kernel.values
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_rows_that_do_not_split_over_the_mesh_are_refused(mesh8):
    with pytest.raises(ValueError, match=r"batches\[0\] has 6 rows.*4 devices.*'data'"):
        jc.distill(_apply, PARAMS, jc.prune(0.5), [BATCHES[0, :6]], mesh=mesh8, progress=False)
    with pytest.raises(ValueError, match=r"eval_batches\[0\] has 2 rows"):
        _distill(jc.prune(0.5), eval_batches=[HELD_OUT[0][:2]], mesh=mesh8)


# --- checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted():
    """10 steps of a quantized student with features, in one go and without checkpoints."""
    return _distill(jc.quantize(4, group_size=8), steps=10, features=True)


def test_resumed_run_is_bit_identical(tmp_path, uninterrupted):
    tx = jc.quantize(4, group_size=8)
    want, want_report = uninterrupted
    first, first_report = _distill(
        tx, steps=4, features=True, checkpoint_dir=tmp_path, checkpoint_every=3
    )
    assert first_report.resumed_from == 0
    np.testing.assert_array_equal(first_report.loss, want_report.loss[:4])
    got, report = _distill(tx, steps=10, features=True, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert report.resumed_from == 4
    _assert_same_trees(got, want)
    np.testing.assert_array_equal(report.loss, want_report.loss)
    assert report.after == want_report.after


def test_crash_after_a_checkpoint_resumes_from_it(tmp_path, uninterrupted):
    tx = jc.quantize(4, group_size=8)
    want, want_report = uninterrupted
    _distill(tx, steps=7, features=True, checkpoint_dir=tmp_path, checkpoint_every=3)
    # Saved after steps 6 and 7 (the last); a crash during step 7 leaves only 6.
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]
    shutil.rmtree(tmp_path / "7")
    got, report = _distill(tx, steps=10, features=True, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert report.resumed_from == 6
    _assert_same_trees(got, want)
    np.testing.assert_array_equal(report.loss, want_report.loss)
    # A finished run over its own checkpoint takes no step and returns the same.
    again, again_report = _distill(tx, steps=10, features=True, checkpoint_dir=tmp_path)
    assert again_report.resumed_from == 10
    _assert_same_trees(again, want)


def test_resumed_run_on_a_mesh_is_bit_identical(tmp_path, mesh8):
    tx = jc.prune(0.5)
    want, want_report = _distill(tx, steps=5, mesh=mesh8)
    _distill(tx, steps=2, mesh=mesh8, checkpoint_dir=tmp_path, checkpoint_every=1)
    got, report = _distill(tx, steps=5, mesh=mesh8, checkpoint_dir=tmp_path)
    assert report.resumed_from == 2
    _assert_same_trees(got, want)
    np.testing.assert_array_equal(report.loss, want_report.loss)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(tx=jc.quantize(3, group_size=8)), r"transform: saved 'quantize\(4"),
        (dict(features=True), "features: saved None"),
        (dict(loss="cosine"), "loss: saved 'mse'"),
        (dict(optimizer=optax.sgd(0.1)), "opt_state"),
        (dict(train_scale=False), "train"),
        (dict(steps=1), "at step 2, past steps=1"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, match):
    _distill(jc.quantize(4, group_size=8), steps=2, checkpoint_dir=tmp_path)
    options = {"tx": jc.quantize(4, group_size=8), "steps": 3, **change}
    with pytest.raises(ValueError, match=match):
        _distill(options.pop("tx"), checkpoint_dir=tmp_path, **options)


def test_another_key_or_teacher_is_refused(tmp_path):
    tx = jc.cluster(bits=2)
    _distill(tx, steps=1, key=jax.random.key(0), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="key: saved"):
        _distill(tx, steps=2, key=jax.random.key(1), checkpoint_dir=tmp_path)
    # Another teacher compresses to another student, found by its digest.
    other = jax.tree.map(lambda w: 2 * w, PARAMS)
    with pytest.raises(ValueError, match="student: saved"):
        jc.distill(_apply, other, tx, BATCHES, steps=2, key=jax.random.key(0),
                   loss="mse", checkpoint_dir=tmp_path, progress=False)  # fmt: skip


def test_checkpoint_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        _distill(jc.prune(0.5), checkpoint_dir=tmp_path, checkpoint_every=0)
