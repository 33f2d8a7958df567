"""AWQ against Qwix's AWQ (and round to nearest) on the plain and outlier layers.

Issue 23, item 3. One linen ``Dense(n, use_bias=False)`` whose kernel is a layer of
:mod:`_layers` (``make_layer("plain" / "outliers")``), quantized to int4 with groups of
128 along the inputs and per output channel, by

- **ours**: ``jc.calibrate`` on the calibration inputs, then
  ``jc.quantize(4, group_size=..., method="awq")(params, data=stats)``;
- **Qwix** (``qwix.contrib.awq``, its documented path, ``docs/source/awq.md``):
  ``AwqCalibrationProvider`` over the same calibration inputs, ``PtqProvider`` for the
  abstract tree, ``awq.quantize_params``, and ``AwqInferenceProvider`` to run the model;
  ``AwqRule(weight_qtype=int4, tile_size=128 or None)``, its defaults otherwise
  (``n_grid=20``, absmax calibration);
- **round to nearest**, ours (``jc.quantize(4, group_size=...)``) and Qwix's
  (``PtqProvider`` with the same rule), as the floor AWQ must beat.

Each row's time is the wall time of a cold run of the whole path, calibration and
compilation included, as a user meets it (the first call in a fresh process, since both
libraries compile per shape): the least of ``--repeats`` such runs (default 2, each in
its own fresh process, ours and Qwix's interleaved), since a shared machine's load
swings single runs by 2x; every run's time is in the JSON. The error is the held-out
relative output error ``‖X W − X Ŵ‖_F / ‖X W‖_F`` (float64) on inputs neither library
saw; Qwix's ``Ŵ`` is read by running its quantized model on the identity matrix.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/awq_vs_qwix.py``
(``--quick`` for n = 1024).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import _common  # repository root on sys.path
from _layers import KINDS, make_layer, relative_output_error


def _dense(n):
    from flax import linen as nn

    return nn.Dense(n, use_bias=False)


def run_ours(kind: str, n: int, group_size: int | None, method: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxcompress as jc

    layer = make_layer(kind, n=n)
    params = {"params": {"kernel": jnp.asarray(layer.kernel)}}
    model = _dense(n)
    start = time.perf_counter()
    tx = jc.quantize(4, group_size=group_size, method=method)
    if method == "rtn":
        out, stats = tx(params)
    else:
        data = jc.calibrate(
            lambda p, x: model.apply(p, x), params, [jnp.asarray(layer.calibration)]
        )
        out, stats = tx(params, data=data)
    restored = jax.block_until_ready(jc.materialize(out)["params"]["kernel"])
    seconds = time.perf_counter() - start
    extra = {}
    if method == "awq":
        s = stats["params/kernel"]
        extra = {k: float(v) for k, v in s.items() if k in ("alpha", "clip")}
    return {"seconds": seconds, "error": relative_output_error(layer, np.asarray(restored))} | extra


def run_qwix(kind: str, n: int, group_size: int | None, method: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix
    from qwix.contrib import awq

    layer = make_layer(kind, n=n)
    model = _dense(n)
    variables = {"params": {"kernel": jnp.asarray(layer.kernel)}}
    x0 = jnp.zeros((1, n), jnp.float32)
    eye = jnp.eye(n, dtype=jnp.float32)
    start = time.perf_counter()
    if method == "rtn":
        rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int4, tile_size=group_size)
        ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
        abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), x0)["params"]
        quantized = qwix.quantize_params(variables["params"], abstract)
        restored = ptq_model.apply({"params": quantized}, eye)
    else:
        rule = awq.AwqRule(module_path=".*", weight_qtype=jnp.int4, tile_size=group_size)
        cal_model = qwix.quantize_model(model, awq.AwqCalibrationProvider([rule]))
        state = dict(variables)
        _, new = cal_model.apply(state, jnp.asarray(layer.calibration), mutable="quant_stats")
        state.update(new)
        ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
        abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), x0)["params"]
        quantized = awq.quantize_params(state["params"], abstract, state["quant_stats"])
        awq_model = qwix.quantize_model(model, awq.AwqInferenceProvider([rule]))
        restored = awq_model.apply({"params": quantized}, eye)
    restored = np.asarray(jax.block_until_ready(restored))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "error": relative_output_error(layer, restored)}


def _child(args) -> None:
    import json

    runner = run_ours if args.library == "ours" else run_qwix
    group = None if args.group_size == 0 else args.group_size
    print(json.dumps(runner(args.kind, args.n, group, args.method)))


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1024 instead of 4096")
    parser.add_argument("--repeats", type=int, default=2, help="cold runs per cell (least kept)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="awq", help=argparse.SUPPRESS)
    parser.add_argument("--group-size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=4096, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    n = 1024 if args.quick else 4096
    rows, data = [], []
    for kind in KINDS:
        for group_size in (128, 0):
            cells = {}
            # Each run in a fresh process: cold, compilation included, nothing cached.
            for _ in range(args.repeats):
                for library in ("ours", "qwix"):
                    for method in ("rtn", "awq"):
                        flags = [f"--library={library}", f"--kind={kind}", f"--method={method}"]
                        flags += [f"--group-size={group_size}", f"--n={n}", "--child"]
                        result = subprocess.run(
                            [sys.executable, __file__, *flags],
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        run = json.loads(result.stdout.strip().splitlines()[-1])
                        print(kind, group_size, library, method, run, flush=True)
                        seen = cells.get((library, method), {"runs_seconds": []})
                        runs = [*seen["runs_seconds"], run["seconds"]]
                        best = run if run["seconds"] <= seen.get("seconds", float("inf")) else seen
                        cells[library, method] = {**best, "runs_seconds": runs}
            fmt = "g128" if group_size else "per-channel"
            ours, qwix = cells["ours", "awq"], cells["qwix", "awq"]
            rows.append(
                [
                    kind,
                    fmt,
                    f"{cells['ours', 'rtn']['error']:.4f}",
                    f"{cells['qwix', 'rtn']['error']:.4f}",
                    f"{ours['error']:.4f}",
                    f"{qwix['error']:.4f}",
                    f"{ours['seconds']:.2f}",
                    f"{qwix['seconds']:.2f}",
                    "yes" if ours["error"] <= qwix["error"] else "no",
                    "yes" if ours["seconds"] <= qwix["seconds"] else "no",
                ]
            )
            data.append(
                {
                    "layer": kind,
                    "format": fmt,
                    "n": n,
                    **{f"{lib}_{m}": cells[lib, m] for lib, m in cells},
                }
            )
    header = [
        "layer",
        "int4",
        "RTN ours",
        "RTN Qwix",
        "AWQ ours",
        "AWQ Qwix",
        "AWQ ours s",
        "AWQ Qwix s",
        "ours as accurate",
        "ours as fast",
    ]
    import qwix

    body = "\n".join(
        [
            f"n = {n}; calibration 512 rows, held-out 512 rows (`benchmarks/_layers.py`). "
            f"Qwix {getattr(qwix, '__version__', '?')}, `AwqRule(weight_qtype=int4, "
            "tile_size=128 or None)`, defaults otherwise. Errors: held-out relative output "
            "error. Seconds: the least of "
            f"{args.repeats} cold runs (each a fresh process) of calibration + quantization "
            "+ materializing the weight, compilation included.",
            "",
            _common.markdown_table(header, rows),
        ]
    )
    _common.write(
        "awq_vs_qwix" + ("_quick" if args.quick else ""),
        title="AWQ: ours against Qwix",
        command=_common.command(
            __file__, (["--quick"] if args.quick else []) + [f"--repeats={args.repeats}"]
        ),
        body_markdown=body,
        data=data,
    )


if __name__ == "__main__":
    main()
