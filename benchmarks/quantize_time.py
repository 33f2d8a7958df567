"""Time to quantize weights, cold (first call, compilation included) and warm: ours, Qwix, AQT.

Two parameter trees, each a linen model's ``params``:

- ``dense4096``: one ``nn.Dense(4096)`` on 4096 inputs (a 4096 x 4096 kernel);
- ``tree12``: four blocks of ``Dense(4d) -> Dense(d) -> Dense(d)`` with ``d = 1024``: 12
  kernels of 3 shapes, so a library that compiles once per shape shows it here.

Two formats: int8 with one scale per output channel, and int4 with one scale per 128
inputs of each output channel (g128). Each library runs its own documented path from
float parameters to quantized ones:

- **ours**: ``jc.quantize(8)(params)`` / ``jc.quantize(4, group_size=128)(params)``;
- **Qwix** (PTQ): ``qwix.quantize_model(model, qwix.PtqProvider([qwix.QtRule(
  weight_qtype=...)]))``, the abstract quantized params from ``jax.eval_shape`` of its
  ``init``, then ``qwix.quantize_params`` (``tile_size=128`` for g128); all three timed;
- **AQT** (aqtp): the model's ``Dense`` layers built with ``AqtDotGeneral`` (weights
  ``rhs_bits``, activations unquantized, ``rhs_quant_mode=CONVERT``, freezer
  ``CALIBRATION_AND_VALUE``, a 128 tile on the contraction axis for g128), and the
  frozen weights from ``model.apply(..., mutable=True)``, as its ``flax_e2e_model``
  example converts; timed eagerly (as there) and under ``jax.jit``, and the better kept.

Cold: each (library, tree, format) runs in a fresh subprocess; imports and building the
float parameters are not timed, the first conversion is (with every compilation it
triggers, counted through ``jax_log_compiles``). Warm: the median of 3 more calls in
that process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import _common  # first: puts the repository root on sys.path

CASES = ("dense4096", "tree12")
FORMATS = ("int8", "int4_g128")
LIBRARIES = ("ours", "qwix", "aqt", "aqt_jit")
WARM_CALLS = 3


def _model(case: str, dot_general_cls=None):
    import flax.linen as nn

    extra = {} if dot_general_cls is None else {"dot_general_cls": dot_general_cls}
    if case == "dense4096":
        return nn.Dense(4096, **extra), 4096

    class Tree12(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(4):
                h = nn.Dense(4096, **extra)(x)
                h = nn.Dense(1024, **extra)(h)
                x = nn.Dense(1024, **extra)(h)
            return x

    return Tree12(), 1024


class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "Finished XLA compilation" in record.getMessage():
            self.count += 1


def _converter(library: str, case: str, fmt: str, params, x):
    """The library's documented conversion, as a function of the float params."""
    import jax

    bits = 8 if fmt == "int8" else 4
    group = None if fmt == "int8" else 128
    if library == "ours":
        import jaxcompress as jc

        tx = jc.quantize(bits, group_size=group)
        return lambda p: tx(p)[0]
    if library == "qwix":
        import qwix

        model, _ = _model(case)
        rule = qwix.QtRule(module_path=".*", weight_qtype=f"int{bits}", tile_size=group)

        def convert(p):
            ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
            abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), x)
            return qwix.quantize_params(p, abstract["params"])

        return convert
    import functools

    from aqt.jax.v2 import aqt_dot_general, tiled_dot_general, utils
    from aqt.jax.v2.flax import aqt_flax

    config = aqt_dot_general.dot_general_make(lhs_bits=None, rhs_bits=bits)
    tiling = None
    if group is not None:
        tiling = tiled_dot_general.Cfg(
            lhs=tiled_dot_general.TensorTiling(
                contraction_axes=[tiled_dot_general.AxisTiling(axis=1, tile_size=group)],
                remaining_axes=[],
            ),
            rhs=tiled_dot_general.TensorTiling(
                contraction_axes=[tiled_dot_general.AxisTiling(axis=0, tile_size=group)],
                remaining_axes=[],
            ),
        )
    dot_general = functools.partial(
        aqt_flax.AqtDotGeneral,
        config,
        rhs_quant_mode=utils.QuantMode.CONVERT,
        rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
        tiling_cfg=tiling,
    )
    model, _ = _model(case, dot_general)

    def convert(p):
        rngs = {"params": jax.random.key(0)}
        _, frozen = model.apply({"params": p}, x, rngs=rngs, mutable=True)
        return frozen

    return jax.jit(convert) if library == "aqt_jit" else convert


