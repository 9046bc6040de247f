"""A run's data fixed at submission (loops/snapshot.py): what the job, its
resume and the evaluation read back is the same rows, whatever arrives later."""

from __future__ import annotations

import numpy as np

from flywheel.loops.snapshot import freeze_dataset
from flywheel.training.data import load_data
from flywheel.training.spec import parse_spec

JOB = {"name": "digits", "model": {"architecture": "mlp", "hparams": {}},
       "dataset": {"kind": "digits", "validation_fraction": 0.25, "reference_rows": 50}, "seed": 4}


def test_frozen_rows_read_back_the_same_every_time(tmp_path):
    frozen = freeze_dataset(JOB, str(tmp_path / "run-1" / "dataset.parquet"))
    assert frozen == {"kind": "parquet", "path": str(tmp_path / "run-1" / "dataset.parquet"), "label": "label",
                      "validation_fraction": 0.25, "reference_rows": 50}
    spec = parse_spec({**JOB, "dataset": frozen})
    first, again = load_data(spec.dataset, seed=4), load_data(spec.dataset, seed=4)
    assert first.fingerprint == again.fingerprint
    assert len(first.x_train) + len(first.x_val) == 1797
    assert first.x_train.shape[1] == 64
    assert np.array_equal(first.y_val, again.y_val)
    assert not list((tmp_path / "run-1").glob("*.tmp"))
