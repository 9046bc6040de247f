"""The batch room without Ray: planning, column mapping, readers, one
partition scored by the actor class called directly, resume bookkeeping,
metrics and the checks that fail a run before it starts."""

from __future__ import annotations

import io
import json

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _batch_data import features_of, image_onnx, linear_onnx, parquet_files

from flywheel.batch import PredictJob, parse_job
from flywheel.batch.mapping import plan_inputs, to_inputs
from flywheel.batch.metrics import auc, evaluate
from flywheel.batch.model import resolve
from flywheel.batch.output import Manifest, OutputFolder
from flywheel.batch.report import Progress
from flywheel.batch.runner import run, scoring_plan
from flywheel.batch.scorer import PartitionScorer, ScoringPlan
from flywheel.batch.sources import open_input, plan_partitions
from flywheel.protocol.errors import ConfigError, InvalidInputError, PreconditionFailedError
from flywheel.runtime.signature import Signature, TensorSpec

SIG = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("logits", "FP32", (-1, 2)),))


# -- the job ------------------------------------------------------------------------
def test_job_fields_are_checked_by_name():
    with pytest.raises(ConfigError, match="format 'xlsx' unknown"):
        PredictJob(model="m", input="i", output="o", format="xlsx")
    with pytest.raises(ConfigError, match="register: an evaluation needs a label"):
        PredictJob(model="m", input="i", output="o", register=True)
    with pytest.raises(ConfigError, match="'row' is a column Flywheel writes itself"):
        PredictJob(model="m", input="i", output="o", keys=["row"])
    with pytest.raises(ConfigError, match="batch_rows must be >= 0"):
        PredictJob(model="m", input="i", output="o", batch_rows=-1)
    with pytest.raises(ConfigError, match="invalid batch job.*actors"):
        parse_job({"model": "m", "input": "i", "output": "o", "actors": "two"})
    with pytest.raises(ConfigError, match="invalid batch job.*unknown field"):
        parse_job({"model": "m", "input": "i", "output": "o", "colums": {}})


# -- partitions ---------------------------------------------------------------------
def test_large_parquet_files_split_by_row_groups_and_hive_folders_become_keys(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in" / "day=2026-12-01", w, files=1, rows=1000, row_group=250)
    parquet_files(tmp_path / "in" / "day=2026-12-02", w, files=1, rows=300, row_group=250, seed=2)
    fs, root, files = open_input(str(tmp_path / "in"))
    parts = plan_partitions(fs, root, files, "parquet", partition_rows=500)
    assert [(p.rel, p.row_groups, p.rows, p.first_row) for p in parts] == [
        ("day=2026-12-01/part-0.parquet", (0, 1), 500, 0),
        ("day=2026-12-01/part-0.parquet", (2, 3), 500, 500),
        ("day=2026-12-02/part-0.parquet", (), 300, 0),
    ]
    assert parts[0].hive == {"day": "2026-12-01"}
    assert len({p.name for p in parts}) == 3
    # the same input plans the same partition names: what resuming relies on
    assert [p.name for p in plan_partitions(fs, root, files, "parquet", 500)] == [p.name for p in parts]


def test_globs_and_missing_inputs(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=3, rows=10)
    _, _, files = open_input(f"file://{tmp_path}/in/part-[01].parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.parquet", "part-1.parquet"]
    with pytest.raises(InvalidInputError, match="no such file or folder"):
        open_input(str(tmp_path / "nothing"))


# -- mapping ------------------------------------------------------------------------
def _schema(**cols):
    return pa.schema(list(cols.items()))


def test_auto_mapping_takes_the_numeric_columns_that_are_not_keys_or_label():
    schema = _schema(id=pa.int64(), a=pa.float32(), b=pa.float64(), c=pa.int32(), y=pa.int64())
    (plan,) = plan_inputs(schema, SIG, "f.parquet", columns={}, exclude={"id", "y"})
    assert plan.columns == ("a", "b", "c")
    batch = pa.record_batch({"id": [1, 2], "a": pa.array([1, 2], pa.float32()), "b": [3.0, 4.0],
                             "c": pa.array([5, 6], pa.int32()), "y": [0, 1]})
    x = to_inputs(batch, [plan], "f.parquet")["x"]
    assert x.dtype == np.float32 and x.tolist() == [[1, 3, 5], [2, 4, 6]]


def test_globs_and_list_columns_map_inputs():
    schema = _schema(p_2=pa.float32(), p_1=pa.float32(), p_0=pa.float32(), other=pa.float32())
    (plan,) = plan_inputs(schema, SIG, "f", columns={"x": ["p_0", "p_*"]}, exclude=set())
    assert plan.columns == ("p_0", "p_2", "p_1")  # named first, then the glob's in file order
    schema = _schema(x=pa.list_(pa.float32(), 3), id=pa.int64())
    (plan,) = plan_inputs(schema, SIG, "f", columns={}, exclude={"id"})
    assert plan.list_column == "x"
    batch = pa.record_batch({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3),
                             "id": [1, 2]})
    assert to_inputs(batch.slice(1), [plan], "f")["x"].tolist() == [[3, 4, 5]]


