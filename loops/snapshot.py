"""A run's training data, fixed when its job is submitted.

Captured traffic keeps arriving, and so do labels for rows captured earlier,
and capture files finish after the rows in them were captured: a ``captured``
dataset read again later gives more rows. A job resumed after its runner
died must train on exactly the rows it started with (training refuses a
resume whose data changed), and the candidate's evaluation must hold out
exactly the rows the job held out. So the loop reads the rows once, at
submission, and the job, its resume and the evaluation all read that file.
"""

from __future__ import annotations

import os

import numpy as np


def freeze_dataset(job: dict, path: str) -> dict:
    """Write the rows ``job``'s dataset gives now to a Parquet file at
    ``path`` (feature columns ``f0..fN`` and ``label``) and return the
    ``parquet`` dataset mapping that reads them back, with the template's
    validation share and reference rows."""
    import pandas as pd

    from flywheel.training.data import load_data
    from flywheel.training.spec import parse_spec

    spec = parse_spec(job)
    data = load_data(spec.dataset, seed=spec.seed)
    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    frame = pd.DataFrame(x.reshape(len(x), -1), columns=[f"f{i}" for i in range(int(np.prod(x.shape[1:])))])
    frame["label"] = y
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # whole or absent: a controller that dies here writes it again
    return {"kind": "parquet", "path": path, "label": "label",
            "validation_fraction": spec.dataset.validation_fraction, "reference_rows": spec.dataset.reference_rows}
