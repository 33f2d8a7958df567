"""Tests for jaxcompress.filters: filter forms, built-in predicates and leaf paths."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

import jaxcompress as jc
from jaxcompress.core.paths import path_to_str
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.transforms.base import select_leaves
from jaxcompress.transforms.filters import (
    all_of,
    compile_filter,
    dense_only,
    everything,
    floating,
    kernels,
    not_,
    nothing,
)

MATRIX = jnp.zeros((4, 3), jnp.float32)
VECTOR = jnp.zeros((3,), jnp.float32)


def _sparse(shape=(2, 4)):
    weight = jnp.arange(1.0, 1.0 + np.prod(shape), dtype=jnp.float32).reshape(shape)
    return jc.prune(0.5)({"w": weight})[0]["w"]


# --------------------------------------------------------------------------- regex strings


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("kernel", "a/b/kernel", True),
        ("b", "a/b/kernel", True),  # search, not match: hits mid-path
        ("b/ker", "a/b/kernel", True),
        ("^a/b", "a/b/kernel", True),
        ("^b", "a/b/kernel", False),  # anchored at the start of the whole path
        ("kernel$", "a/b/kernel", True),
        ("kernel$", "a/b/kernel_2", False),
        ("bias", "a/b/kernel", False),
        ("dense[12]/kernel", "dense2/kernel", True),
        ("dense[12]/kernel", "dense3/kernel", False),
        ("^a/b/kernel$", "a/b/kernel", True),
        ("", "a/b/kernel", True),  # the empty pattern is found in every path
        ("a.b", "a/b/kernel", True),  # regex dot, not a literal
        (r"a\.b", "a/b/kernel", False),
    ],
)
def test_regex_string_uses_re_search_on_path(pattern, path, expected):
    assert compile_filter(pattern)(path, MATRIX) is expected


def test_regex_ignores_the_leaf():
    select = compile_filter("kernel")
    assert select("x/kernel", None) is True
    assert select("x/bias", MATRIX) is False


def test_regex_selects_leaves_of_a_tree_by_path():
    params = {
        "enc": {"dense": {"kernel": MATRIX, "bias": VECTOR}},
        "dec": {"dense": {"kernel": MATRIX, "bias": VECTOR}},
    }
    selected, entries, _ = select_leaves(params, "^enc/.*kernel$")
    assert [entry.path for entry in selected] == ["enc/dense/kernel"]
    assert [entry.path for entry in entries] == [
        "dec/dense/bias",
        "dec/dense/kernel",
        "enc/dense/bias",
        "enc/dense/kernel",
    ]
    selected, _, _ = select_leaves(params, "dense")
    assert len(selected) == 4


@pytest.mark.parametrize("pattern", ["(", "[a-", "*kernel", "a{2,1}"])
def test_invalid_regex_raises_value_error(pattern):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_filter(pattern)


def test_invalid_regex_inside_tuple_and_combinators_raises_value_error():
    with pytest.raises(ValueError, match=r"'\('"):
        compile_filter(("kernel", "("))
    with pytest.raises(ValueError):
        not_("(")
    with pytest.raises(ValueError):
        all_of(kernels, "[")
    # masked compiles its filter eagerly, at construction time.
    with pytest.raises(ValueError):
        jc.masked(jc.prune(0.5), "(")


# --------------------------------------------------------------------------- non-filters


@pytest.mark.parametrize("bad", [3, 2.5, None, ["kernel"], {"kernel": True}, b"kernel"])
def test_non_filter_raises_type_error(bad):
    with pytest.raises(TypeError, match="where="):
        compile_filter(bad)


def test_non_filter_inside_tuple_raises_type_error():
    with pytest.raises(TypeError, match="int"):
        compile_filter(("kernel", 3))
    with pytest.raises(TypeError):
        not_(3)
    with pytest.raises(TypeError):
        all_of(kernels, 3)


# --------------------------------------------------------------------------- predicates


def test_predicate_is_called_with_path_and_leaf():
    calls = []

    def predicate(path, leaf):
        calls.append((path, leaf.shape))
        return leaf.shape == (3,)

    assert compile_filter(predicate) is predicate
    params = {"a": {"kernel": MATRIX, "bias": VECTOR}}
    selected, _, _ = select_leaves(params, predicate)
    assert [entry.path for entry in selected] == ["a/bias"]
    assert calls == [("a/bias", (3,)), ("a/kernel", (4, 3))]


# --------------------------------------------------------------------------- tuples


def test_tuple_is_any_of():
    select = compile_filter(("bias", kernels))
    assert select("dense/bias", VECTOR) is True  # regex hit
    assert select("dense/kernel", MATRIX) is True  # predicate hit
    assert select("dense/scale", VECTOR) is False  # neither


def test_empty_tuple_selects_nothing_and_nested_tuples_work():
    assert compile_filter(())("a/kernel", MATRIX) is False
    select = compile_filter(("x", ("y", ("z",))))
    assert [select(p, MATRIX) for p in ("a/x", "a/y", "a/z", "a/w")] == [True, True, True, False]


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("leaf", "expected"),
    [
        (jnp.zeros((4, 3), jnp.float32), True),
        (jnp.zeros((3, 3, 1, 6), jnp.float32), True),
        (jnp.zeros((4, 3), jnp.bfloat16), True),
        (np.zeros((4, 3), np.float16), True),
        (jnp.zeros((1, 1), jnp.float32), True),
        (jnp.zeros((3,), jnp.float32), False),
        (jnp.zeros((), jnp.float32), False),
        (jnp.zeros((4, 3), jnp.int32), False),
        (jnp.zeros((4, 3), jnp.bool_), False),
        (np.zeros((4, 3), np.uint8), False),
        (1.0, False),
        ("kernel", False),
    ],
)
def test_kernels(leaf, expected):
    assert kernels("any/path", leaf) is expected


@pytest.mark.parametrize("path", ["conv/bias", "bias", "attn/query/bias"])
def test_kernels_leave_biases_of_any_shape(path):
    # equinox's conv bias is (out, 1, 1); flax DenseGeneral's is (heads, head_dim).
    assert kernels(path, jnp.zeros((8, 1, 1))) is False
    assert kernels(path.replace("bias", "biases"), jnp.zeros((8, 1, 1))) is True


@pytest.mark.parametrize(
    ("leaf", "expected"),
    [
        (jnp.zeros((3,), jnp.float32), True),
        (jnp.zeros((4, 3), jnp.float32), True),
        (jnp.zeros((3,), jnp.bfloat16), True),
        (np.zeros((2,), np.float64), True),
        (jnp.zeros((), jnp.float32), False),
        (jnp.zeros((3,), jnp.int32), False),
        (jnp.zeros((3,), jnp.bool_), False),
        (jnp.zeros((), jnp.int32), False),
        (1.0, False),
    ],
)
def test_floating(leaf, expected):
    assert floating("any/path", leaf) is expected


def test_default_prune_compresses_bfloat16_kernels():
    # Regression: bfloat16 is not np.floating (np.issubdtype is False for ml_dtypes), so
    # an np.issubdtype check made kernels/floating silently skip bf16 weights.
    params = {"w": jnp.arange(1.0, 9.0, dtype=jnp.float32).reshape(2, 4).astype(jnp.bfloat16)}
    out, stats = jc.prune(0.5)(params)
    assert stats == {"w": {"pruned": 4, "size": 8}}
    assert jc.is_compressed(out["w"])
    assert out["w"].values.dtype == jnp.bfloat16
    assert out["w"].values.tolist() == [5.0, 6.0, 7.0, 8.0]


def test_explicitly_selected_bfloat16_leaf_can_be_pruned():
    params = {"w": jnp.arange(1.0, 9.0, dtype=jnp.float32).reshape(2, 4).astype(jnp.bfloat16)}
    out, _ = jc.prune(0.5, where="w")(params)  # once: TypeError "only floating-point ..."
    assert out["w"].nnz == 4
    assert out["w"].materialize().dtype == jnp.bfloat16


def test_dense_only():
    assert dense_only("w", MATRIX) is True
    assert dense_only("w", 1.0) is True
    assert dense_only("w", _sparse()) is False


def test_kernels_and_dense_only_combine_to_skip_compressed_leaves():
    sparse = _sparse()
    # A compressed 2-D float leaf still looks like a kernel (shape and dtype are static)...
    assert kernels("w", sparse) is True
    # ...so all_of(kernels, dense_only) is how to leave it alone.
    select = all_of(kernels, dense_only)
    assert select("w", sparse) is False
    assert select("w", MATRIX) is True
    assert select("w", VECTOR) is False


def test_nothing_and_everything():
    for leaf in (MATRIX, VECTOR, 1.0, None, _sparse()):
        assert nothing("a/kernel", leaf) is False
        assert everything("a/kernel", leaf) is True


def test_not_():
    assert not_("bias")("dense/bias", VECTOR) is False
    assert not_("bias")("dense/kernel", MATRIX) is True
    assert not_(kernels)("dense/kernel", MATRIX) is False
    assert not_(kernels)("dense/bias", VECTOR) is True
    # A tuple inside not_ is "none of".
    none_of = not_(("bias", "scale"))
    assert [none_of(p, VECTOR) for p in ("a/bias", "a/scale", "a/kernel")] == [False, False, True]
    assert not_(nothing)("x", VECTOR) is True
    assert not_(not_("bias"))("dense/bias", VECTOR) is True


def test_all_of():
    select = all_of(kernels, "dense1")
    assert select("dense1/kernel", MATRIX) is True
    assert select("dense2/kernel", MATRIX) is False
    assert select("dense1/bias", VECTOR) is False
    assert all_of("a", "b", "c")("a/b/c", VECTOR) is True
    assert all_of("a", "b", "c")("a/b/d", VECTOR) is False
    # all_of with a tuple member: that member is any-of.
    select = all_of(("enc", "dec"), kernels)
    assert select("enc/w", MATRIX) is True
    assert select("dec/w", MATRIX) is True
    assert select("mid/w", MATRIX) is False
    # No members: vacuously true.
    assert all_of()("x", VECTOR) is True


def test_filters_drive_masked_transform():
    params = {"enc": {"kernel": jnp.ones((4, 4))}, "dec": {"kernel": jnp.ones((4, 4))}}
    out, _ = jc.masked(jc.prune(0.5), not_("enc"))(params)
    assert not jc.is_compressed(out["enc"]["kernel"])
    assert jc.is_compressed(out["dec"]["kernel"])
    assert out["dec"]["kernel"].nnz == 8


# --------------------------------------------------------------------------- path_to_str


class _Pair(NamedTuple):
    first: jax.Array
    second: jax.Array


class _Opaque:
    """A pytree node registered without keys: jax gives it FlattenedIndexKey paths."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(
    _Opaque, lambda node: ((node.a, node.b), None), lambda _, children: _Opaque(*children)
)


