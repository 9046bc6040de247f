"""GPU check for the CuPy drift kernels (run on a machine with a CUDA GPU).

    python -m flywheel.bench.gpu_drift_check

Compares every CuPy kernel with the NumPy/SciPy reference on the issue's
sizes and prints max differences and timings. Exits 2 with a message where no
GPU (or no CuPy) is available, so it is safe to run anywhere.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from flywheel.kernels import DriftDetector, gpu_available


def _time(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    if not gpu_available():
        print("no CUDA GPU with CuPy here: nothing to check (pip install cupy-cuda12x on a GPU host)")
        return 2
    rng = np.random.default_rng(0)
    cases = [
        ("ks", rng.normal(size=(100_000, 128)), np.round(rng.normal(0.01, 1, size=(10_000, 128)), 2), {}),
        ("cvm", rng.normal(size=(100_000, 128)), np.round(rng.normal(0.01, 1, size=(10_000, 128)), 2), {}),
        ("chi2", rng.integers(0, 20, size=(100_000, 16)), rng.integers(0, 21, size=(10_000, 16)), {}),
        ("psi", rng.integers(0, 20, size=(100_000, 16)), rng.integers(0, 21, size=(10_000, 16)), {}),
        ("mmd", rng.normal(size=(5_000, 32)), rng.normal(0.05, 1, size=(1_000, 32)), {"n_permutations": 100}),
    ]
    ok = True
    for test, ref, win, kw in cases:
        want = DriftDetector(test, backend="numpy", **kw).fit(ref).score(win)
        gpu = DriftDetector(test, backend="cupy", **kw).fit(ref)
        got = gpu.score(win)
        ds = float(np.max(np.abs(np.subtract(got.statistic, want.statistic))))
        dp = float(np.nanmax(np.abs(np.subtract(got.p_value, want.p_value)))) if test != "psi" else 0.0
        tol_s = 1e-5 * max(1e-12, abs(want.statistic[0])) if test == "mmd" else 1e-6
        tol_p = 3 * np.sqrt(0.25 / 100) if test == "mmd" else 1e-6
        good = ds <= tol_s and dp <= tol_p
        ok &= good
        t_gpu = _time(lambda: gpu.score(win))
        t_cpu = _time(lambda: DriftDetector(test, backend="numba", **kw).fit(ref).score(win), 1)
        print(f"{test:<5} max|stat diff| {ds:.2e}  max|p diff| {dp:.2e}  {'OK ' if good else 'BAD'}  "
              f"gpu score {t_gpu * 1e3:8.2f} ms   numba fit+score {t_cpu * 1e3:8.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
