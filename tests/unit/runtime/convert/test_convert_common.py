"""The parts of flywheel.runtime.convert every framework shares: sample rows
(read and generated) and the finishing of converted graphs."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.convert.common import generated_rows, load_sample


def test_generated_rows_take_both_branches_of_every_split():
    cuts = [[0.5, 2.0, 2.0], [], [-10.0]]
    rows = generated_rows(3, cuts, count=64)
    assert rows.shape == (64, 3)
    assert rows.dtype == np.float32
    for j, feature_cuts in enumerate(cuts):
        for t in feature_cuts:
            assert (rows[:, j] < t).any()
            assert (rows[:, j] > t).any()
            assert not (rows[:, j] == t).any()
    assert (rows[:, 1] == 0).all()


def test_generated_rows_are_the_same_each_time():
    assert np.array_equal(generated_rows(4, None), generated_rows(4, None))


def test_a_csv_sample_with_or_without_a_header(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n3,4\n")
    (tmp_path / "b.csv").write_text("1,2\n")
    assert load_sample(str(tmp_path / "a.csv"), 2).tolist() == [[1, 2], [3, 4]]
    assert load_sample(str(tmp_path / "b.csv"), 2).tolist() == [[1, 2]]


@pytest.mark.parametrize("name, content, fragment", [
    ("rows.txt", b"1,2", r"expected \.npy or \.csv"),
    ("absent.npy", None, r"no such file"),
    ("words.csv", b"a,b\nc,d\n", r"not readable as numbers"),
    ("objects.npy", None, r"not readable as numbers"),
])
def test_bad_sample_files_are_clear_errors(tmp_path, name, content, fragment):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    if name == "objects.npy":  # an object array needs pickle to read: refused
        np.save(tmp_path / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=rf"sample file '.*{name}': {fragment}"):
        load_sample(str(tmp_path / name), 2)


def test_a_missing_converter_library_names_the_convert_extra():
    from flywheel.runtime.convert.common import need

    with pytest.raises(ConfigError, match=r"--from-xgboost needs the convert extra \(no_such_module_xyz not "
                                          r"installed\): pip install 'flywheel-ml\[convert\]'"):
        need(("no_such_module_xyz",), "--from-xgboost")
