"""When Numba is loaded and how many threads its kernels get: fitting the
sorted-column tests must not load it (a drift monitor's replica starts
without it), and ``threads`` must hold on the thread that scores."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from flywheel.kernels import DriftDetector

_FIT_THEN_SCORE = """
import sys
import numpy as np
from flywheel.kernels import DriftDetector
rng = np.random.default_rng(0)
d = DriftDetector({test!r}, backend="numba", threads=1).fit(rng.normal(size=(400, 8)))
print("after fit:", "numba" in sys.modules, "scipy.stats" in sys.modules)
d.score(rng.normal(size=(300, 8)))
print("after score:", "numba" in sys.modules)
"""


@pytest.mark.parametrize("test", ["ks", "cvm"])
def test_fitting_a_rank_test_loads_neither_numba_nor_scipy_stats(test):
    out = subprocess.run([sys.executable, "-c", _FIT_THEN_SCORE.format(test=test)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "after fit: False False" in out
    assert "after score: True" in out  # the kernels do load when first needed


@pytest.mark.parametrize("test", ["ks", "mmd"])
def test_the_thread_count_holds_on_the_thread_that_scores(test):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here: nothing to limit")
    rng = np.random.default_rng(1)
    detector = DriftDetector(test, backend="numba", threads=1).fit(rng.normal(size=(200, 4)))
    seen = []

    def score() -> None:
        detector.score(rng.normal(size=(100, 4)))
        seen.append(numba.get_num_threads())

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert seen == [1]