@pytest.mark.parametrize("schema, columns, message", [
    (_schema(a=pa.float32(), b=pa.float32()), {},
     r"f.parquet: model input 'x' expects FP32 x 3 per row \(shape \[-1, 3\]\); 2 column\(s\) would feed it"),
    (_schema(a=pa.float32(), b=pa.string(), c=pa.float32()), {"x": ["a", "b", "c"]},
     r"f.parquet: column 'b' is string; model input 'x' expects FP32 x 3 per row"),
    (_schema(a=pa.float32()), {"x": ["zz_*"]}, r"f.parquet: column 'zz_\*' \(columns.x\) is not there"),
    (_schema(x=pa.list_(pa.float32(), 4)), {}, r"column 'x' holds 4 values per row; model input 'x' expects"),
    (_schema(a=pa.float32()), {"nope": ["a"]}, r"columns: 'nope' is not an input of the model"),
])
def test_mismatches_name_the_file_the_column_and_the_expectation(schema, columns, message):
    with pytest.raises(InvalidInputError, match=message):
        plan_inputs(schema, SIG, "f.parquet", columns=columns, exclude=set())


def test_float_columns_do_not_feed_integer_inputs():
    sig = Signature((TensorSpec("ids", "INT64", (-1, 1)),), (TensorSpec("o", "FP32", (-1, 1)),))
    with pytest.raises(InvalidInputError, match="column 'v' is double; model input 'ids' expects INT64"):
        plan_inputs(_schema(v=pa.float64()), sig, "f", columns={}, exclude=set())


def test_null_values_fail_the_batch_with_the_column_named():
    (plan,) = plan_inputs(_schema(a=pa.float32(), b=pa.float32(), c=pa.float32()), SIG, "f", columns={},
                          exclude=set())
    batch = pa.record_batch({"a": [1.0, 2.0], "b": [1.0, None], "c": [1.0, 2.0]})
    with pytest.raises(InvalidInputError, match="f: column 'b' is empty \\(null\\) at row 1"):
        to_inputs(batch, [plan], "f")


# -- scoring one partition without Ray ------------------------------------------------
def _plan(tmp_path, job: PredictJob, run_id="r-test") -> tuple[ScoringPlan, list]:
    source = resolve(job, "", "")
    fs, root, files = open_input(job.input)
    from flywheel.batch.sources import detect_format

    fmt = detect_format(files, job.format)
    parts = plan_partitions(fs, root, files, fmt, job.partition_rows)
    plan = scoring_plan(job, source, parts, fmt, run_id)
    return msgspec.structs.replace(plan, batch_rows=job.batch_rows or 100), parts


def _score(plan: ScoringPlan, parts) -> dict:
    OutputFolder(plan.job.output).fs.makedirs(plan.job.output + "/_flywheel/tmp", exist_ok=True)
    scorer = PartitionScorer(msgspec.msgpack.encode(plan))
    return scorer({"partition": np.array([msgspec.json.encode(p).decode() for p in parts], dtype=object)})


