"""What the soak will do and when, drawn from its seed before it starts.

Pure: the same seed, duration and rate give the same faults at the same
times and the same sequence of requests, so that a run that found something
can be run again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

KILLS = ("kill dedicated replica", "kill router controller", "kill drift monitor", "kill gRPC front")
OPERATIONS = ("canary", "swap", "key churn")
FAULTS = KILLS + OPERATIONS

# share of requests per transport, per model, and carried by the churned key
TRANSPORTS = {"http_json": 0.4, "http_binary": 0.3, "grpc": 0.3}
MODELS = {"colo": 0.4, "ded": 0.3, "ep": 0.3}
CHURN_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class Planned:
    at: float  # seconds since the soak started
    kind: str


def fault_plan(duration_s: float, warmup_s: float, seed: int, kinds: tuple[str, ...] = FAULTS) -> list[Planned]:
    """One of each ``kinds`` at seeded random times, in time order.

    The faults fall between the warm-up's end (+5 s) and 75 % of the run
    (the rest is left to recover and be measured), one in each equal slot of
    that span at a random point inside it, so two never land together;
    a canary always comes before the swap (a swap is refused while a canary
    runs, and the canary needs the endpoint's two first versions).
    Raises ValueError when the span leaves under 8 s per fault.
    """
    lo, hi = warmup_s + 5.0, 0.75 * duration_s
    slot = (hi - lo) / max(1, len(kinds))
    if slot < 8.0:
        raise ValueError(f"a {duration_s:.0f} s run with {warmup_s:.0f} s of warm-up leaves {slot:.1f} s per fault "
                         f"(at least 8 s needed for {len(kinds)} faults): run longer")
    rng = np.random.default_rng(seed)
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    if "canary" in order and "swap" in order:
        c, s = order.index("canary"), order.index("swap")
        if s < c:
            order[c], order[s] = order[s], order[c]
    # the inner 80 % of a slot: at least 20 % of a slot between two faults
    return [Planned(round(lo + slot * (i + 0.1 + 0.8 * rng.random()), 2), kind) for i, kind in enumerate(order)]


@dataclass(frozen=True, slots=True)
class Send:
    index: int
    at: float  # when it is due, seconds since the load started
    transport: str
    model: str
    churn: bool  # carries the churned key instead of the load's own


def request_plan(rate: float, seed: int) -> Iterator[Send]:
    """The open-loop schedule: request i is due at i / rate whatever came
    before it; transport, model and key drawn from the seed."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, not {rate!r}")
    rng = np.random.default_rng(seed + 1)
    transports, tw = list(TRANSPORTS), list(TRANSPORTS.values())
    models, mw = list(MODELS), list(MODELS.values())
    i = 0
    while True:
        block = 1024  # draw in blocks: one rng call per request would cost more than the request's own work
        ts = rng.choice(len(transports), size=block, p=tw)
        ms = rng.choice(len(models), size=block, p=mw)
        churn = rng.random(block) < CHURN_SHARE
        for t, m, c in zip(ts, ms, churn):
            yield Send(i, i / rate, transports[t], models[m], bool(c))
            i += 1
