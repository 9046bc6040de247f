"""flywheel.runtime.convert: one small real model of each framework, read
from the format the library saves natively (or held in memory), converted
with skl2onnx / onnxmltools and checked by ONNX Runtime; and the refusals."""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import sys

import lightgbm as lgb
import numpy as np
import onnxruntime as ort
import pytest
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from flywheel.protocol.errors import ConfigError, PreconditionFailedError
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend
from flywheel.runtime.convert import convert_file, convert_sklearn, convert_sklearn_factory, get_framework
from flywheel.runtime.convert.common import check_parity
from flywheel.runtime.signature import Signature, TensorSpec


def _classifier_signature(features: int, classes: int) -> Signature:
    return Signature(inputs=(TensorSpec("input", "FP32", (-1, features)),),
                     outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, classes))))


@pytest.fixture(scope="module")
def iris():
    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def xgb_iris(iris, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("xgb") / "iris.json"
    xgb.XGBClassifier(n_estimators=6, max_depth=3).fit(*iris).save_model(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".ubj"])
def test_xgboost_classifier_from_its_own_file(iris, tmp_path, suffix):
    path = tmp_path / f"iris{suffix}"
    xgb.XGBClassifier(n_estimators=6, max_depth=3).fit(*iris).save_model(path)
    converted = convert_file("xgboost", str(path))
    assert converted.signature == _classifier_signature(4, 3)
    assert converted.parity.rows == 64
    assert converted.parity.sample == "generated"
    assert converted.parity.max_abs_diff <= 1e-4
    assert converted.metadata()["tags"]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert converted.metadata()["tags"]["source_framework"] == "xgboost"
    booster = xgb.Booster(model_file=str(path))
    labels = ort.InferenceSession(converted.onnx).run(["label"], {"input": iris[0]})[0]
    assert labels.tolist() == booster.predict(xgb.DMatrix(iris[0])).argmax(axis=1).tolist()


def test_lightgbm_binary_from_its_text_file_with_a_csv_sample(tmp_path):
    x, y = load_breast_cancer(return_X_y=True)
    model = tmp_path / "cancer.txt"
    lgb.LGBMClassifier(n_estimators=8, num_leaves=7, verbose=-1).fit(x, y).booster_.save_model(model)
    sample = tmp_path / "rows.csv"
    np.savetxt(sample, x[:40], delimiter=",", header=",".join(f"f{i}" for i in range(30)), comments="")
    converted = convert_file("lightgbm", str(model), sample=str(sample))
    assert converted.signature == _classifier_signature(30, 2)
    assert converted.parity.rows == 40
    assert converted.parity.sample == "rows.csv"
    assert converted.parity.max_abs_diff <= 1e-4
    probs = ort.InferenceSession(converted.onnx).run(["probabilities"], {"input": x[:40].astype(np.float32)})[0]
    np.testing.assert_allclose(probs[:, 1], lgb.Booster(model_file=str(model)).predict(x[:40]), atol=1e-4)


def test_sklearn_in_memory_classifier_serves_in_the_onnxruntime_backend(iris, tmp_path):
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(*iris)
    converted = convert_sklearn(estimator, iris[0])
    assert converted.parity.rows == 150
    assert converted.parity.max_abs_diff <= 1e-4
    path = tmp_path / "model.onnx"
    path.write_bytes(converted.onnx)
    backend = OnnxRuntimeBackend(str(path))
    backend.load()
    assert backend.signature == converted.signature
    out = backend.infer({"input": iris[0][:5]})
    assert out["label"].tolist() == estimator.predict(iris[0][:5]).tolist()


