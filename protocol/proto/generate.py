"""Generate the Python stubs for inference.proto (development tool).

    python -m flywheel.protocol.proto.generate [OUT_DIR]

Needs grpcio-tools (a test dependency, pinned in requirements.lock). The
stubs are committed; tests/unit/protocol/test_proto.py regenerates them into
a temporary folder and fails if they differ from the committed ones.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = ("flywheel", "protocol", "proto")
OUTPUTS = ("inference_pb2.py", "inference_pb2_grpc.py")

# tritonclient registers its own copy of the `inference` package in
# protobuf's default descriptor pool; two files defining the same symbols there
# cannot be imported into one process ("duplicate symbol"). Our messages live
# in a private pool instead. Only the RPC path (/inference.GRPCInferenceService/
# ModelInfer) and the field numbers are on the wire, so nothing changes there.
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into ``out_dir``; returns their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        # protoc derives the stubs' import path from the proto's path under
        # its include root: lay the proto out as flywheel/protocol/proto/.
        pkg_dir = Path(tmp, *PACKAGE)
        pkg_dir.mkdir(parents=True)
        shutil.copy(HERE / "inference.proto", pkg_dir / "inference.proto")
        rel = "/".join(PACKAGE) + "/inference.proto"
        code = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", rel])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            text = (pkg_dir / name).read_text()
            if name == "inference_pb2.py":
                if _DEFAULT_POOL not in text:
                    raise RuntimeError("protoc output changed shape: cannot move it to a private pool")
                text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
        return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in generate(out):
        print(f"wrote {path}")
