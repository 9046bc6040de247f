"""Model architectures that can be rebuilt from hyper-parameters.

Weights travel as safetensors (never pickles), so a PyTorch model is always an
architecture name + hyper-parameters + a weights file. Each builder returns the
module and its V2 signature. torch is imported only when a builder runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.signature import Signature, TensorSpec

Builder = Callable[..., tuple[Any, Signature]]


def mlp(in_features: int, hidden: list[int] | tuple[int, ...], out_features: int):
    """Multi-layer perceptron: Linear/ReLU stacks; input ``input`` FP32
    ``[-1, in_features]``, output ``logits`` FP32 ``[-1, out_features]``."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    sig = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, in_features)),),
        outputs=(TensorSpec("logits", "FP32", (-1, out_features)),),
    )
    return nn.Sequential(*layers), sig


def small_cnn(channels: int = 1, size: int = 8, classes: int = 10, width: int = 16):
    """Two conv blocks and a linear head; input ``input`` FP32
    ``[-1, channels, size, size]``, output ``logits`` FP32 ``[-1, classes]``."""
    import torch.nn as nn

    module = nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width * 2, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width * 2, classes),
    )
    sig = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, channels, size, size)),),
        outputs=(TensorSpec("logits", "FP32", (-1, classes)),),
    )
    return module, sig


def patch_cnn(channels: int = 3, size: int = 224, patch: int = 16, width: int = 8, classes: int = 10):
    """A cheap image model: one strided patch convolution, global pooling and a
    linear head; input ``input`` FP32 ``[-1, channels, size, size]``. Its
    compute is small next to moving an image-sized tensor, which makes it the
    model for wire-format benchmarks."""
    import torch.nn as nn

    module = nn.Sequential(
        nn.Conv2d(channels, width, patch, stride=patch),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )
    sig = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, channels, size, size)),),
        outputs=(TensorSpec("logits", "FP32", (-1, classes)),),
    )
    return module, sig


ARCHITECTURES: Mapping[str, Builder] = {"mlp": mlp, "small_cnn": small_cnn, "patch_cnn": patch_cnn}


def build(name: str, hparams: Mapping[str, Any]) -> tuple[Any, Signature]:
    """Build architecture ``name`` with ``hparams``; ConfigError if either is bad."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}"
        ) from None
    try:
        return builder(**hparams)
    except TypeError as exc:
        raise ConfigError(f"architecture {name!r}: bad hyper-parameters: {exc}") from None