def test_a_partition_is_scored_streaming_and_written_with_its_keys(tmp_path):
    import onnxruntime as ort

    w = linear_onnx(tmp_path / "m.onnx")
    labels = parquet_files(tmp_path / "in", w, files=2, rows=350, row_group=100)
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                     keys=["id"], label="y", batch_rows=64, partition_rows=200)
    plan, parts = _plan(tmp_path, job)
    got = _score(plan, parts)
    assert list(got["rows"]) == [200, 150, 200, 150] and not any(got["error"])
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 700
    assert table.column_names == ["source", "row", "id", "y", "logits", "model_version", "run_id"]
    ids = table.column("id").to_numpy()
    assert sorted(ids.tolist()) == list(range(700))
    src = pq.read_table(tmp_path / "in")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    want = dict(zip(src.column("id").to_pylist(), sess.run(None, {"x": features_of(src, 8)})[0]))
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(logits, np.stack([want[i] for i in ids]), rtol=1e-5, atol=1e-5)
    assert [labels[i] for i in ids] == table.column("y").to_pylist()
    rows = {(s, r) for s, r in zip(table.column("source").to_pylist(), table.column("row").to_pylist())}
    assert len(rows) == 700 and ("part-1.parquet", 349) in rows
    assert set(table.column("model_version").to_pylist()) == {"m.onnx"}
    assert set(table.column("run_id").to_pylist()) == {"r-test"}
    assert not list((tmp_path / "out" / "_flywheel" / "tmp").iterdir())  # nothing half-written left


def test_a_corrupt_file_fails_only_its_partition(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=2, rows=100)
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                     keys=["id"], label="y")
    plan, parts = _plan(tmp_path, job)
    data = (tmp_path / "in" / "part-1.parquet").read_bytes()
    (tmp_path / "in" / "part-1.parquet").write_bytes(data[:200] + b"\0" * 300 + data[500:])  # damaged pages
    got = _score(plan, parts)
    assert got["rows"][0] == 100 and got["error"][0] == ""
    assert got["rows"][1] == 0 and "part-1.parquet" in got["error"][1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [f"{parts[0].name}.parquet"]


def test_csv_and_npy_inputs(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((130, 8)).astype(np.float32)
    (tmp_path / "csv").mkdir()
    header = "id," + ",".join(f"f{j}" for j in range(8))
    lines = [header] + [f"{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(x)]
    (tmp_path / "csv" / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", x)
    want = x @ w
    for fmt, keys in (("csv", ["id"]), ("npy", [])):
        job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / fmt), output=str(tmp_path / f"o-{fmt}"),
                         keys=keys, batch_rows=50)
        plan, parts = _plan(tmp_path, job)
        got = _score(plan, parts)
        assert list(got["rows"]) == [130], got["error"]
        table = pq.read_table(tmp_path / f"o-{fmt}")
        order = np.argsort(table.column("row").to_numpy())
        logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))[order]
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_truncated_npy_fails_with_the_file_named(tmp_path):
    linear_onnx(tmp_path / "m.onnx")
    (tmp_path / "npy").mkdir()
    buf = io.BytesIO()
    np.save(buf, np.ones((100, 8), np.float32))
    (tmp_path / "npy" / "a.npy").write_bytes(buf.getvalue()[:-64])
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "npy"), output=str(tmp_path / "o"),
                     batch_rows=30)
    plan, parts = _plan(tmp_path, job)
    got = _score(plan, parts)
    assert "a.npy: truncated" in got["error"][0]


