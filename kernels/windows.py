"""Bounded-memory windows over a stream of rows (tumbling or sliding)."""

from __future__ import annotations

import numpy as np

from flywheel.protocol.errors import ConfigError


class WindowBuffer:
    """A ring buffer of ``size`` rows. ``add(rows)`` returns the windows that
    became due: tumbling windows every ``size`` rows, sliding windows (the
    last ``size`` rows) every ``stride`` rows once full. Memory: ``size`` rows."""

    def __init__(self, size: int, features: int, *, mode: str = "tumbling", stride: int | None = None) -> None:
        if size < 2:
            raise ConfigError("window size must be >= 2")
        if mode not in ("tumbling", "sliding"):
            raise ConfigError(f"window mode {mode!r} must be 'tumbling' or 'sliding'")
        self.size, self.mode = size, mode
        self.stride = size if mode == "tumbling" else (stride or max(1, size // 4))
        if not 1 <= self.stride <= size:
            raise ConfigError("window stride must lie in [1, size]")
        self._buf = np.empty((size, features))
        self._filled = 0  # rows ever written, capped logic below
        self._pos = 0
        self._since = 0

    def add(self, rows: np.ndarray) -> list[np.ndarray]:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self._buf.shape[1])
        due = []
        for row in rows:  # rows arrive in small sampled batches
            self._buf[self._pos] = row
            self._pos = (self._pos + 1) % self.size
            self._filled = min(self._filled + 1, self.size)
            self._since += 1
            if self._filled == self.size and self._since >= self.stride:
                due.append(np.roll(self._buf, -self._pos, axis=0).copy())  # oldest first
                self._since = 0
                if self.mode == "tumbling":
                    self._filled = 0
        return due