@pytest.mark.parametrize(
    ("key_path", "expected"),
    [
        ((), ""),
        ((DictKey("dense1"), DictKey("kernel")), "dense1/kernel"),
        ((DictKey("dense1"), DictKey("kernel"), GetAttrKey("value")), "dense1/kernel"),
        ((DictKey(0), DictKey(1)), "0/1"),
        ((SequenceKey(2), DictKey("w")), "2/w"),
        ((DictKey("x"), FlattenedIndexKey(3)), "x/3"),
        ((GetAttrKey("layer"), GetAttrKey("kernel")), "layer/kernel"),
        # Only a trailing GetAttrKey("value") is dropped...
        ((GetAttrKey("value"), DictKey("w")), "value/w"),
        # ...not a dict key that happens to be called "value".
        ((DictKey("a"), DictKey("value")), "a/value"),
        ((GetAttrKey("value"),), ""),
    ],
)
def test_path_to_str(key_path, expected):
    assert path_to_str(key_path) == expected


def test_path_to_str_on_real_tree_paths():
    tree = {
        "layers": [{"w": 1.0}, {"w": 2.0}],
        "pair": _Pair(3.0, 4.0),
        "opaque": _Opaque(5.0, 6.0),
    }
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == [
        "layers/0/w",
        "layers/1/w",
        "opaque/0",
        "opaque/1",
        "pair/first",
        "pair/second",
    ]


