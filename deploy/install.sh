#!/bin/sh
# Install Flywheel from its wheel into one Python environment: the steps the
# images run (deploy/Dockerfile, deploy/Dockerfile.cuda), and what `make test`
# runs in a fresh venv (tests/integration/test_packaging.py), so the images'
# install is exercised even where no container engine exists.
#
#   deploy/install.sh WHEEL LOCK [EXTRAS]       e.g. dist/flywheel_ml-0.1.0-py3-none-any.whl requirements.lock train
#
# PYTHON names the interpreter (default python3). With the train extra and
# TORCH_INDEX_URL set (e.g. PyTorch's CPU index), torch comes from there first:
# the public index's torch is the CUDA build. With the gpu extra,
# onnxruntime-gpu takes the place of onnxruntime: both install the module
# onnxruntime, so the CPU package is removed and the GPU one put back whole.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 WHEEL LOCK [EXTRAS]" >&2; exit 2; }
wheel=$1
lock=$2
extras=${3:-}
python=${PYTHON:-python3}
[ -f "$wheel" ] || { echo "install.sh: no wheel at $wheel (make wheel builds it)" >&2; exit 2; }
spec=$wheel
[ -n "$extras" ] && spec="$wheel[$extras]"
case ",$extras," in
  *,train,*|*,edge,*)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      torch=$(grep '^torch==' "$lock") || { echo "install.sh: no torch pin in $lock" >&2; exit 2; }
      # torch alone from there; its dependencies come next, at the lock's versions
      "$python" -m pip install --quiet --no-deps --index-url "$TORCH_INDEX_URL" "$torch"
    fi
    ;;
esac
"$python" -m pip install --quiet -c "$lock" "$spec"
case ",$extras," in
  *,gpu,*)
    gpu=$("$python" -c 'from importlib.metadata import version; print(version("onnxruntime-gpu"))')
    "$python" -m pip uninstall --quiet --yes onnxruntime
    "$python" -m pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu==$gpu"
    ;;
esac
# the command is there and says which Flywheel it is
"$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/flywheel" --version
