"""PCA: ``jaxcompress.decomposition.pca_fit`` vs scikit-learn ``PCA`` on several spectra.

Question (issue 19): is ``pca_fit(x, k)`` (``method="auto"``) at least 1.5x faster than
scikit-learn's fastest solver *that is accurate on the case*, on every spectrum, and
is it itself accurate?

Data: float32 ``10000 x 784``, ``k = 50`` (the issue's shape), one case per spectrum:

* ``flat``: Gaussian data times a Gaussian ``784 x 784`` mixing matrix (the issue's
  case; no decay past ``k``),
* ``power-law``: variances ``1 / i``, ``exponential``: ``0.9^i``,
* ``clustered``: groups of 6 equal variances ``2^-j`` (``k = 50`` cuts a group),
* ``rank-deficient``: 156 variances in ``[1, 2]``, the rest exactly 0,
* ``offset``: the power-law data plus 300 on every feature (float32 keeps about 5
  digits of the spread under that mean),
* ``decaying``: the earlier version of this benchmark's data, 128 directions with
  standard deviations ``3 * 0.97^i``, noise 0.02, offset 1.

Every spectrum but ``flat`` and ``decaying`` is drawn in a random orthonormal basis.

Reference: the float64 ``numpy.linalg.eigh`` of the float64 covariance of the same
float32 data. Accuracy is the relative error of the summed explained variance of the
``k`` components, ``|Σ ev - Σ λ| / Σ λ``; a solver is *accurate* on a case when that
is at most 1e-4 (the issue's tolerance, the guarantee of ``pca_fit``). Ours is also
checked component by component: the largest ``sin∠`` to the exact eigenvector among
the components whose eigen-gap allows a statement (Davis-Kahan with the certified
residual, ``1.1e-4 λ₁ / gap + 1e-3 < 1``), against that bound.

Ours: ``pca_fit(x, k)`` on a jax array already on the device; which path it took
comes from ``pca_fit_checked`` (``PCACheck.path_name``). The compile cache is cleared
before each case, so the first call of a case (compile plus run) is reported apart;
the timed calls are warm.

scikit-learn, each ``PCA(k, svd_solver=..., random_state=0).fit(x)`` on the NumPy
float32 array: ``full`` (LAPACK SVD), ``covariance_eigh`` (``X.T @ X`` by BLAS
``syrk``, corrected for the mean, plus LAPACK ``eigh``), ``randomized`` with its
defaults (10 oversamples, 7 LU-normalized power iterations here) and with
``n_iter=20``, and ``arpack``.

Timing: ours and every solver interleaved, one call of each per round, ``--repeats``
rounds (default 5), the minimum reported (the machine is shared; the minimum is the
least disturbed call), with a 0.3 s pause before each call so that the previous
call's BLAS and XLA threads are parked. A solver whose first call is over 3x the
fastest accurate one of that round is not repeated ("1 run"; it cannot be the
fastest). The speed ratio is the fastest accurate solver's time over ours.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/pca_vs_sklearn.py``
(``--repeats N``; ``--spectra flat offset`` for a subset; ``--name`` another results
file, e.g. for a run under ``taskset -c 0``, one core for both sides, whose ratios
suffer less from other jobs on a shared machine than multithreaded ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sklearn
from _common import command, markdown_table, write
from sklearn.decomposition import PCA

from jaxcompress.numerics.decomposition import pca_fit, pca_fit_checked

N, D, K = 10000, 784, 50
SPECTRA = ("flat", "power-law", "exponential", "clustered", "rank-deficient", "offset", "decaying")
SOLVERS: dict[str, dict[str, Any]] = {
    "full": {"svd_solver": "full"},
    "covariance_eigh": {"svd_solver": "covariance_eigh"},
    "randomized": {"svd_solver": "randomized"},
    "randomized n_iter=20": {"svd_solver": "randomized", "iterated_power": 20},
    "arpack": {"svd_solver": "arpack"},
}
TARGET_SPEEDUP = 1.5
EV_RTOL = 1e-4
RESIDUAL_RTOL = 1e-4
SLOW_FACTOR = 3.0
PAUSE_S = 0.3


def make_data(kind: str, seed: int = 0) -> np.ndarray:
    """``N x D`` float32 rows whose covariance has the named kind of spectrum."""
    rng = np.random.default_rng(seed)
    if kind == "flat":
        return (rng.standard_normal((N, D)) @ rng.standard_normal((D, D))).astype(np.float32)
    if kind == "decaying":
        rank = 128
        basis = np.linalg.qr(rng.standard_normal((D, rank)))[0].T.astype(np.float32)
        scales = (3.0 * 0.97 ** np.arange(rank)).astype(np.float32)
        x = (rng.standard_normal((N, rank), dtype=np.float32) * scales) @ basis
        return x + 0.02 * rng.standard_normal((N, D), dtype=np.float32) + np.float32(1.0)
    i = np.arange(D, dtype=np.float64)
    variances = {
        "power-law": (i + 1.0) ** -1.0,
        "exponential": 0.9**i,
        "clustered": np.repeat(2.0 ** -np.arange(D // 6 + 1.0), 6)[:D],
        "rank-deficient": np.where(i < D // 5, 1.0 + i[::-1] / D, 0.0),
        "offset": (i + 1.0) ** -1.0,
    }[kind]
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0]
    x = (rng.standard_normal((N, D)) * np.sqrt(variances)) @ basis.T
    if kind == "offset":
        x += 300.0
    return x.astype(np.float32)


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the float64 covariance."""
    x64 = x.astype(np.float64)
    xc = x64 - x64.mean(axis=0)
    values, vectors = np.linalg.eigh(xc.T @ xc / (x.shape[0] - 1))
    return values[::-1], vectors[:, ::-1]