def _linen_and_nnx_params():
    x = jnp.zeros((1, 64), jnp.float32)
    linen_params = LeNet300100().init(jax.random.key(0), x)["params"]
    nnx_state = nnx.state(LeNet300100NNX(rngs=nnx.Rngs(0)), nnx.Param)
    return linen_params, nnx_state


def test_path_to_str_drops_nnx_value_and_matches_linen_paths():
    linen_params, nnx_state = _linen_and_nnx_params()
    nnx_flat = jax.tree_util.tree_flatten_with_path(nnx_state)[0]
    # The raw nnx key paths do end in GetAttrKey("value")...
    assert all(
        isinstance(path[-1], GetAttrKey) and path[-1].name == "value" for path, _ in nnx_flat
    )
    nnx_paths = [path_to_str(path) for path, _ in nnx_flat]
    # ...but the normalised paths do not.
    assert not any(path.endswith("value") for path in nnx_paths)
    linen_paths = [
        path_to_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(linen_params)[0]
    ]
    expected = [f"dense{i}/{name}" for i in (1, 2, 3) for name in ("bias", "kernel")]
    assert nnx_paths == expected
    assert linen_paths == expected


def test_same_filter_selects_same_leaves_in_linen_and_nnx():
    linen_params, nnx_state = _linen_and_nnx_params()
    for where in ("kernel$", "^dense2/", ("dense1/bias", "dense3/kernel"), kernels, floating):
        linen_selected, _, _ = select_leaves(linen_params, where)
        nnx_selected, _, _ = select_leaves(nnx_state, where)
        assert [e.path for e in linen_selected] == [e.path for e in nnx_selected]
        assert [e.leaf.shape for e in linen_selected] == [e.leaf.shape for e in nnx_selected]
    selected, _, _ = select_leaves(nnx_state, "kernel$")
    assert [e.path for e in selected] == ["dense1/kernel", "dense2/kernel", "dense3/kernel"]


