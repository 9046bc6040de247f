"""The router controller's state while its database is away: a decision is
kept in memory and announced to the replicas only once it is saved."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import UnavailableError
from flywheel.registry import RouterStateStore
from flywheel.serving.config import ModelConfig
from flywheel.serving.control_state import ControlState

T0 = 1_000_000.0
SPLIT = {"kind": "fixed", "weights": {"1": 0.25, "2": 0.75}}


class FlakyStore:
    """A RouterStateStore whose saves fail while ``down``."""

    def __init__(self, store: RouterStateStore) -> None:
        self._store = store
        self.down = False

    def load(self, deployment):
        return self._store.load(deployment)

    def delete(self, deployment, endpoint=None):
        self._store.delete(deployment, endpoint)

    def save(self, deployment, endpoint, state):
        if self.down:
            raise UnavailableError("registry database postgresql://h/db is unreachable: refused")
        self._store.save(deployment, endpoint, state)


@pytest.fixture
def store(tmp_path):
    s = RouterStateStore.open(f"sqlite:///{tmp_path}/registry.db")
    yield FlakyStore(s)
    s.close()


def test_a_decision_that_cannot_be_saved_is_announced_by_the_tick_that_saves_it(store):
    models = [ModelConfig(name="m", version=v, path=f"/models/{v}.onnx") for v in ("1", "2")]
    st = ControlState("d", "id1", [], models, store, now=T0)
    before = st.version
    store.down = True
    with pytest.raises(UnavailableError):
        st.set_policy("m", SPLIT, now=T0 + 1)
    with pytest.raises(UnavailableError):  # still away: the controller's ticker logs it and ticks on
        st.tick(now=T0 + 2)
    assert st.version == before
    store.down = False
    st.tick(now=T0 + 3)
    assert st.version == before + 1
    assert store.load("d")["m"]["policy"]["weights"] == SPLIT["weights"]
    st.tick(now=T0 + 4)
    assert st.version == before + 1  # announced once
