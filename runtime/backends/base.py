"""The Backend interface every model runtime implements."""

from __future__ import annotations

import abc

import numpy as np

from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import IntegrityError
from flywheel.runtime.signature import Signature


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive: a pickle inside


def refuse_pickle(path: str) -> None:
    """Refuse a model artifact in a format that runs code when loaded.

    Pickles (and torch.save archives, which hold one) can execute anything
    on load; ``weights_only`` unpicklers have had bypasses. Flywheel loads
    ONNX and safetensors only, and checks the bytes, not the file name.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in _PICKLE_MAGIC or head == _ZIP_MAGIC:
        raise IntegrityError(
            f"{path} is a pickle-based file (pickle / torch.save), which can run code when loaded; "
            "refused. Export the model to ONNX, or its weights to safetensors."
        )


class Backend(abc.ABC):
    """A loaded model that maps named input arrays to named output arrays.

    Life cycle: construct (cheap, validates arguments) -> ``load()`` -> any
    number of ``infer`` calls -> drop. ``infer`` may be called from one thread
    at a time per batch slot; implementations must be safe for that (ONNX
    Runtime sessions and torch modules under inference_mode are).
    """

    platform: str = ""
    # set by load(); a backend may instead override ``signature``
    _signature: Signature | None = None
    # False: every request is its own model call, rows as sent (a user model
    # that must see requests apart); the batcher then merges none
    merges_requests: bool = True
    # False: never run on the request loop's thread, whatever warm-up timing
    # says (a model that waits on an event loop of its own)
    may_run_inline: bool = True

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and build the session (and set ``_signature``).
        Raises on a bad artifact."""

    @property
    def signature(self) -> Signature:
        """Inputs and outputs with V2 datatypes; -1 marks a variable
        dimension. RuntimeError before ``load()``."""
        if self._signature is None:
            raise RuntimeError("call load() first")
        return self._signature

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on validated inputs; returns every output by name."""

    def close(self) -> None:
        """Release what ``load()`` took beyond memory (threads, user
        resources). Called once, when the model stops serving; the default
        has nothing to release."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the model once per batch size on zeros, so that the first real
        request does not pay for lazy initialisation (allocations, kernels)."""
        for n in batch_sizes:
            self.infer(self.example_inputs(n))

    def example_inputs(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Zero-filled inputs that match the signature, ``rows`` in each
        variable dimension (BYTES inputs get empty strings)."""
        out = {}
        for spec in self.signature.inputs:
            shape = tuple(rows if d == -1 else d for d in spec.shape)
            dtype = numpy_dtype(spec.datatype)
            if dtype.kind == "O":
                arr = np.empty(shape, dtype=object)
                arr.fill(b"")
            else:
                arr = np.zeros(shape, dtype=dtype)
            out[spec.name] = arr
        return out