# --------------------------------------------------------------------------- exact and glob


def test_a_regex_is_searched_anywhere_so_dense1_also_selects_dense10():
    # Documented: the reason exact() and glob() exist.
    assert compile_filter("dense1")("dense10/kernel", MATRIX) is True
    assert jc.filters.exact("dense1/kernel")("dense10/kernel", MATRIX) is False
    assert jc.filters.glob("dense1/*")("dense10/kernel", MATRIX) is False


@pytest.mark.parametrize(
    ("paths", "path", "expected"),
    [
        (("dense1/kernel",), "dense1/kernel", True),
        (("dense1/kernel",), "dense10/kernel", False),
        (("dense1/kernel",), "enc/dense1/kernel", False),
        (("dense1/kernel",), "dense1/kernel2", False),
        (("a", "b/c"), "b/c", True),
        ((), "a", False),
        (("a.b",), "aXb", False),  # no regex
    ],
)
def test_exact_compares_whole_paths(paths, path, expected):
    assert jc.filters.exact(*paths)(path, MATRIX) is expected


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("layers/*/kernel", "layers/0/kernel", True),
        ("layers/*/kernel", "layers/10/kernel", True),
        ("layers/*/kernel", "layers/0/attn/kernel", False),  # * stays in one segment
        ("layers/*/kernel", "enc/layers/0/kernel", False),  # whole path
        ("layers/*/kernel", "layers/0/kernel_2", False),
        ("*", "kernel", True),
        ("*", "dense/kernel", False),
        ("**/kernel", "kernel", True),
        ("**/kernel", "a/b/c/kernel", True),
        ("**/kernel", "a/b/c/kernels", False),
        ("enc/**", "enc/a/b", True),
        ("dense?/kernel", "dense1/kernel", True),
        ("dense?/kernel", "dense10/kernel", False),
        ("dense?/kernel", "dense/kernel", False),
        ("a?b", "a/b", False),  # ? never matches /
        ("dense[12]/kernel", "dense2/kernel", True),
        ("dense[12]/kernel", "dense3/kernel", False),
        ("dense[!12]/kernel", "dense3/kernel", True),
        ("dense[!12]/kernel", "dense1/kernel", False),
        ("a[!x]b", "a/b", False),  # a negated set never matches /
        ("Dense/kernel", "dense/kernel", False),  # case matters
        ("a.b", "aXb", False),  # . is literal
        ("a+b(c)", "a+b(c)", True),
    ],
)
def test_glob_is_fnmatch_with_slash_aware_star(pattern, path, expected):
    assert jc.filters.glob(pattern)(path, MATRIX) is expected


def test_glob_and_exact_take_several_and_combine_with_other_filters():
    params = {
        "layers": {"0": {"kernel": MATRIX, "bias": VECTOR}, "1": {"kernel": MATRIX}},
        "head": {"kernel": MATRIX},
    }
    where = (jc.filters.glob("layers/*/bias"), jc.filters.exact("head/kernel"))
    selected, _, _ = select_leaves(params, where)
    assert [entry.path for entry in selected] == ["head/kernel", "layers/0/bias"]
    selected, _, _ = select_leaves(params, all_of(jc.filters.glob("layers/**"), kernels))
    assert [entry.path for entry in selected] == ["layers/0/kernel", "layers/1/kernel"]
    assert repr(jc.filters.glob("a/*", "b")) == "glob('a/*', 'b')"
    assert repr(jc.filters.exact("a/b")) == "exact('a/b')"


@pytest.mark.parametrize("factory", [lambda: jc.filters.exact(3), lambda: jc.filters.glob(None)])
def test_exact_and_glob_refuse_non_strings(factory):
    with pytest.raises(TypeError, match="must be strings"):
        factory()


# --------------------------------------------------------------------------- nothing selected

TYPO_PARAMS = {
    "Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
}


def _only_warning(record) -> str:
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return messages[0]


