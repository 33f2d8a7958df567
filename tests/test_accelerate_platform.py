"""accelerate(platform=): routes by target platform, the kernel-family hook, export for
cuda and tpu (and serialization), and unprepared trees prepared once."""

import gc
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.examples.minilm import MiniLMConfig, MiniLMEncoder
from jaxcompress.runtime import routes
from jaxcompress.runtime.accelerate import PLATFORMS, default_platform

X = jax.random.normal(jax.random.key(1), (6, 32))


def _params(key=0):
    keys = jax.random.split(jax.random.key(key), 3)
    shapes = [(32, 48), (48, 40), (40, 8)]
    return {
        f"l{i}": {"kernel": jax.random.normal(k, s) * s[0] ** -0.5, "bias": jnp.zeros(s[1])}
        for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
    }


def mlp(p, x):
    for i in range(3):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"][None]
        x = jax.nn.relu(x) if i < 2 else x
    return x


PARAMS = _params()
INT8 = jc.quantize(bits=8, axis=-1)(PARAMS)[0]
FORMATS = {
    "int8": jc.quantize(bits=8, axis=-1),
    "int4 g16": jc.quantize(bits=4, axis=-1, group_size=16),
    "k-means 4-bit": jc.cluster(bits=4),
}


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_platform_defaults_to_the_running_backend_and_is_checked():
    assert default_platform() == "cpu"  # the tests run on CPU devices
    assert jc.accelerate(mlp).platform == "cpu"
    for platform in PLATFORMS:
        assert jc.accelerate(mlp, platform=platform).platform == platform
    with pytest.raises(ValueError, match=r"platform must be one of \('cpu', 'cuda', 'rocm'"):
        jc.accelerate(mlp, platform="gpu")


@pytest.fixture
def no_kernels():
    with routes.using_kernels():
        yield


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_accelerators_take_weight_only_dequantize_without_a_kernel(platform, no_kernels):
    fast = jc.accelerate(mlp, platform=platform)
    plan = fast.explain(INT8, X)
    assert plan.decisions[0].note.startswith("no kernel (no kernel family registered)")
    assert plan.platform == platform
    assert set(plan.routes().values()) == {"dequantize"}  # not CPU's int8 route
    assert "no kernel" in plan.decisions[0].note and platform in plan.decisions[0].note
    assert f"platform: {platform}" in str(plan)
    # The program is that platform's, but runs here too: weight-only, so exact.
    out = fast(INT8, X)
    np.testing.assert_allclose(out, mlp(jc.materialize(INT8), X), rtol=1e-5, atol=1e-5)
    assert set(jc.accelerate(mlp).explain(INT8, X).routes().values()) == {"int8"}


def test_clustered_leaves_stay_exact_indices_on_accelerators():
    clustered, _ = jc.cluster(bits=4)(PARAMS)
    on_tpu = jc.accelerate(mlp, platform="tpu").prepare(clustered)
    on_cpu = jc.accelerate(mlp, platform="cpu").prepare(clustered)
    assert isinstance(on_tpu["l0"]["kernel"], jc.ClusteredMatrix)  # no int8 grid
    assert isinstance(on_cpu["l0"]["kernel"], jc.QuantizedMatrix)  # int8 grid on CPU


@pytest.fixture
def fake_kernels():
    """A test double of a kernel family: int8 codes on cuda only; records its calls."""
    calls = {"asked": [], "ran": []}

    def kernel_for(leaf, rows, platform, **_):
        calls["asked"].append(platform)
        if platform != "cuda":
            return None, f"fake: nothing for {platform}"
        if not isinstance(leaf, jc.QuantizedMatrix) or leaf.bits != 8:
            return None, "fake: int8 codes only"
        return "fake_int8", f"fake: int8 codes at {rows} rows"

    def matmul(x, leaf, *, platform):
        calls["ran"].append((x.shape, platform))
        k, n = leaf.matrix_shape
        return x @ leaf.materialize().reshape(k, n)

    with routes.using_kernels():  # this family alone
        family = routes.register_kernels(kernel_for, matmul)
        assert routes.registered() == (family,)
        yield calls
        routes.unregister_kernels(family)
        assert routes.registered() == ()


