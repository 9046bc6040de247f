"""The batch benchmark's pure parts: its data, its models, the floor system,
the output checks and the verdicts. No Ray, no timings."""

import os

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.bench.batch import (
    MODELS,
    build_model,
    check_output,
    flops_per_row,
    make_data,
    mlp_weights,
    numpy_forward,
    read_reference,
    run_floor,
    score_matrix,
    verdicts,
)

FEATURES = [f"f{j}" for j in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """1,000 rows of 8 features in 3 files, and a 8 -> 16 -> 4 MLP."""
    root = tmp_path_factory.mktemp("batch")
    files = make_data(str(root / "data"), rows=1000, files=3, features=8)
    model = build_model([8, 16, 4], str(root / "m.onnx"), seed=3)
    return root, files, model


def _table(files):
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_data_has_the_promised_rows_and_columns(tiny):
    _, files, _ = tiny
    t = _table(files)
    assert len(files) == 3
    assert t.num_rows == 1000
    assert t.column_names == ["id", *FEATURES]
    assert t.schema.field("id").type == pa.int64()
    assert {t.schema.field(f).type for f in FEATURES} == {pa.float32()}
    assert np.array_equal(t.column("id").to_numpy(), np.arange(1000))


def test_data_of_the_same_size_is_reused_not_rewritten(tiny):
    root, files, _ = tiny
    before = [os.stat(f).st_mtime_ns for f in files]
    again = make_data(str(root / "data"), rows=1000, files=3, features=8)
    assert again == files
    assert [os.stat(f).st_mtime_ns for f in again] == before


def test_data_of_another_size_replaces_the_old(tmp_path):
    make_data(str(tmp_path / "d"), rows=100, files=4, features=2)
    files = make_data(str(tmp_path / "d"), rows=60, files=2, features=2)
    assert sorted(os.listdir(tmp_path / "d")) == ["part-00000.parquet", "part-00001.parquet"]
    assert _table(files).num_rows == 60


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_bench_model_loads_with_input_x_and_a_dynamic_batch(tmp_path, name):
    widths = MODELS[name]
    sess = ort.InferenceSession(build_model(widths, str(tmp_path / f"{name}.onnx")))
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("x", "tensor(float)", 64)
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch axis
    assert (out.type, out.shape[1]) == ("tensor(float)", 10)
    assert sess.run(None, {"x": np.zeros((3, 64), np.float32)})[0].shape == (3, 10)


def test_the_mlp_is_the_demo_digits_shape():
    assert MODELS["mlp"] == [64, 128, 64, 10]


def test_the_heavy_model_costs_at_least_ten_times_the_mlp_per_row():
    assert flops_per_row(MODELS["heavy"]) >= 10 * flops_per_row(MODELS["mlp"])


def test_the_onnx_model_computes_the_numpy_forward_pass(tiny):
    _, _, model = tiny
    x = np.random.default_rng(0).standard_normal((50, 8), dtype=np.float32)
    got = ort.InferenceSession(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, numpy_forward(mlp_weights([8, 16, 4], seed=3), x), rtol=1e-5, atol=1e-5)


def test_floor_scores_every_row_like_numpy(tiny, tmp_path):
    _, files, model = tiny
    out = tmp_path / "floor"
    assert run_floor(model, files, str(out), FEATURES, batch_rows=128) == 1000
    got = _table(sorted(str(p) for p in out.iterdir()))
    src = _table(files)
    assert np.array_equal(got.column("id").to_numpy(), src.column("id").to_numpy())
    x = np.stack([src.column(f).to_numpy() for f in FEATURES], axis=1)
    want = numpy_forward(mlp_weights([8, 16, 4], seed=3), x)
    np.testing.assert_allclose(score_matrix(got, {"id"}), want, rtol=1e-5, atol=1e-5)


def test_check_output_passes_the_floor_against_itself(tiny, tmp_path):
    _, files, model = tiny
    run_floor(model, files, str(tmp_path), FEATURES)
    ref = read_reference(str(tmp_path / "part-00000.parquet"))
    assert check_output(str(tmp_path), 1000, ref, FEATURES) == {"ok": True, "max_abs_diff": 0.0}


def test_check_output_reads_per_class_columns_and_ignores_bookkeeping(tiny, tmp_path):
    """Another system's layout: one column per class, extra key columns, a
    manifest folder, rows in another order."""
    _, files, model = tiny
    run_floor(model, files, str(tmp_path / "floor"), FEATURES)
    ref = read_reference(str(tmp_path / "floor" / "part-00000.parquet"))
    t = _table(sorted(str(p) for p in (tmp_path / "floor").iterdir()))
    y = score_matrix(t, {"id"})
    other = pa.table({"source": ["a"] * 1000, "row": np.arange(1000), "id": t.column("id"),
                      **{f"y_{c}": y[:, c] for c in range(4)}}).take(np.arange(999, -1, -1))
    (tmp_path / "other" / "_flywheel").mkdir(parents=True)
    pq.write_table(other, tmp_path / "other" / "p.parquet")
    (tmp_path / "other" / "_flywheel" / "manifest.parquet").write_bytes(b"not parquet")
    assert check_output(str(tmp_path / "other"), 1000, ref, FEATURES)["ok"] is True


def test_check_output_reports_missing_rows_and_wrong_scores(tiny, tmp_path):
    _, files, model = tiny
    run_floor(model, files, str(tmp_path), FEATURES)
    ref = read_reference(str(tmp_path / "part-00000.parquet"))
    short = check_output(str(tmp_path), 1001, ref, FEATURES)
    assert (short["ok"], short["problem"]) == (False, "1000 rows, 1000 distinct ids; wanted 0..1000")
    ids, y = ref
    off = check_output(str(tmp_path), 1000, (ids, y + 1e-3), FEATURES)
    assert off["ok"] is False
    assert off["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)


def test_verdicts_within_the_floor_target_and_ahead_of_ray_data():
    v = verdicts({"floor": 100.0, "raydata": 250.0, "flywheel": 350.0}, cores=4)
    assert v["floor_x_cores"] == 400.0
    assert v["vs_floor"]["floor_x_cores_over_flywheel"] == pytest.approx(400 / 350)
    assert v["vs_floor"]["met"] is True
    assert v["vs_raydata"]["flywheel_over_raydata"] == pytest.approx(1.4)
    assert v["vs_raydata"]["met"] is True


def test_verdicts_miss_below_the_floor_target_and_behind_ray_data():
    v = verdicts({"floor": 100.0, "raydata": 300.0, "flywheel": 300.0}, cores=4)
    assert v["vs_floor"]["met"] is False  # 400 / 300 = 1.33 > 1.25
    assert v["vs_raydata"]["met"] is False  # a tie is not ahead


def test_verdicts_at_exactly_one_point_two_five_meet_the_target():
    assert verdicts({"floor": 100.0, "flywheel": 320.0}, cores=4)["vs_floor"]["met"] is True


def test_verdicts_of_systems_not_run_are_none():
    v = verdicts({"floor": 100.0}, cores=2)
    assert (v["floor_x_cores"], v["vs_floor"], v["vs_raydata"]) == (200.0, None, None)