def test_a_filter_that_selects_nothing_warns_with_the_paths_it_may_have_meant():
    with pytest.warns(UserWarning) as record:
        out, stats = jc.prune(0.5, where="Dense/Kernel")(TYPO_PARAMS)
    message = _only_warning(record)
    assert "where='Dense/Kernel' selects none of the 4 leaves" in message
    assert "did you mean 'Dense_0/kernel', 'Dense_1/kernel'" in message
    assert "searched anywhere" in message
    assert record[0].filename == __file__  # it points at the caller, not the library
    assert stats == {} and out["Dense_0"]["kernel"] is TYPO_PARAMS["Dense_0"]["kernel"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: jc.prune(0.5, where=jc.filters.exact("dense_0/kernel")),
        lambda: jc.quantize(4, where=jc.filters.glob("Dense_0/Kernel")),
        lambda: jc.cluster(3, where=("nope", "dense_1/kernel")),
        lambda: jc.low_rank(1, where="dense_0/kernel"),
        lambda: jc.prune_nm("2:4", where="dense_0/kernel"),
    ],
)
def test_every_factory_and_filter_form_suggests_close_paths(make):
    with pytest.warns(UserWarning, match="did you mean") as record:
        make()(TYPO_PARAMS)
    assert len(record) == 1


def test_the_default_filter_on_a_tree_without_kernels_warns_too():
    with pytest.warns(UserWarning, match="where=kernels selects none of the 2 leaves") as record:
        _, stats = jc.quantize(8)({"scale": VECTOR, "bias": VECTOR})
    assert stats == {} and "the paths are 'bias', 'scale'" in _only_warning(record)


def test_no_warning_when_something_is_selected_or_nothing_was_asked_for(recwarn):
    jc.prune(0.5, where="Dense_0/kernel")(TYPO_PARAMS)
    jc.prune(0.5, where=nothing)(TYPO_PARAMS)
    jc.prune(0.5, where=())(TYPO_PARAMS)
    jc.prune(0.5)({})  # no leaf to select from
    jc.masked(jc.prune(0.5), "Dense_0")(TYPO_PARAMS)
    assert [str(w.message) for w in recwarn] == []


def test_masked_that_selects_nothing_warns_once():
    with pytest.warns(UserWarning) as record:
        jc.masked(jc.prune(0.5), "dense_0")(TYPO_PARAMS)
    assert _only_warning(record).startswith("masked: where='dense_0' selects none")
    # The inner transform's own filter, over the leaves masked shows it.
    with pytest.warns(UserWarning) as record:
        jc.masked(jc.prune(0.5), "Dense_0/bias")(TYPO_PARAMS)
    assert "where=kernels selects none of the 1 leaf" in _only_warning(record)


@pytest.mark.parametrize("key", [None, jax.random.key(0)])  # leaf by leaf, stage by stage
def test_a_later_chain_stage_that_selects_nothing_warns_once(key):
    tx = jc.chain(jc.prune(0.5), jc.cluster(3, where="Dense_2"))
    with pytest.warns(UserWarning) as record:
        _, (first, second) = tx(TYPO_PARAMS, key=key)
    assert "cluster" in _only_warning(record) and second == {} and len(first) == 2


def test_partition_warns_for_a_group_its_transform_selects_nothing_in():
    labels = {"Dense_0": {"kernel": "a", "bias": "b"}, "Dense_1": {"kernel": "a", "bias": "b"}}
    with pytest.warns(UserWarning) as record:
        jc.partition({"a": jc.prune(0.5), "b": jc.prune(0.5)}, labels)(TYPO_PARAMS)
    assert "where=kernels selects none of the 2 leaves" in _only_warning(record)


def test_a_filter_that_selects_nothing_warns_under_jit():
    with pytest.warns(UserWarning, match="selects none"):
        jax.jit(lambda p: jc.quantize(8, where="Dense/Kernel")(p)[0])(TYPO_PARAMS)


def test_the_training_wrappers_and_projections_warn_when_their_filter_selects_nothing():
    import optax
    from calibration_stats import stats_of

    params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    with pytest.warns(UserWarning, match="pruned: where='Dense/Kernel' selects none"):
        jc.training.pruned(optax.sgd(0.1), 0.5, where="Dense/Kernel").init(params)
    with pytest.warns(UserWarning, match=r"fake_quant\(8.*where='Dense/Kernel' selects none"):
        jc.training.fake_quant(bits=8, where="Dense/Kernel")(params)
    stats = {"dense/kernel": stats_of(jnp.ones((4, 8)))}
    with pytest.warns(UserWarning, match=r"pca\(2\): where='Dense/Kernel' selects none"):
        jc.pca(2, where="Dense/Kernel")(params, data=stats)
