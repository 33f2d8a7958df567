"""Test setup: 8 fake CPU devices for sharding tests, strict dtype/rank promotion, and
XLA:CPU's LLVM backend at optimization level 0 (with ``JAXCOMPRESS_FAST_XLA=1``, also
XLA:CPU's older, faster-compiling fusion emitters, and the ``bitwise`` tests deselected).

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os

# The suite compiles tens of thousands of small programs and runs each a few times, so
# LLVM's optimization passes cost more than they save: level 0 cut the CPU time of
# test_quantize.py by 18 % and of test_sensitivity.py + test_training_qat.py by 28 %.
# It changes only how LLVM lowers XLA's already optimized HLO to machine code (without
# fast-math at either level), not the operations a program runs. A flag already in
# XLA_FLAGS comes later and wins.
#
# JAXCOMPRESS_FAST_XLA=1 also turns off XLA:CPU's newer MLIR fusion emitters: the older
# emitters compile the suite's programs in about half the CPU time (the whole suite took
# 45 min of CPU against 79). Both are exact IEEE arithmetic, but they generate different
# code for the same fusion, so two *different* programs that round alike under one can
# round apart under the other: four tests comparing fused with op-by-op, or sharded with
# unsharded, programs bit for bit failed under the older emitters. Such tests are marked
# `bitwise`; that mode deselects them, and CI runs them in a second pass with XLA's
# defaults, the configuration users get (see README's test command).
#
# In both modes, XLA:CPU compiles each program's LLVM module in one piece: by default it
# splits the module into parts compiled on parallel threads, which only adds work when
# pytest-xdist already keeps every core busy (17 % less CPU on test_quantize.py). Where
# the module is cut does not change the code generated for any kernel.
FAST_XLA = os.environ.get("JAXCOMPRESS_FAST_XLA", "") == "1"
_DEFAULT_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1" + (
    " --xla_cpu_use_fusion_emitters=false" if FAST_XLA else ""
)
os.environ["XLA_FLAGS"] = (
    _DEFAULT_FLAGS
    + " "
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

# XLA on CPU flushes subnormal floats to zero, so the property tests draw normal floats;
# in CI (CI=true) hypothesis is derandomized so a submission's result is repeatable.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# Module scope, not session: pytest groups the tests of a parametrized fixture by its
# scope, so a session-scoped mesh pulled every sharded test to the front of the run and
# split each module in three, building its module-scoped models and statistics up to 3 times.
@pytest.fixture(scope="module", params=["explicit", "auto"])
def mesh8(request):
    """A 4x2 ("data", "model") mesh over the 8 fake CPU devices, with Explicit or Auto axes."""
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py must set 8 fake CPU devices before jax loads"
    axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[request.param]
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2, devices=devices)


# Every compiled XLA:CPU program keeps about three memory mappings until its cache is
# cleared; a test worker that compiles tens of thousands of programs reaches Linux's
# vm.max_map_count (65530) and LLVM then fails with "Cannot allocate memory". Clearing
# the caches between modules, once a worker holds many mappings, keeps it well below.
_MAX_MAPPINGS = 30000


def _mappings() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to stay under
        return 0


@pytest.fixture(scope="module", autouse=True)
def _bounded_compiled_programs():
    yield
    if _mappings() > _MAX_MAPPINGS:
        jax.clear_caches()


# Modules whose tests run for tens of seconds to minutes each (notebook kernels, mypy,
# multihost processes, the MiniLM model, fuzzers), longest first. They are collected
# first, whole, so that with `-n 2` a long test never starts last and leaves the other
# worker idle; keeping each module together keeps its module-scoped fixtures built once.
LONG_MODULES_FIRST = (
    "test_notebooks.py",
    "test_typecheck.py",
    "test_multihost.py",
    "test_minilm.py",
    "test_fuzz.py",
    "test_cli_fuzz.py",
    "test_fast_paths.py",
    "test_layers.py",
)


def pytest_collection_modifyitems(config, items):
    if FAST_XLA:
        bitwise = [item for item in items if item.get_closest_marker("bitwise")]
        if bitwise:
            config.hook.pytest_deselected(items=bitwise)
            items[:] = [item for item in items if not item.get_closest_marker("bitwise")]
    rank = {name: index for index, name in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_ignore_collect(collection_path, config):
    # CI's second pass (`-m bitwise`) imports only the modules that mark a test bitwise:
    # importing all of them costs each worker about 30 s for nothing.
    if config.option.markexpr == "bitwise" and collection_path.suffix == ".py":
        name = collection_path.name
        if name.startswith("test_") and "mark.bitwise" not in collection_path.read_text():
            return True
    return None


def pytest_report_header(config):
    if FAST_XLA:
        return (
            "JAXCOMPRESS_FAST_XLA=1: older XLA:CPU fusion emitters; `bitwise` tests deselected "
            "(run them with XLA's defaults: python -m pytest -m bitwise)"
        )
    return None
