"""Model backends: one module per runtime, found by name through a registry.

- ``base``: the :class:`Backend` interface and the pickle refusal all share;
- ``registry``: :class:`BackendSpec` and :func:`get_backend` (built-in names,
  then the ``flywheel.backends`` entry point group for plug-ins);
- ``onnx_backend`` (``onnxruntime``), ``torch_backend`` (``torch``),
  ``tensorrt_backend`` with ``tensorrt_plan`` (``tensorrt``),
  ``python_backend`` (``python``: a user's class): the built-ins;
- ``user_code``: importing a user class named by a config, and checking
  what it returns (the python backend's and the steps');
- ``steps`` (``preprocess:`` / ``postprocess:`` around a model) and
  ``pipeline`` (``pipeline:``, models chained): composite backends that
  show the outer signature.

Importing this package imports no backend runtime (onnxruntime, torch,
TensorRT, CuPy); each is imported when a model of its kind loads.
"""

from flywheel.runtime.backends.base import Backend, refuse_pickle
from flywheel.runtime.backends.registry import (
    ENTRY_POINT_GROUP,
    BackendSpec,
    ConfigField,
    available_backends,
    get_backend,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendSpec",
    "ConfigField",
    "available_backends",
    "get_backend",
    "refuse_pickle",
]