def test_image_folders_with_a_label_per_folder(tmp_path):
    from PIL import Image

    image_onnx(tmp_path / "img.onnx", channels=3, size=8, classes=2)
    for label, color in (("red", (250, 10, 10)), ("green", (10, 250, 10))):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 12), color).save(tmp_path / "imgs" / label / f"{i}.png")
    job = PredictJob(model=str(tmp_path / "img.onnx"), input=str(tmp_path / "imgs"), output=str(tmp_path / "o"),
                     label="label", classes=["red", "green"], batch_rows=4)
    plan, parts = _plan(tmp_path, job)
    got = _score(plan, parts)
    assert list(got["rows"]) == [5, 5], got["error"]
    table = pq.read_table(tmp_path / "o")
    pred = np.argmax(np.stack(table.column("logits").to_numpy(zero_copy_only=False)), axis=1)
    truth = [["red", "green"].index(v) for v in table.column("label").to_pylist()]
    assert pred.tolist() == truth
    assert sorted(table.column("source").to_pylist())[0] == "green/0.png"


# -- resume bookkeeping -------------------------------------------------------------
def _manifest(**kw) -> Manifest:
    base = dict(run_id="r1", model="m", model_sha256="a" * 64, options={"keys": ["id"]},
                partitions={"p1": "10:1", "p2": "10:1"}, created_at=0.0)
    return Manifest(**{**base, **kw})


def test_a_folder_resumes_only_the_same_run(tmp_path):
    out = OutputFolder(str(tmp_path / "o"))
    m, done = out.begin(_manifest(), overwrite=False)
    assert done == set()
    (tmp_path / "o" / "p1.parquet").write_bytes(b"x")
    m2, done = out.begin(_manifest(run_id="r2"), overwrite=False)
    assert m2.run_id == "r1" and done == {"p1"}
    with pytest.raises(PreconditionFailedError, match="scored with model m .* pass overwrite"):
        out.begin(_manifest(model_sha256="b" * 64), overwrite=False)
    with pytest.raises(PreconditionFailedError, match="was asked keys=\\['id'\\], not \\[\\]"):
        out.begin(_manifest(options={"keys": []}), overwrite=False)
    with pytest.raises(PreconditionFailedError, match="wrote partitions whose input has changed since \\(p1"):
        out.begin(_manifest(partitions={"p1": "11:2", "p2": "10:1"}), overwrite=False)
    # a partition not yet written may have been mended: the run goes on
    m4, done = out.begin(_manifest(run_id="r4", partitions={"p1": "10:1", "p2": "11:2"}), overwrite=False)
    assert m4.run_id == "r1" and m4.partitions["p2"] == "11:2" and done == {"p1"}
    m3, done = out.begin(_manifest(run_id="r3", model_sha256="b" * 64), overwrite=True)
    assert m3.run_id == "r3" and done == set() and not (tmp_path / "o" / "p1.parquet").exists()


def test_stray_parquet_files_are_not_taken_for_a_run(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "other.parquet").write_bytes(b"x")
    with pytest.raises(PreconditionFailedError, match="holds Parquet files but no Flywheel run"):
        OutputFolder(str(tmp_path / "o")).begin(_manifest(), overwrite=False)


# -- checks before the run: no Ray is started for a job that cannot run -------------
def test_a_file_that_does_not_fit_the_model_fails_before_the_run(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=2, rows=20)
    pq.write_table(pa.table({"id": [1], "f0": [1.0], "y": [0]}), tmp_path / "in" / "part-9.parquet")
    with pytest.raises(InvalidInputError, match=r"input file part-9.parquet: model input 'x' expects FP32 x 8 per "
                                                r"row \(shape \[-1, 8\]\); 1 column\(s\) would feed it"):
        run(PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                       keys=["id"], label="y"), progress=False)
    with pytest.raises(InvalidInputError, match="input file part-0.parquet: no column 'customer' \\(keys\\)"):
        run(PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                       keys=["customer"]), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_model_file_must_exist_and_a_file_model_cannot_register(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        run(PredictJob(model=str(tmp_path / "none.onnx"), input=str(tmp_path), output=str(tmp_path / "o")),
            progress=False)
    linear_onnx(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="register: the model is a file"):
        run(PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path), output=str(tmp_path / "o"), label="y",
                       register=True), progress=False)