def child(library: str, case: str, fmt: str) -> dict:
    """One measurement in this (fresh) process: cold and warm seconds, compiles."""
    import jax
    import jax.numpy as jnp

    if library == "ours":
        import jaxcompress  # noqa: F401
    elif library == "qwix":
        import qwix  # noqa: F401
    else:
        from aqt.jax.v2.flax import aqt_flax  # noqa: F401
    model, width = _model(case)
    x = jnp.ones((1, width), jnp.float32)
    params = jax.block_until_ready(model.init(jax.random.key(0), x)["params"])
    convert = _converter(library, case, fmt, params, x)
    counter = _CompileCounter()
    logging.getLogger("jax._src.dispatch").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    start = time.perf_counter()
    jax.block_until_ready(convert(params))
    cold = time.perf_counter() - start
    jax.config.update("jax_log_compiles", False)
    warm = []
    for _ in range(WARM_CALLS):
        start = time.perf_counter()
        jax.block_until_ready(convert(params))
        warm.append(time.perf_counter() - start)
    return {"cold_s": cold, "warm_s": statistics.median(warm), "compiles": counter.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("LIBRARY", "CASE", "FORMAT"))
    args = parser.parse_args()
    if args.child:
        # Keep the compile log off stderr; the counter reads it.
        logging.getLogger("jax._src.dispatch").propagate = False
        logging.getLogger("jax._src.interpreters.pxla").propagate = False
        print(json.dumps(child(*args.child)))
        return
    import importlib.metadata as metadata

    rows, data = [], {"versions": {}, "runs": []}
    for package in ("jax", "flax", "qwix", "aqtp"):
        data["versions"][package] = metadata.version(package)
    # Cold times swing with other processes' compiles: record how busy the machine was.
    data["load_average_before"] = os.getloadavg()
    for case in CASES:
        for fmt in FORMATS:
            for library in LIBRARIES:
                result = subprocess.run(
                    [sys.executable, __file__, "--child", library, case, fmt],
                    capture_output=True,
                    text=True,
                    env=os.environ.copy(),
                )
                if result.returncode:
                    error = result.stderr.strip().splitlines()[-1][:200]
                    run = {"case": case, "format": fmt, "library": library, "error": error}
                else:
                    measured = json.loads(result.stdout.strip().splitlines()[-1])
                    run = {"case": case, "format": fmt, "library": library, **measured}
                print(run, flush=True)
                data["runs"].append(run)
    for case in CASES:
        for fmt in FORMATS:
            runs = [r for r in data["runs"] if r["case"] == case and r["format"] == fmt]
            by = {r["library"]: r for r in runs}
            for library in LIBRARIES:
                r = by[library]
                if "error" in r:
                    rows.append([case, fmt, library, "failed", "", "", r["error"]])
                    continue
                rows.append(
                    [
                        case,
                        fmt,
                        library,
                        f"{r['cold_s']:.2f}",
                        f"{r['warm_s']:.3f}",
                        r["compiles"],
                        "",
                    ]
                )
            for kind in ("cold", "warm"):
                peers = [
                    r[f"{kind}_s"] for r in runs if r["library"] != "ours" and "error" not in r
                ]
                ours = by["ours"].get(f"{kind}_s")
                if peers and ours is not None:
                    verdict = "ahead" if ours <= min(peers) else "behind"
                    data.setdefault(f"{kind}_vs_best_peer", {})[f"{case}/{fmt}"] = {
                        "ours_s": ours,
                        "best_peer_s": min(peers),
                        "verdict": verdict,
                    }
    body = "\n".join(
        [
            __doc__.split("\n\n", 1)[1],
            "",
            _common.markdown_table(
                ["tree", "format", "library", "cold s", "warm s", "compiles (cold)", "note"],
                rows,
            ),
            "",
            *(
                f"{kind.capitalize()} time against the best peer's: "
                + ", ".join(
                    f"{key} {v['ours_s']:.3f} s vs {v['best_peer_s']:.3f} s ({v['verdict']})"
                    for key, v in data.get(f"{kind}_vs_best_peer", {}).items()
                )
                + "."
                for kind in ("cold", "warm")
            ),
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
            "",
            "Load average before / after the runs: "
            + f"{data['load_average_before'][0]:.1f} / {os.getloadavg()[0]:.1f} "
            + f"on {os.cpu_count()} CPUs.",
        ]
    )
    path = _common.write(
        "quantize_time",
        title="Time to quantize: ours, Qwix and AQT, cold and warm",
        command=_common.command(__file__),
        body_markdown=body,
        data=data,
    )
    print(path)


if __name__ == "__main__":
    main()
