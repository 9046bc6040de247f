"""``flywheel export``: a registered model -> bundle -> registered derivative,
against a real SQLite registry and artifact store."""

from __future__ import annotations

import json
import os

import pytest

from flywheel.registry import Registry
from flywheel.cli import main


@pytest.fixture(scope="module")
def registry_args(tmp_path_factory):
    from flywheel.training.digits import register_digits, train_digits

    root = tmp_path_factory.mktemp("export-cli")
    uri, artifacts = f"sqlite:///{root}/registry.db", str(root / "artifacts")
    result = train_digits(str(root / "work"), epochs=10, progress=None)
    reg = Registry.open(uri, artifacts)
    try:
        register_digits(reg, result, actor="tests", epochs=10)
    finally:
        reg.close()
    return root, ["--registry", uri, "--artifacts", artifacts, "--actor", "tests"]


def test_export_registers_a_derivative_with_lineage(registry_args, capsys):
    root, args = registry_args
    out = root / "bundle-int8"
    rc = main(["export", "digits/1", "--target", "ort-mobile", "--quantize", "int8", "--out", str(out), "--json",
               *args])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "registered digits.ort-mobile-int8/1 (derivative of digits/1)" in printed
    report = json.loads(printed.strip().splitlines()[-1])
    assert report["quantization"]["mode"] == "dynamic"
    assert report["parity"]["passed"]
    reg = Registry.open(args[1], args[3])
    try:
        (derived,) = reg.derivatives("digits", 1)
        assert derived.ref == "digits.ort-mobile-int8/1"
        assert derived.lineage.parent == "digits/1"
        assert derived.lineage.data_fingerprint == reg.get_version("digits", 1).lineage.data_fingerprint
        assert set(derived.artifacts) == {"metadata.json", "model.ort", "report.json", "required_operators.config"}
        meta = json.loads(reg.read_artifact(derived.ref, "metadata.json"))
        assert derived.artifacts["model.ort"].sha256 == meta["files"]["model.ort"]["sha256"]
        assert meta["source"]["ref"] == "digits/1"
        assert "scale" in meta["preprocessing"]
        assert meta["platform"] == "arm"
        assert derived.params["platform"] == "arm"
        assert derived.metrics["parity_top1_agreement"] >= 0.98
        assert derived.params["quantize"] == "int8"
    finally:
        reg.close()


def test_no_register_only_writes_the_bundle(registry_args, capsys):
    root, args = registry_args
    rc = main(["export", "digits", "--target", "onnx", "--out", str(root / "plain"), "--no-register", *args])
    assert rc == 0
    assert "registered" not in capsys.readouterr().out
    assert os.path.isfile(root / "plain" / "model.onnx")
    reg = Registry.open(args[1], args[3])
    try:
        assert "digits.onnx" not in {m.name for m in reg.list_models()}
    finally:
        reg.close()


def test_unknown_reference_is_a_clear_error(registry_args, capsys):
    root, args = registry_args
    rc = main(["export", "nosuch/3", "--target", "onnx", "--out", str(root / "x"), *args])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    assert not os.path.exists(root / "x")


def test_derivative_names_keep_targets_apart():
    from flywheel.cli.export import derivative_name

    names = {derivative_name("digits", t, q, p) for t in ("onnx", "ort-mobile", "executorch")
             for q in (None, "int8") for p in ("arm", "amd64") if p == "arm" or t == "ort-mobile"}
    assert len(names) == 8
    assert "digits.ort-mobile-int8" in names
    assert "digits.ort-mobile-int8-amd64" in names