def test_a_registered_kernel_is_taken_and_explained(fake_kernels):
    mixed, _ = jc.chain(
        jc.quantize(bits=8, axis=-1, where=r"l0/kernel"),
        jc.quantize(bits=4, axis=-1, where=r"l[12]/kernel"),
    )(PARAMS)
    fast = jc.accelerate(mlp, platform="cuda")
    plan = fast.explain(mixed, X)
    assert plan.routes() == {
        "l0/kernel": "kernel:fake_int8",
        "l1/kernel": "dequantize",
        "l2/kernel": "dequantize",
    }
    assert plan.decisions[0].kernel == "fake_int8"
    assert plan.decisions[0].note == "fake: int8 codes at 6 rows"
    assert "kernel:fake_int8" in str(plan)
    assert "fake: int8 codes only" in plan.decisions[1].note
    fake_kernels["ran"].clear()  # explain traced it too
    out = fast(mixed, X)
    assert fake_kernels["ran"] == [((6, 32), "cuda")]
    np.testing.assert_allclose(out, mlp(jc.materialize(mixed), X), rtol=1e-5, atol=1e-5)
    # On tpu the family declines; on cpu it is never asked.
    assert jc.accelerate(mlp, platform="tpu").explain(mixed, X).routes()["l0/kernel"] == (
        "dequantize"
    )
    asked = len(fake_kernels["asked"])
    jc.accelerate(mlp, platform="cpu").explain(mixed, X)
    assert len(fake_kernels["asked"]) == asked
    # A forced route is taken as asked, kernel or not.
    forced = jc.accelerate(mlp, platform="cuda", route="blocked").explain(mixed, X)
    assert set(forced.routes().values()) == {"blocked"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_a_quantized_mlp_exports_for_the_platform(platform, name):
    compressed, _ = FORMATS[name](PARAMS)
    fast = jc.accelerate(mlp, platform=platform)
    prepared = fast.prepare(compressed)
    exported = jax.export.export(jax.jit(fast), platforms=(platform,))(prepared, X)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == (6, 8)
    # Whatever kernel families are registered: theirs or the fallback, never CPU's int8.
    assert all(
        r == "dequantize" or r.startswith("kernel:") for r in fast.last_plan.routes().values()
    )
    # The compressed codes are the program's inputs, not a dense float matrix.
    in_dtypes = {str(a.dtype) for a in exported.in_avals}
    assert in_dtypes & {"int8", "uint8"}
    assert not any(a.shape == (32, 48) and a.dtype == jnp.float32 for a in exported.in_avals)


def test_export_serializes_and_the_loaded_program_gives_the_same_result(no_kernels):
    # No kernel families: a GPU kernel could not be lowered for cpu too.
    compressed, _ = jc.quantize(bits=4, axis=-1, group_size=16)(PARAMS)
    fast = jc.accelerate(mlp, platform="cuda")
    # Routes for cuda, lowered for cuda and cpu, so the loaded program can run here.
    exported = fast.export(compressed, X, platforms=("cuda", "cpu"))
    loaded = jax.export.deserialize(exported.serialize())
    assert loaded.platforms == ("cuda", "cpu")
    assert loaded.in_tree == exported.in_tree
    out = loaded.call(fast.prepare(compressed), X)
    np.testing.assert_allclose(out, mlp(jc.materialize(compressed), X), rtol=1e-5, atol=1e-5)
    # By default, the accelerated object's own platform.
    assert jc.accelerate(mlp, platform="tpu").export(compressed, X).platforms == ("tpu",)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_tiny_minilm_encoder_exports(platform):
    config = MiniLMConfig(
        vocab_size=40,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=8,
    )
    model = MiniLMEncoder(config)
    ids, mask = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32)
    params = model.init(jax.random.key(0), ids, mask)["params"]
    compressed, _ = jc.quantize(bits=8, axis=-1, where=r"layer_.*/kernel")(params)

    def encode(p, ids, mask):
        return model.apply({"params": p}, ids, mask)

    fast = jc.accelerate(encode, platform=platform)
    exported = fast.export(compressed, ids, mask)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == (2, 6, 32)
    routes_taken = fast.last_plan.routes()
    assert len(routes_taken) == 6
    assert all(r == "dequantize" or r.startswith("kernel:") for r in routes_taken.values())


