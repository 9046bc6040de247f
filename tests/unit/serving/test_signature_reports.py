"""Ingress replicas report the signatures of the models they loaded to the
router controller (a real ModelServer on ONNX Runtime, a real ControlState;
the report travels by a plain call instead of Ray): once to each controller,
which then judges variants by them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec

from flywheel.serving.config import ModelConfig, ServerConfig
from flywheel.serving.control_state import ControlState
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.model_server import ModelServer
from flywheel.serving.router import Route, Router
from flywheel.serving._private.endpoint_sync import EndpointSync

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from _signature_models import matmul_model  # noqa: E402

FP64_X = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 4]}],
          "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}


def _signatures(st: ControlState) -> dict:
    return msgspec.to_builtins(st.endpoints["m"].doc["signatures"])


def test_signatures_reach_each_controller(tmp_path):
    cfg = ModelConfig(name="m", version="1", path=matmul_model(tmp_path / "m.onnx", x_type="DOUBLE"))

    async def run() -> None:
        server = ModelServer(cfg, ServerConfig().request_limits())
        await server.start()
        try:
            router = Router([Route("m", "1", local=True)], ServingMetrics([("m", "1")]), {("m", "1"): server})
            controllers = [ControlState("d", "id1", [], [cfg])]
            sync = EndpointSync(router, "r1", lambda report: controllers[-1].sync(report),
                                lambda _: None, deploy_id="id1")
            await sync.first()  # before any probe: the loaded model's own metadata
            assert _signatures(controllers[0]) == {"1": FP64_X}
            await sync.refresh()
            # a controller that restarted (a new epoch, nothing kept) gets them again
            controllers.append(ControlState("d", "id1", [], [cfg]))
            assert _signatures(controllers[1]) == {}
            await sync.refresh()  # answered with the new epoch
            await sync.refresh()
            assert _signatures(controllers[1]) == {"1": FP64_X}
        finally:
            await server.close()

    asyncio.run(run())