# -- metrics and progress -----------------------------------------------------------
def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import mean_squared_error, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    logits = rng.standard_normal((500, 3)) + np.eye(3)[y] * 1.5
    got = evaluate(y, logits, "auto", [])
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert got["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert auc(np.array([True, False, True]), np.array([0.9, 0.1, 0.5])) == 1.0
    target = rng.standard_normal(200)
    pred = target + rng.standard_normal(200) * 0.1
    reg = evaluate(target, pred.astype(np.float32), "auto", [])
    assert reg["rmse"] == pytest.approx(np.sqrt(mean_squared_error(target, pred)), rel=1e-5)
    named = evaluate(np.array(["b", "a", "b"], dtype=object), np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]),
                     "classification", [])
    assert named["accuracy"] == 1.0 and named["auc"] == 1.0
    with pytest.raises(InvalidInputError, match="label: value 'c' is not among classes"):
        evaluate(np.array(["c"], dtype=object), np.array([[0.1, 0.9]]), "classification", ["a", "b"])


def test_progress_shows_rows_rate_and_eta():
    out = io.StringIO()
    bar = Progress(4, 4000, 0, stream=out, every_s=0)
    bar.advance(1000, 0)
    assert "batch: 1/4 partitions, 1,000/4,000 rows" in out.getvalue()
    assert "rows/s, ETA" in out.getvalue()
    for _ in range(3):
        bar.advance(1000, 0)
    assert "4/4 partitions, 4,000/4,000 rows" in out.getvalue() and "done in" in out.getvalue()


def test_the_report_is_json():
    from flywheel.batch import BatchReport

    r = BatchReport(run_id="r", model="m", model_sha256="s", output="o", partitions=1, skipped=0, scored=1,
                    failed=[], rows=3, seconds=1.0, rows_per_s=3.0, actors=1, nodes=["n"], peak_rss_mb=1.0)
    assert json.loads(msgspec.json.encode(r))["rows"] == 3 and r.ok


