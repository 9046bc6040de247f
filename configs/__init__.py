"""The YAML presets and the example model that ship with Flywheel.

``flywheel run`` and ``flywheel serve --config NAME`` find a preset here by
name, so they work from any folder, not only from a checkout.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["preset", "presets"]


def presets() -> list[str]:
    """The names of the packaged presets (``demo``, ``example``, ...)."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.yaml"))


def preset(name: str) -> Path | None:
    """The file of the packaged preset ``name`` (with or without ``.yaml``),
    or None when there is none by that name."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" in stem or stem not in presets():
        return None
    return Path(__file__).parent / f"{stem}.yaml"
