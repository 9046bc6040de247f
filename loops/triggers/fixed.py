"""Signals from fixed data: for tests, dry runs and replaying a history.

Set the attributes between checks to move the world along; ``list_files``
reads real files through :func:`files.list_files` unless ``files`` is set.
"""

from __future__ import annotations

from flywheel.loops.triggers.base import DriftWindow, FileInfo, Quality
from flywheel.loops.triggers.files import list_files as _list_files

NO_FEEDBACK = Quality(rewards=0, mean_reward=None, labelled=0, accuracy=None)


class FixedSignals:
    """Implements ``Signals`` by returning its attributes; records the
    arguments of each call in ``calls`` so a test can see what was asked."""

    def __init__(
        self,
        windows: list[DriftWindow] | None = None,
        quality: Quality = NO_FEEDBACK,
        files: list[FileInfo] | None = None,
    ) -> None:
        self.windows = list(windows or [])
        self.feedback = quality
        self.files = files
        self.calls: list[tuple] = []

    def drift_windows(self, endpoint: str) -> list[DriftWindow]:
        self.calls.append(("drift_windows", endpoint))
        return list(self.windows)

    def quality(self, endpoint: str, window_s: float) -> Quality:
        self.calls.append(("quality", endpoint, window_s))
        return self.feedback

    def list_files(self, pattern: str) -> list[FileInfo]:
        self.calls.append(("list_files", pattern))
        return list(self.files) if self.files is not None else _list_files(pattern)