# -- several inputs, fsspec URIs, the backend's config, the model's bytes ----------
def _two_input_onnx(path) -> None:
    """``out = concat(a, b) @ W``: a takes 2 values per row, b 3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(10, dtype=np.float32).reshape(5, 2)
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1), helper.make_node("MatMul", ["ab", "W"], ["out"])],
        "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_model_with_several_inputs_takes_them_from_mapped_columns(tmp_path):
    _two_input_onnx(tmp_path / "two.onnx")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(5)
    cols = {c: rng.standard_normal(40).astype(np.float32) for c in ("u", "v", "p", "q", "r")}
    pq.write_table(pa.table({"key": np.arange(40), **cols}), tmp_path / "in" / "t.parquet")
    unmapped = PredictJob(model=str(tmp_path / "two.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                          keys=["key"])
    with pytest.raises(InvalidInputError, match="no column named 'a' for model input 'a' \\(FP32 x 2 per row"):
        _plan(tmp_path, unmapped)
    # fsspec URIs for the input and the output
    job = PredictJob(model=str(tmp_path / "two.onnx"), input=f"file://{tmp_path}/in/*.parquet",
                     output=f"file://{tmp_path}/o", keys=["key"], columns={"a": ["u", "v"], "b": ["p", "q", "r"]})
    plan, parts = _plan(tmp_path, job)
    got = _score(plan, parts)
    assert list(got["rows"]) == [40], got["error"]
    table = pq.read_table(tmp_path / "o").sort_by("key")
    x = np.column_stack([cols[c] for c in ("u", "v", "p", "q", "r")])
    want = x @ np.arange(10, dtype=np.float32).reshape(5, 2)
    np.testing.assert_allclose(np.stack(table.column("out").to_numpy(zero_copy_only=False)), want, rtol=1e-5)


def test_each_backend_gets_batches_sized_for_it():
    from flywheel.batch.model import ModelSource, batch_rows, model_config

    assert batch_rows("onnxruntime", 0) == 8192 and batch_rows("tensorrt", 0) == 1024
    assert batch_rows("tensorrt", 300) == 300
    src = ModelSource(label="m", artifact="model.onnx", sha256="0" * 64, backend="tensorrt", signature=SIG)
    cfg = model_config(src, "/nonexistent/m.onnx", threads=1, gpu=True, rows=1024)
    assert (cfg.tensorrt.min_batch, cfg.tensorrt.opt_batch, cfg.tensorrt.max_batch) == (1, 1024, 1024)
    onnx = model_config(msgspec.structs.replace(src, backend="onnxruntime"), "/m.onnx", threads=2, gpu=True, rows=8)
    assert onnx.onnxruntime.providers == ("cuda", "cpu") and onnx.onnxruntime.intra_op_threads == 2


def test_an_actor_refuses_model_bytes_other_than_the_run_resolved(tmp_path):
    from flywheel.batch.model import load
    from flywheel.protocol.errors import IntegrityError

    linear_onnx(tmp_path / "m.onnx")
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path), output=str(tmp_path / "o"))
    source = resolve(job, "", "")
    linear_onnx(tmp_path / "m.onnx", seed=7)  # replaced after the driver resolved it
    with pytest.raises(IntegrityError, match="m.onnx: .* has sha256 .*, the run resolved"):
        load(source, threads=1, gpu=False)


def test_a_plug_in_backend_scores_batches_too(tmp_path, monkeypatch):
    from pathlib import Path

    from flywheel.runtime.backends import registry

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "plugins"))
    try:
        (tmp_path / "weights.bin").write_bytes(b"the doubler reads no weights")
        (tmp_path / "in").mkdir()
        pq.write_table(pa.table({"k": [1, 2], "a": [1.0, 2.0], "b": [3.0, 4.0]}), tmp_path / "in" / "t.parquet")
        job = PredictJob(model=str(tmp_path / "weights.bin"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                         keys=["k"], backend="doubler", settings={"width": 2})
        plan, parts = _plan(tmp_path, job)
        assert list(_score(plan, parts)["rows"]) == [2]
        table = pq.read_table(tmp_path / "o").sort_by("k")
        assert table.column("y").to_pylist() == [[2.0, 6.0], [4.0, 8.0]]
        with pytest.raises(ConfigError, match="settings of backend 'doubler'"):
            resolve(msgspec.structs.replace(job, settings={"width": "wide"}), "", "")
    finally:
        registry._loaded.pop("doubler", None)  # the registry keeps what it loaded for the process's life


# -- what the review found: empty partitions, CSV types, ragged lists, hidden folders ---------
def test_empty_partitions_keep_the_run_schema(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=1, rows=30)
    empty = pq.read_table(tmp_path / "in" / "part-0.parquet").slice(0, 0)
    pq.write_table(empty, tmp_path / "in" / "part-9.parquet")
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                     keys=["id"], label="y")
    plan, parts = _plan(tmp_path, job)
    assert list(_score(plan, parts)["rows"]) == [30, 0]
    schemas = {pq.read_schema(p).remove_metadata() for p in (tmp_path / "o").glob("*.parquet")}
    assert len(schemas) == 1
    table = pq.read_table(tmp_path / "o")
    assert table.column_names == ["source", "row", "id", "y", "logits", "model_version", "run_id"]
    assert table.num_rows == 30


def test_csv_columns_read_as_the_model_takes_them_and_header_only_files_pass(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx", features=2, classes=2)
    (tmp_path / "csv").mkdir()
    # a first block of integers, then a fraction: inference alone would fail the file at row 40,000
    lines = ["id,f0,f1"] + [f"{i},{i % 3},1" for i in range(40_000)] + ["40000,0.5,2.5"]
    (tmp_path / "csv" / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "csv" / "b.csv").write_text("id,f0,f1\n")  # yesterday's file, with no rows
    job = PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "csv"), output=str(tmp_path / "o"),
                     keys=["id"], batch_rows=10_000)
    plan, parts = _plan(tmp_path, job)
    got = _score(plan, parts)
    assert list(got["rows"]) == [40_001, 0], got["error"]
    table = pq.read_table(tmp_path / "o").sort_by("id")
    last = np.array(table.column("logits").to_pylist()[-1])
    np.testing.assert_allclose(last, np.array([0.5, 2.5], np.float32) @ w, rtol=1e-5)


def test_ragged_or_holey_list_rows_fail_with_the_row_named(tmp_path):
    sig_schema = _schema(x=pa.list_(pa.float32()))
    (plan,) = plan_inputs(sig_schema, SIG, "f", columns={}, exclude=set())
    ragged = pa.record_batch({"x": pa.array([[1, 2], [3, 4, 5, 6]], pa.list_(pa.float32()))})
    with pytest.raises(InvalidInputError, match="column 'x' holds 2 values at row 0 of this batch; model input 'x' "
                                                "expects 3 per row"):
        to_inputs(ragged, [plan], "f")
    holey = pa.record_batch({"x": pa.array([[1, None, 3]], pa.list_(pa.float32()))})
    with pytest.raises(InvalidInputError, match="empty \\(null\\) values inside its lists"):
        to_inputs(holey, [plan], "f")


def test_hidden_and_underscore_folders_are_not_input(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=1, rows=5)
    parquet_files(tmp_path / "in" / "_temporary" / "0", w, files=1, rows=5)
    parquet_files(tmp_path / "in" / ".hidden", w, files=1, rows=5)
    _, _, files = open_input(str(tmp_path / "in"))
    assert [f.rsplit("/in/", 1)[1] for f in files] == ["part-0.parquet"]


def test_images_feed_integer_inputs_unscaled(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from PIL import Image

    graph = helper.make_graph([helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("ReduceMax", ["f"], ["top"], axes=[1, 2, 3], keepdims=0)], "u8",
                              [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 1])],
                              [helper.make_tensor_value_info("top", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "u8.onnx"))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (4, 4), 200).save(tmp_path / "imgs" / "a" / "x.png")
    job = PredictJob(model=str(tmp_path / "u8.onnx"), input=str(tmp_path / "imgs"), output=str(tmp_path / "o"))
    plan, parts = _plan(tmp_path, job)
    assert list(_score(plan, parts)["rows"]) == [1]
    assert pq.read_table(tmp_path / "o").column("top").to_pylist() == [200.0]


def test_binary_models_with_one_score_and_string_labels_with_a_class_absent():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.2], [0.9], [0.6], [0.4]], dtype=np.float32)
    got = evaluate(y, probs, "classification", [])
    assert got["accuracy"] == 1.0 and got["auc"] == 1.0
    logits = np.array([-2.0, 3.0, 0.5, -0.1], dtype=np.float32)
    assert evaluate(y, logits, "classification", [])["accuracy"] == 1.0  # logits: threshold 0
    assert "rmse" in evaluate(y.astype(np.float32), probs, "auto", [])  # auto reads one float as regression
    labels = np.array(["cat", "dog"], dtype=object)  # a 3-class model; "bird" absent from this data
    scores = np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    with pytest.raises(InvalidInputError, match="2 distinct labels .* a model with 3 classes; give classes"):
        evaluate(labels, scores, "classification", [])
    assert evaluate(labels, scores, "classification", ["bird", "cat", "dog"])["accuracy"] == 1.0
    with pytest.raises(InvalidInputError, match="label: 1 row\\(s\\) have no label"):
        evaluate(np.array([0.0, np.nan]), np.array([[0.9, 0.1], [0.2, 0.8]]), "classification", [])


# -- the command line ---------------------------------------------------------------------------
def _args(*argv):
    from flywheel.cli.main import build_parser

    return build_parser().parse_args(["predict", *argv])


def test_flags_over_a_config_file_make_the_job(tmp_path):
    from flywheel.cli.predict import job_from_args

    (tmp_path / "job.yaml").write_text("model: m.onnx\ninput: in/\noutput: out/\nkeys: [id]\nactors: 3\n")
    job = job_from_args(_args("--config", str(tmp_path / "job.yaml"), "--actors", "1", "--map", "x=f_*,g",
                              "--map", "z=h", "--label", "y", "--classes", "a,b"))
    assert (job.model, job.keys, job.actors, job.label, job.classes) == ("m.onnx", ["id"], 1, "y", ["a", "b"])
    assert job.columns == {"x": ["f_*", "g"], "z": ["h"]}
    with pytest.raises(ConfigError, match="--map 'x': expected INPUT=COLUMN"):
        job_from_args(_args("--model", "m", "--input", "i", "--output", "o", "--map", "x"))
    with pytest.raises(ConfigError, match="give --input, --output"):
        job_from_args(_args("--model", "m"))
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="a batch job is a mapping"):
        job_from_args(_args("--config", str(tmp_path / "bad.yaml")))


def test_the_command_exits_2_naming_the_file_when_the_input_cannot_fit(tmp_path, capsys):
    from flywheel.cli.main import main

    linear_onnx(tmp_path / "m.onnx")
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", np.ones((5, 7), np.float32))
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "npy"),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "input file a.npy: column 'array' holds 7 values per row; model input 'x' expects FP32 x 8" in err
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("id,f0,f1\n1,a,2\n")
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "csv"),
                 "--output", str(tmp_path / "o"), "--keys", "id"]) == 2
    assert "input file a.csv: model input 'x' expects FP32 x 8 per row" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "csv"),
                 "--output", str(tmp_path / "o"), "--map", "x=f*", "--keys", "id"]) == 2
    assert "input file a.csv: column 'f0' is string; model input 'x' expects" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "npy"),
                 "--output", str(tmp_path / "o"), "--label", "y"]) == 2
    assert "input file a.npy: no column 'y' (label)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluation_settings_are_checked_before_the_run(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=1, rows=10)
    base = dict(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"), keys=["id"],
                label="y")
    with pytest.raises(ConfigError, match="score_output 'probs' is not an output of the model; its outputs are"):
        run(PredictJob(**base, score_output="probs"), progress=False)
    with pytest.raises(ConfigError, match="task regression: output 'logits' has shape \\[-1, 3\\]"):
        run(PredictJob(**base, task="regression"), progress=False)
    assert not (tmp_path / "o").exists()


def test_object_store_style_file_systems_read_and_commit_through_fsspec(tmp_path):
    import fsspec

    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=2, rows=50)
    mem = fsspec.filesystem("memory")
    for p in (tmp_path / "in").iterdir():
        mem.pipe(f"/fw-batch-test/in/{p.name}", p.read_bytes())
    try:
        job = PredictJob(model=str(tmp_path / "m.onnx"), input="memory://fw-batch-test/in",
                         output="memory://fw-batch-test/out", keys=["id"], label="y")
        out = OutputFolder(job.output)
        assert not out.local
        out.begin(_manifest(), overwrite=False)
        plan, parts = _plan(tmp_path, job)
        assert list(_score(plan, parts)["rows"]) == [50, 50]
        done = sorted(p.rsplit("/", 1)[1] for p in mem.ls("/fw-batch-test/out", detail=False) if p.endswith(".parquet"))
        assert done == sorted(f"{p.name}.parquet" for p in parts)
        assert mem.ls("/fw-batch-test/out/_flywheel/tmp", detail=False) == []
        with mem.open(f"/fw-batch-test/out/{parts[0].name}.parquet", "rb") as f:
            assert pq.read_table(f).column("id").to_pylist() == list(range(50))
    finally:
        mem.rm("/fw-batch-test", recursive=True)


def test_an_output_named_like_a_key_is_refused_before_the_run(tmp_path):
    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=1, rows=5)
    table = pq.read_table(tmp_path / "in" / "part-0.parquet").rename_columns(
        ["logits", *[f"f{j}" for j in range(8)], "y"])
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    with pytest.raises(ConfigError, match="model output 'logits' has the name of a column the output already holds"):
        run(PredictJob(model=str(tmp_path / "m.onnx"), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                       keys=["logits"], label="y"), progress=False)
