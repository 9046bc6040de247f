"""Dataset kind ``captured``: labelled captures as training rows, mixed with
the original data at a stated share, with errors that say what is wrong."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flywheel.common.capture_files import CapturedRequest, OpenCaptureFile, filesystem, rows_table, write_label_file
from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.training.data import load_data
from flywheel.training.spec import parse_spec

MARK = 7.0  # captured features hold this value; digits lie in [0, 1]


def _capture(root, n: int, *, width: int = 64, labelled: int | None = None, seq: int = 1, ts: float = 100.0):
    """``n`` one-row requests r<seq>-<i> with features MARK, the first
    ``labelled`` (default all) labelled i % 10."""
    fs, base = filesystem(str(root))
    reqs = [CapturedRequest(f"r{seq}-{i}", ts + i, {"input": np.full((1, width), MARK, np.float32)},
                            {"out": np.zeros((1, 10), np.float32)}) for i in range(n)]
    table = rows_table(reqs, "mlp", "1")
    f = OpenCaptureFile(fs, os.path.join(base, "mlp", "1"), "w", seq, table.schema)
    f.write(table)
    f.finish()
    k = n if labelled is None else labelled
    if k:
        write_label_file(str(root), "mlp", [{"request_id": f"r{seq}-{i}", "row": -1, "label": i % 10, "ts": 1.0}
                                            for i in range(k)], "u", seq)


def _spec(root, **dataset):
    ds = {"kind": "captured", "path": str(root), "endpoint": "mlp", **dataset}
    return parse_spec({"name": "j", "model": {"architecture": "mlp"}, "dataset": ds})


def _all_rows(data) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val])


def test_captured_rows_alone(tmp_path):
    _capture(tmp_path, 10, labelled=6)
    x, y = _all_rows(load_data(_spec(tmp_path).dataset, seed=0))
    assert x.shape == (6, 64)
    assert sorted(y.tolist()) == [0, 1, 2, 3, 4, 5]


def test_since_leaves_out_older_rows(tmp_path):
    _capture(tmp_path, 10)
    x, _ = _all_rows(load_data(_spec(tmp_path, since=105).dataset, seed=0))
    assert len(x) == 5


def test_mix_makes_captured_the_stated_share(tmp_path):
    _capture(tmp_path, 30)
    data = load_data(_spec(tmp_path, mix={"kind": "digits"}, captured_fraction=0.25).dataset, seed=0)
    x, _ = _all_rows(data)
    captured = int(np.sum(np.all(x == MARK, axis=1)))
    assert captured == 30
    assert len(x) == 120
    assert "captured mlp" in data.description and "sklearn digits" in data.description


def test_too_few_original_rows_subsamples_the_captured(tmp_path):
    import pandas as pd

    _capture(tmp_path, 40)
    orig = tmp_path / "orig.parquet"
    frame = pd.DataFrame(np.zeros((10, 64), np.float32), columns=[f"f{i}" for i in range(64)])
    frame["label"] = np.arange(10)
    frame.to_parquet(orig)
    x, _ = _all_rows(load_data(_spec(tmp_path / "", mix={"kind": "parquet", "path": str(orig)},
                                     captured_fraction=0.5).dataset, seed=0))
    assert int(np.sum(np.all(x == MARK, axis=1))) == 10
    assert len(x) == 20


def test_fingerprint_follows_the_labels(tmp_path):
    _capture(tmp_path, 10, labelled=5)
    before = load_data(_spec(tmp_path).dataset, seed=0).fingerprint
    assert load_data(_spec(tmp_path).dataset, seed=0).fingerprint == before
    write_label_file(str(tmp_path), "mlp", [{"request_id": "r1-7", "row": -1, "label": 3, "ts": 2.0}], "u", 9)
    assert load_data(_spec(tmp_path).dataset, seed=0).fingerprint != before


def test_no_labelled_rows_is_refused(tmp_path):
    _capture(tmp_path, 5, labelled=0)
    with pytest.raises(InvalidInputError, match="no labelled captured rows"):
        load_data(_spec(tmp_path).dataset, seed=0)


def test_a_feature_width_unlike_the_originals_is_refused(tmp_path):
    _capture(tmp_path, 5, width=8)
    with pytest.raises(InvalidInputError, match="8 features per row.*64"):
        load_data(_spec(tmp_path, mix={"kind": "digits"}).dataset, seed=0)


def test_an_unknown_input_is_named(tmp_path):
    _capture(tmp_path, 5)
    with pytest.raises(InvalidInputError, match="dataset.input 'pixels'.*'input'"):
        load_data(_spec(tmp_path, input="pixels").dataset, seed=0)


@pytest.mark.parametrize("dataset, fragment", [
    ({"endpoint": ""}, "dataset.endpoint"),
    ({"path": ""}, "dataset.path is required for kind 'captured'"),
    ({"captured_fraction": 0}, "dataset.captured_fraction must lie in (0, 1]"),
    ({"captured_fraction": 1.5}, "dataset.captured_fraction must lie in (0, 1]"),
    ({"mix": {"kind": "ray"}}, "dataset.mix.kind 'ray'"),
    ({"since": -1}, "dataset.since"),
    ({"since": 10, "until": 5}, "dataset.until"),
])
def test_invalid_captured_specs_name_the_field(tmp_path, dataset, fragment):
    with pytest.raises(ConfigError) as info:
        _spec(tmp_path, **dataset)
    assert fragment in info.value.message


def test_captured_fields_are_refused_for_other_kinds():
    with pytest.raises(ConfigError, match="only for kind captured"):
        parse_spec({"name": "j", "model": {"architecture": "mlp"}, "dataset": {"kind": "digits", "endpoint": "mlp"}})