@pytest.mark.parametrize("int8_activations", [True, False])
@pytest.mark.parametrize("name", list(FORMATS))
def test_unprepared_trees_give_the_prepared_result_exactly(name, int8_activations):
    compressed, _ = FORMATS[name](PARAMS)
    fast = jc.accelerate(mlp, int8_activations=int8_activations)
    unprepared = fast(compressed, X)
    plan = fast.last_plan
    assert "materialize" not in plan.routes().values()  # a fast route, not the dense one
    prepared = fast(fast.prepare(compressed), X)
    np.testing.assert_array_equal(unprepared, prepared)
    assert fast.last_plan == plan


def test_the_serving_form_is_made_once_and_freed_with_its_leaf():
    compressed, _ = jc.quantize(bits=8, axis=-1)(_params(3))
    fast = jc.accelerate(mlp)
    fast(compressed, X)
    served = fast.prepare(compressed)
    assert served["l0"]["kernel"] is fast.prepare(compressed)["l0"]["kernel"]
    kept = weakref.ref(served["l0"]["kernel"])
    del compressed, served
    gc.collect()
    assert kept() is None  # the leaf is gone, so its serving form is not kept


def test_a_traced_unprepared_tree_is_materialized_and_says_so():
    fast = jc.accelerate(mlp)
    out = jax.jit(fast)(INT8, X)
    assert set(fast.last_plan.routes().values()) == {"materialize"}
    assert "traced" in fast.last_plan.decisions[0].note
    np.testing.assert_allclose(out, mlp(jc.materialize(INT8), X), rtol=1e-5, atol=1e-5)
    # Closed over, the tree is concrete: prepared once (eagerly, inside the trace),
    # fast routes, and what is kept serves later calls outside it.
    closed = jax.jit(lambda x: fast(INT8, x))(X)
    assert set(fast.last_plan.routes().values()) == {"int8"}
    assert not isinstance(fast.prepare(INT8)["l0"]["kernel"].codes, jax.core.Tracer)
    np.testing.assert_allclose(fast(INT8, X), closed, rtol=1e-6, atol=1e-6)


def _custom_calls(exported):
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


def test_cuda_exports_take_only_stable_kernels_by_default():
    """Plain ``jax.export`` works for cuda: Mosaic GPU for bf16, no Triton for float32."""
    w = jax.random.normal(jax.random.key(0), (256, 128))
    q, _ = jc.quantize(bits=4, group_size=128, axis=-1)({"w": w})
    f = lambda p, x: x @ p["w"].astype(x.dtype)  # noqa: E731
    fast = jc.accelerate(f, platform="cuda")
    prepared = fast.prepare(q)
    for dtype, calls in ((jnp.bfloat16, {"mosaic_gpu_v2"}), (jnp.float32, set())):
        x = jax.ShapeDtypeStruct((8, 256), dtype)
        exported = jax.export.export(jax.jit(fast), platforms=("cuda",))(prepared, x)
        assert _custom_calls(exported) == calls
    plan = fast.explain(q, jnp.ones((8, 256)))
    assert (
        plan.decisions[0].kernel == "" and "jax.export cannot serialize" in plan.decisions[0].note
    )
    # kernels="all" takes the Triton kernel for float32: it runs, but plain export refuses it.
    every = jc.accelerate(f, platform="cuda", kernels="all")
    x = jax.ShapeDtypeStruct((8, 256), jnp.float32)
    with pytest.raises(ValueError, match="custom calls whose targets"):
        jax.export.export(jax.jit(every), platforms=("cuda",))(prepared, x)
    assert _custom_calls(every.export(q, x)) == {"__gpu$xla.gpu.triton"}
    assert every.explain(q, jnp.ones((8, 256))).decisions[0].kernel == "pallas_int4_g128_gpu"


def test_bad_kernels_choice_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        jc.accelerate(lambda p, x: x, kernels="fast")
