"""Labelled live traffic for the digits demo, as an application would send it.

One thread sends single-image requests without pause and, for each answer,
feedback with the image's label and a reward (1 when the answer was right).
Three switches change the world mid-run: ``inverted`` (the live inputs move:
the images are inverted, which the first model never saw), ``permuted`` (the
labels that arrive are wrong: a consistent relabelling, so a model trained on
them learns wrong answers while rewards still judge the truth) and
``labelled`` (off: rewards only, so nothing new becomes training data).
Every request that fails is kept; answers are counted per second and per
version, for the loop demo's plot and the end-to-end test's checks.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np


class LabelledTraffic:
    """``url``: the server's HTTP base; ``key``: an API key with the predict
    role (None when auth is off); ``pause_s``: the gap between requests."""

    def __init__(self, url: str, key: str | None = None, *, model: str = "digits", pause_s: float = 0.005,
                 seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.x, self.y = (d.data / 16.0).astype(np.float32), d.target
        self.url, self.key, self.model, self.pause_s, self.seed = url, key, model, pause_s, seed
        self.inverted = False
        self.permuted = False
        self.labelled = True  # False: rewards only, no labels (nothing new to train on)
        self.requests = 0
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}
        self.per_second: dict[int, dict[str, int]] = {}  # whole seconds since start -> version -> answers
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labelled-traffic", daemon=True)

    def start(self) -> LabelledTraffic:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _feedback(self, rid: str, label: int, reward: float) -> None:
        body = {"id": rid, "reward": reward, **({"label": label} if self.labelled else {})}
        req = urllib.request.Request(
            f"{self.url}/v2/models/{self.model}/feedback", method="POST",
            data=json.dumps(body).encode(),
            headers={**self._headers(), "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except (urllib.error.URLError, OSError):
            pass  # feedback is best effort; requests are what must not fail

    def _run(self) -> None:
        from flywheel.client import Client, ClientError

        rng = np.random.default_rng(self.seed)
        with Client(self.url, api_key=self.key, timeout=30) as c:
            while not self._stop.is_set():
                i = int(rng.integers(len(self.y)))
                x = 1.0 - self.x[i] if self.inverted else self.x[i]
                try:
                    r = c.infer(self.model, x[None, :])
                except ClientError as exc:
                    self.failures.append(f"{exc.status}: {exc.message}")
                    continue
                self.requests += 1
                version = r.model_version or "?"
                self.versions[version] = self.versions.get(version, 0) + 1
                second = self.per_second.setdefault(int(time.monotonic() - self.started), {})
                second[version] = second.get(version, 0) + 1
                truth = int(self.y[i])
                label = (truth + 3) % 10 if self.permuted else truth
                self._feedback(r.request_id, label, float(int(np.argmax(r.output())) == truth))
                if self.pause_s:
                    time.sleep(self.pause_s)
