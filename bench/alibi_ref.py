"""alibi-detect's drift detectors on the drift bench's small-window shapes.

Runs in alibi-detect's own virtual environment (``make bench-alibi``,
.venv-alibi/): alibi-detect 0.13 pins numpy < 2 and numba < 0.60, which do
not fit ours. It imports nothing of Flywheel: ``flywheel.bench.drift`` starts
it as a script with that environment's Python and reads one JSON object from
its last line of output::

    .venv-alibi/bin/python bench/alibi_ref.py DATA.npz [--repeats 20]

DATA.npz holds the arrays the bench scored with its own kernels (ks_ref,
ks_win, chi2_ref, chi2_win, mmd_ref, mmd_win). Each detector is built on its
reference once (what it precomputes there is not timed, as for ours) and
``predict`` on the window is timed: the median of the repeats after one
warm-up call. MMD runs on alibi-detect's PyTorch backend on the CPU with as
many threads as the machine has cores (ours runs Numba's default, the same
count), 100 permutations as ours.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the .npz of arrays to score")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from alibi_detect import __version__ as alibi_version
    from alibi_detect.cd import ChiSquareDrift, CVMDrift, KSDrift, MMDDrift

    torch.set_num_threads(os.cpu_count() or 1)
    d = np.load(args.data)

    out = {"alibi_detect": alibi_version, "numpy": np.__version__, "torch": torch.__version__, "times_s": {}}
    detectors = {
        "ks": (KSDrift(d["ks_ref"], p_val=0.05), d["ks_win"]),
        "cvm": (CVMDrift(d["ks_ref"], p_val=0.05), d["ks_win"]),
        "chi2": (ChiSquareDrift(d["chi2_ref"], p_val=0.05), d["chi2_win"]),
        "mmd": (MMDDrift(d["mmd_ref"].astype(np.float32), backend="pytorch", p_val=0.05, n_permutations=100,
                         device="cpu"), d["mmd_win"].astype(np.float32)),
    }
    for name, (det, x) in detectors.items():
        repeats = max(3, args.repeats // 4) if name == "mmd" else args.repeats
        print(f"  alibi-detect {name} ...", flush=True)
        out["times_s"][name] = _median_s(lambda det=det, x=x: det.predict(x), repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
