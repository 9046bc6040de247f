"""Interleaved A/B comparisons that survive a noisy host.

This machine's speed drifts by +-10 % over seconds (more on a shared host),
which is more than many of the differences the benchmarks compare. Two
systems measured one after the other can come out in either order; measured
in A B B A blocks, each A block has a B neighbour in time, and the median of
the neighbours' ratios over several rounds cancels the drift.

    blocks = run_blocks(3, lambda: measure(a), lambda: measure(b))
    pairs, excluded = neighbour_pairs(blocks)
    stats = RatioStats.of(paired_ratios(pairs, lambda r: r.throughput))

Pure logic: it measures nothing itself, starts nothing, reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from flywheel.protocol.errors import ConfigError

T = TypeVar("T")
A, B = "a", "b"
ROUND = (A, B, B, A)


def abba(rounds: int) -> list[str]:
    """The block order for ``rounds`` rounds: A B B A, repeated.
    ConfigError unless ``rounds`` >= 1."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"rounds: expected an integer >= 1, got {rounds!r}")
    return list(ROUND) * rounds


def abba_names(a: str, b: str, rounds: int) -> list[str]:
    """``abba(rounds)`` with the sides named: ``[a, b, b, a, a, b, b, a, ...]``."""
    return [a if side == A else b for side in abba(rounds)]


@dataclass(frozen=True)
class Block(Generic[T]):
    """One measured block: its place in time (``index``), its ``side``
    (``A`` or ``B``), and the measurement, or None with ``error`` when the
    block failed."""

    index: int
    side: str
    result: T | None
    error: str = ""

    @property
    def round(self) -> int:
        return self.index // len(ROUND)

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class Pair(Generic[T]):
    """Two neighbouring blocks, one of each side, of the same round."""

    round: int
    a: T
    b: T


def run_blocks(rounds: int, measure_a: Callable[[], T], measure_b: Callable[[], T]) -> list[Block[T]]:
    """Call ``measure_a`` and ``measure_b`` in A B B A order for ``rounds``
    rounds and return the blocks in time order. A measurement that raises
    is kept as a failed block (its ``error`` is the exception's repr), so
    one bad block costs its pair, not the comparison."""
    blocks: list[Block[T]] = []
    for index, side in enumerate(abba(rounds)):
        try:
            blocks.append(Block(index, side, (measure_a if side == A else measure_b)()))
        except Exception as exc:  # noqa: BLE001 - recorded on the block, reported with the pairs
            blocks.append(Block(index, side, None, repr(exc)))
    return blocks


def neighbour_pairs(blocks: Sequence[Block[T]]) -> tuple[list[Pair[T]], list[str]]:
    """Pair each block with its neighbour in time: blocks 0-1 and 2-3 of
    every round (A1 with B1, then B2 with A2). A pair that has a failed
    block is left out; the second value lists why, one line per pair left
    out. ValueError when the blocks are not in A B B A order."""
    ordered = sorted(blocks, key=lambda blk: blk.index)
    expected = abba(max(1, -(-len(ordered) // len(ROUND))))
    if [blk.index for blk in ordered] != list(range(len(ordered))) or any(
            blk.side != side for blk, side in zip(ordered, expected)):
        raise ValueError("blocks: expected consecutive indices in A B B A order")
    pairs: list[Pair[T]] = []
    excluded: list[str] = []
    for i in range(0, len(ordered) - 1, 2):
        x, y = ordered[i], ordered[i + 1]
        a, b = (x, y) if x.side == A else (y, x)
        failed = [blk for blk in (a, b) if not blk.ok]
        if failed:
            why = "; ".join(f"block {blk.index} ({blk.side.upper()}) failed: {blk.error}" for blk in failed)
            excluded.append(f"round {x.round + 1}, blocks {x.index}-{y.index} left out: {why}")
        else:
            pairs.append(Pair(x.round, a.result, b.result))
    if len(ordered) % 2:
        excluded.append(f"block {ordered[-1].index} has no neighbour: left out")
    return pairs, excluded


def paired_ratios(pairs: Sequence[Pair[T]], metric: Callable[[T], float], numerator: str = B) -> list[float]:
    """``metric(b) / metric(a)`` for every pair (``numerator=A``:
    ``metric(a) / metric(b)``), in time order; pairs whose denominator is
    zero are skipped."""
    if numerator not in (A, B):
        raise ConfigError(f"numerator: expected {A!r} or {B!r}, got {numerator!r}")
    out = []
    for pair in pairs:
        top, bottom = (pair.b, pair.a) if numerator == B else (pair.a, pair.b)
        den = metric(bottom)
        if den:
            out.append(metric(top) / den)
    return out


@dataclass(frozen=True)
class RatioStats:
    """The median of paired ratios and their range (``low``-``high``), over ``n`` pairs."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, ratios: Sequence[float]) -> RatioStats | None:
        """None when there are no ratios (every pair failed)."""
        if not ratios:
            return None
        return cls(float(np.median(ratios)), float(min(ratios)), float(max(ratios)), len(ratios))

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "pairs": self.n}


def side_median(pairs: Sequence[Pair[T]], side: str, metric: Callable[[T], float]) -> float:
    """The median of ``metric`` over one side's blocks in ``pairs`` (nan if none)."""
    values = [metric(p.a if side == A else p.b) for p in pairs]
    return float(np.median(values)) if values else float("nan")
