"""DatasetSpec's streamed kinds (npy, images) and fields (stream,
labels_path, image_size, image_mode, transform): what is accepted, and
errors that name the field."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.training.spec import DatasetSpec, parse_spec, spec_to_dict

MINIMAL = {"name": "streamed", "model": {"architecture": "mlp"}}


def _dataset(**fields) -> DatasetSpec:
    return parse_spec({**MINIMAL, "dataset": fields}).dataset


def test_streamed_kinds_parse_and_say_they_stream():
    npy = _dataset(kind="npy", path="/d/x", labels_path="/d/y", transform="aug.ops:flip")
    images = _dataset(kind="images", path="/d/img", image_size=[32, 24], image_mode="grayscale")
    table = _dataset(kind="parquet", path="/d/t", stream=True)
    assert (npy.streamed, images.streamed, table.streamed) == (True, True, True)
    assert images.image_size == (32, 24)
    assert _dataset(kind="csv", path="x.csv").streamed is False
    assert DatasetSpec().streamed is False


def test_streamed_fields_survive_a_round_trip():
    spec = parse_spec({**MINIMAL, "dataset": {"kind": "images", "path": "/d", "image_size": [8, 8],
                                              "transform": "aug.ops:flip"}})
    assert parse_spec(spec_to_dict(spec)) == spec


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "npy", "path": "/d/x"}, "dataset.labels_path is required for kind 'npy'"),
    ({"kind": "npy", "labels_path": "/d/y"}, "dataset.path is required for kind 'npy'"),
    ({"kind": "csv", "path": "x.csv", "labels_path": "/d/y"}, "dataset.labels_path is only for kind npy"),
    ({"kind": "images", "path": "/d"}, r"dataset.image_size must be \[height, width\]"),
    ({"kind": "images", "path": "/d", "image_size": [8]}, r"dataset.image_size must be \[height, width\]"),
    ({"kind": "images", "path": "/d", "image_size": [8, 0]}, "each >= 1"),
    ({"kind": "images", "path": "/d", "image_size": [8, 8], "image_mode": "cmyk"},
     "dataset.image_mode 'cmyk' must be one of rgb, grayscale"),
    ({"kind": "images", "image_size": [8, 8]}, "dataset.path is required for kind 'images'"),
    ({"kind": "parquet", "path": "x", "image_size": [8, 8]}, "dataset.image_size and image_mode are only for kind images"),
    ({"stream": True}, "dataset.stream is for kinds parquet, csv and ray"),
    ({"kind": "parquet", "path": "x", "transform": "aug.ops:flip"}, "dataset.transform is for streamed data"),
    ({"kind": "npy", "path": "x", "labels_path": "y", "transform": "not a path"},
     "dataset.transform 'not a path' must be an import path"),
    ({"kind": "captured", "path": "/c", "endpoint": "e", "mix": {"kind": "npy", "path": "x", "labels_path": "y"}},
     "dataset.mix.kind 'npy'"),
])
def test_bad_streamed_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec({**MINIMAL, "dataset": fields})
