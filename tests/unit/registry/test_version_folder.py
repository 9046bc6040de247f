"""Registry.version_folder: every artifact of a version in one local folder,
verified on every call (what the python backend loads from a ``ref``)."""

from __future__ import annotations

import os

import pytest

from flywheel.protocol.errors import IntegrityError
from flywheel.registry import Registry


@pytest.fixture
def reg(tmp_path):
    r = Registry.open(f"sqlite:///{tmp_path}/r.db", str(tmp_path / "artifacts"), cache_dir=str(tmp_path / "cache"))
    r.register_version("m", {"model.py": b"class M: ...\n", "w.bin": b"\x01\x02"}, actor="t")
    yield r
    r.close()


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


def test_the_folder_holds_each_artifact_under_its_name(reg):
    mv, folder = reg.version_folder("m/1")
    assert mv.version == 1
    assert sorted(os.listdir(folder)) == ["model.py", "w.bin"]
    assert read(folder, "model.py") == b"class M: ...\n"
    assert reg.version_folder("m")[1] == folder  # same artifacts, same folder


def test_a_damaged_copy_is_rebuilt_and_a_damaged_blob_refused(reg):
    _, folder = reg.version_folder("m/1")
    with open(os.path.join(folder, "model.py"), "wb") as f:
        f.write(b"import os; os.system('oops')\n")
    assert read(reg.version_folder("m/1")[1], "model.py") == b"class M: ...\n"
    blob = reg.get_version("m", 1).artifacts["w.bin"].uri
    with open(blob, "wb") as f:
        f.write(b"\x00")
    os.remove(os.path.join(folder, "w.bin"))
    with pytest.raises(IntegrityError, match="integrity check"):
        reg.version_folder("m/1")