def test_sklearn_regressor_from_a_function_named_module_colon_function(iris, tmp_path, monkeypatch):
    (tmp_path / "conv_factory_mod.py").write_text(
        "from sklearn.datasets import load_iris\nfrom sklearn.linear_model import Ridge\n"
        "def build():\n    x, y = load_iris(return_X_y=True)\n    return Ridge().fit(x, y)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "conv_factory_mod", raising=False)
    converted = convert_sklearn_factory("conv_factory_mod:build")
    assert converted.signature.outputs == (TensorSpec("predictions", "FP32", (-1, 1)),)
    assert converted.task == "regressor"
    assert converted.metadata()["tags"]["source_file"] == "conv_factory_mod:build"
    want = Ridge().fit(*iris).predict(iris[0][:3])
    got = ort.InferenceSession(converted.onnx).run(["predictions"], {"input": iris[0][:3]})[0]
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4)


def test_a_pickle_is_refused_and_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = tmp_path / "model.pkl"
    payload.write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(ConfigError, match=r"--from-xgboost '.*model\.pkl': a pickle \(\.pkl\) is never loaded"):
        convert_file("xgboost", str(payload))
    with pytest.raises(ConfigError, match=r"--from-sklearn 'model\.joblib': a pickle is never loaded"):
        convert_sklearn_factory("model.joblib")
    assert not marker.exists()


class _Touch:
    """Unpickling this creates ``marker``: proof that nothing was unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("name, content, fragment", [
    ("absent.json", None, r"'.*absent\.json': no such file"),
    ("notes.json", b'{"hello": 1}', r"is not an XGBoost model XGBoost can read"),
    ("model.bin", b"", r"expected a xgboost model file ending in \.json or \.ubj"),
])
def test_a_missing_or_wrong_xgboost_file_is_a_clear_error(tmp_path, name, content, fragment):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        convert_file("xgboost", str(tmp_path / name))


def test_a_sample_of_the_wrong_width_is_refused(xgb_iris, tmp_path):
    np.save(tmp_path / "rows.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ConfigError, match=r"rows\.npy': expected rows of 4 features .* got shape \[3, 5\]"):
        convert_file("xgboost", str(xgb_iris), sample=str(tmp_path / "rows.npy"))


def test_an_unsupported_objective_is_named(iris, tmp_path):
    path = tmp_path / "softmax.json"
    xgb.XGBClassifier(n_estimators=2, objective="multi:softmax").fit(*iris).save_model(path)
    with pytest.raises(ConfigError, match=r"objective 'multi:softmax' is not supported"):
        convert_file("xgboost", str(path))


def test_a_parity_failure_gives_the_difference_and_the_tolerance(iris, xgb_iris, tmp_path):
    other = tmp_path / "other.json"
    xgb.XGBClassifier(n_estimators=1, max_depth=1).fit(*iris).save_model(other)
    fw = get_framework("xgboost")
    session = ort.InferenceSession(convert_file("xgboost", str(xgb_iris)).onnx)
    with pytest.raises(PreconditionFailedError,
                       match=r"probabilities differ from xgboost's by up to 0\.\d+ \(max abs diff\) on 150 sample "
                             r"rows \(iris\); the tolerance is 0\.0001"):
        check_parity(fw, fw.load(str(other)), session, iris[0], "classifier", "iris", 1e-4)


def test_bad_sklearn_targets_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "conv_bad_mod.py").write_text("def boom():\n    raise RuntimeError('no data')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "conv_bad_mod", raising=False)
    with pytest.raises(ConfigError, match=r"--from-sklearn 'nocolon': expected module:function"):
        convert_sklearn_factory("nocolon")
    with pytest.raises(ConfigError, match=r"the function raised RuntimeError: no data"):
        convert_sklearn_factory("conv_bad_mod:boom")
    with pytest.raises(ConfigError, match=r"expected a fitted classifier with predict_proba or a regressor"):
        convert_sklearn(StandardScaler().fit(np.zeros((2, 3))))
    with pytest.raises(ConfigError, match=r"is not fitted"):
        convert_sklearn(Ridge())
    with pytest.raises(ConfigError, match=r"framework 'keras' unknown; allowed: sklearn, xgboost, lightgbm"):
        get_framework("keras")