def ev_error(explained_variance: np.ndarray, values: np.ndarray) -> float:
    exact = values[:K].sum()
    return float(abs(np.sum(np.asarray(explained_variance, np.float64)[:K]) - exact) / exact)


def worst_component(components: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> dict:
    """The largest ``sin∠`` to the exact eigenvector, over the components whose
    Davis-Kahan bound (certified residual, float32 rounding) is below 1, and that bound."""
    worst = {"sine": 0.0, "bound": 1.0, "index": None, "judged": 0}
    for i in range(K):
        gap = min(values[i - 1] - values[i] if i else np.inf, values[i] - values[i + 1])
        bound = (RESIDUAL_RTOL + 1e-5) * values[0] / gap + 1e-3 if gap > 0 else np.inf
        if bound >= 1.0:
            continue
        cosine = abs(np.asarray(components[i], np.float64) @ vectors[:, i])
        sine = float(np.sqrt(max(0.0, 1.0 - cosine**2)))
        worst["judged"] += 1
        if sine / bound > worst["sine"] / worst["bound"]:
            worst.update(sine=sine, bound=float(bound), index=i)
    return worst


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    # BLAS threads spin for a while after a call (OpenBLAS: about 0.1 s); a pause lets
    # the previous call's threads park so they do not take cores from this one.
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(kind: str, repeats: int) -> dict:
    x = make_data(kind)
    values, vectors = reference(x)
    xj = jnp.asarray(x).block_until_ready()
    jax.clear_caches()  # so that the first call of every case compiles what it runs

    def ours() -> Any:
        return jax.block_until_ready(pca_fit(xj, K))

    first_s, _ = timed(ours)
    _, check = pca_fit_checked(xj, K)
    times: dict[str, list[float]] = {"ours": [], **{s: [] for s in SOLVERS}}
    errors: dict[str, float] = {}
    fitted: dict[str, Any] = {}
    for round_ in range(repeats):
        seconds, fitted["ours"] = timed(ours)
        times["ours"].append(seconds)
        for solver, options in SOLVERS.items():
            if round_ and len(times[solver]) == 1:
                accurate = [min(times[s]) for s in SOLVERS if errors.get(s, 1.0) <= EV_RTOL]
                if times[solver][0] > SLOW_FACTOR * min(accurate, default=np.inf):
                    continue  # clearly not the fastest accurate solver: one run is enough
            model = PCA(K, random_state=0, **options)
            seconds, fitted[solver] = timed(lambda model=model: model.fit(x))
            times[solver].append(seconds)
            errors[solver] = ev_error(fitted[solver].explained_variance_, values)
    errors["ours"] = ev_error(np.asarray(fitted["ours"].explained_variance), values)
    best = {name: min(ts) for name, ts in times.items()}
    accurate = [s for s in SOLVERS if errors[s] <= EV_RTOL]
    fastest = min(accurate, key=lambda s: best[s]) if accurate else None
    ratio = best[fastest] / best["ours"] if fastest else float("inf")
    row = {
        "spectrum": kind,
        "n": N,
        "d": D,
        "k": K,
        "ours_path": check.path_name,
        "ours_error_bound": float(check.error_bound),
        "ours_max_residual": float(check.max_residual),
        "ours_first_call_s": first_s,
        "ours_compile_s": first_s - best["ours"],
        "best_s": best,
        "runs": {name: len(ts) for name, ts in times.items()},
        "all_times_s": times,
        "ev_relative_error": errors,
        "accurate": {s: errors[s] <= EV_RTOL for s in ["ours", *SOLVERS]},
        "ours_worst_component": worst_component(
            np.asarray(fitted["ours"].components), values, vectors
        ),
        "fastest_accurate_sklearn": fastest,
        "speed_ratio": ratio,
        "target_met": bool(ratio >= TARGET_SPEEDUP and errors["ours"] <= EV_RTOL),
    }
    print(
        f"{kind:15} ours {best['ours'] * 1e3:6.1f} ms ({check.path_name}, err "
        f"{errors['ours']:.1e}) | "
        + " ".join(f"{s} {best[s] * 1e3:.0f} ms ({errors[s]:.1e})" for s in SOLVERS)
        + f" | vs {fastest}: {ratio:.2f}x",
        flush=True,
    )
    return row


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def report(rows: list[dict], repeats: int) -> str:
    summary = markdown_table(
        [
            "spectrum",
            "ours ms",
            "ours path",
            "ours EV error",
            "fastest accurate sklearn",
            "its ms",
            "ratio",
            "target met",
            "ours first call s",
        ],
        [
            [
                r["spectrum"],
                _ms(r["best_s"]["ours"]),
                r["ours_path"],
                f"{r['ev_relative_error']['ours']:.1e}",
                r["fastest_accurate_sklearn"] or "none accurate",
                _ms(r["best_s"][r["fastest_accurate_sklearn"]])
                if r["fastest_accurate_sklearn"]
                else "-",
                f"{r['speed_ratio']:.2f}x",
                "yes" if r["target_met"] else "**no**",
                f"{r['ours_first_call_s']:.2f}",
            ]
            for r in rows
        ],
    )

    def cell(r: dict, name: str) -> str:
        runs = r["runs"][name]
        mark = "" if r["accurate"][name] else " ✗"
        return (
            f"{_ms(r['best_s'][name])}{' (1 run)' if runs == 1 else ''} / "
            f"{r['ev_relative_error'][name]:.1e}{mark}"
        )

    detail = markdown_table(
        ["spectrum", "ours", *SOLVERS],
        [[r["spectrum"], *[cell(r, name) for name in ["ours", *SOLVERS]]] for r in rows],
    )

    def worst(r: dict) -> str:
        w = r["ours_worst_component"]
        return f"{w['sine']:.1e} / {w['bound']:.1e}"

    components = markdown_table(
        [
            "spectrum",
            "components judged",
            "worst sin∠ / its bound",
            "error bound (check)",
            "max residual / θ₁",
        ],
        [
            [
                r["spectrum"],
                f"{r['ours_worst_component']['judged']} of {K}",
                worst(r),
                f"{r['ours_error_bound']:.1e}",
                f"{r['ours_max_residual']:.1e}",
            ]
            for r in rows
        ],
    )
    met = sum(r["target_met"] for r in rows)
    load = os.getloadavg()
    return "\n".join(
        [
            f"Target: ours >= {TARGET_SPEEDUP}x faster than the fastest scikit-learn solver "
            f"that is accurate on the case (summed explained variance within "
            f"{EV_RTOL:g}, relative, of a float64 eigh), and ours accurate too. "
            f"{N} x {D} float32, k = {K}. Met on {met} of {len(rows)} spectra.",
            "",
            f"Times: minimum of {repeats} interleaved warm calls, ms. Ours is "
            '`pca_fit(x, k)` (`method="auto"`); "ours path" is `PCACheck.path_name`: '
            '"randomized" = the certified randomized result, "full" = the exact path '
            'chosen up front, "full after a failed check" = the fallback.',
            "",
            "## Summary",
            "",
            summary,
            "",
            "## Every solver: time ms / relative error of the summed explained variance",
            "",
            "✗ marks a solver that is not accurate on the case (error above "
            f"{EV_RTOL:g}); it is not eligible as the fastest.",
            "",
            detail,
            "",
            "## Ours, component by component",
            "",
            "Components judged: those whose exact eigen-gap gives a Davis-Kahan bound "
            "below 1. The certificate columns are those of the randomized attempt (0 "
            "when only the exact path ran).",
            "",
            components,
            "",
            f"Load average while writing (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, "
            f"{load[2]:.1f} on {os.cpu_count()} CPUs, shared with other jobs; timings are "
            "minima of interleaved calls, but a loaded machine still makes them noisy. "
            f"CPUs this process may run on: {sorted(os.sched_getaffinity(0))} (a run "
            "under `taskset -c 0` pins every thread of both sides to one core).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spectra", nargs="+", choices=SPECTRA, default=list(SPECTRA))
    parser.add_argument("--name", default="pca_vs_sklearn", help="results file name")
    args = parser.parse_args()
    rows = [run_case(kind, args.repeats) for kind in args.spectra]
    path = write(
        name=args.name,
        title="PCA: jaxcompress pca_fit vs scikit-learn PCA, per spectrum",
        command=command(__file__, sys.argv[1:]),
        body_markdown=report(rows, args.repeats),
        data={
            "rows": rows,
            "target_speedup": TARGET_SPEEDUP,
            "ev_rtol": EV_RTOL,
            "load_average": os.getloadavg(),
            "sklearn_version": sklearn.__version__,
        },
    )
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
