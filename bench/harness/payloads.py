"""Request payloads for the load generators, built once before a run.

Each payload variant is the same tensors encoded three ways (V2 JSON, V2
binary tensor extension, gRPC ModelInferRequest), so that a protocol mix
compares like with like. Inputs and expected outputs come from the scenario,
or from the model's V2 metadata when the scenario leaves them out.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import msgspec
import numpy as np

from flywheel.bench.harness.scenario import InputSpec, OutputSpec, Scenario
from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import ConfigError, UnavailableError


class Bodies(msgspec.Struct, frozen=True):
    json: bytes
    binary: bytes
    binary_header_length: int
    grpc: bytes


class WorkPlan(msgspec.Struct, frozen=True):
    """What a load-generator process needs: where to send what, and what
    every answer must contain."""

    http: str
    grpc: str
    infer_path: str
    grpc_method: str
    weights: dict[str, float]
    timeout_s: float
    variants: list[Bodies]
    outputs: list[OutputSpec]
    batch: int
    authorization: str = ""  # "Bearer <key>" for servers with auth on


def model_path(model: str, version: str) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def fetch_metadata(http: str, model: str, version: str = "", timeout_s: float = 10.0,
                   authorization: str = "") -> dict:
    """The model's V2 metadata over HTTP; UnavailableError if unreachable."""
    url = http.rstrip("/") + model_path(model, version)
    headers = {"Authorization": authorization} if authorization else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise UnavailableError(f"{url}: HTTP {exc.code}: {exc.read()[:200].decode('replace')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UnavailableError(f"cannot reach {url}: {exc}") from None


def _concrete(shape: list[int], batch: int) -> list[int]:
    return [(batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(shape)]


def resolve_specs(sc: Scenario, metadata: dict | None) -> tuple[list[InputSpec], list[OutputSpec]]:
    """The scenario's inputs/outputs, or those of the metadata with variable
    dimensions made concrete (the first one is the batch)."""
    inputs, outputs = list(sc.payload.inputs), list(sc.payload.outputs)
    if not inputs or not outputs:
        if metadata is None:
            raise ConfigError("payload.inputs/outputs are empty and the model metadata is unavailable")
        if not inputs:
            inputs = [
                InputSpec(name=t["name"], datatype=t["datatype"], shape=_concrete(t["shape"], sc.payload.batch))
                for t in metadata.get("inputs", [])
            ]
        if not outputs:
            outputs = [
                OutputSpec(name=t["name"], shape=[sc.payload.batch if i == 0 and d < 0 else d
                                                  for i, d in enumerate(t["shape"])])
                for t in metadata.get("outputs", [])
            ]
    if not inputs:
        raise ConfigError(f"model {sc.model!r} declares no inputs; give payload.inputs")
    return inputs, outputs


def generate(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(spec.datatype)
    shape = tuple(spec.shape)
    if spec.generator == "zeros":
        return np.zeros(shape, dtype)
    if spec.generator == "ones":
        return np.ones(shape, dtype)
    if spec.generator == "file":
        try:
            rows = np.load(spec.file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"payload input {spec.name!r}: cannot read {spec.file}: {exc}") from None
        pick = rows[rng.integers(0, len(rows), size=shape[0])]
        if pick.size != int(np.prod(shape)):
            raise ConfigError(
                f"payload input {spec.name!r}: rows of {spec.file} have shape {rows.shape[1:]}, "
                f"which does not fit {list(shape)}"
            )
        return pick.reshape(shape).astype(dtype)
    if spec.generator == "normal":
        x = rng.normal(spec.low, spec.high, size=shape)
    else:
        x = rng.uniform(spec.low, spec.high, size=shape)
    if dtype.kind == "b":
        return x > (spec.low + spec.high) / 2
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.floor(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def encode(model: str, version: str, tensors: dict[str, np.ndarray], datatypes: dict[str, str],
           outputs: list[OutputSpec]) -> Bodies:
    from flywheel.protocol.proto import inference_pb2 as pb

    json_body = msgspec.json.encode({
        "inputs": [
            {"name": n, "shape": list(x.shape), "datatype": datatypes[n], "data": x.ravel().tolist()}
            for n, x in tensors.items()
        ]
    })
    raws = {n: np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes() for n, x in tensors.items()}
    header = msgspec.json.encode({
        "inputs": [
            {"name": n, "shape": list(x.shape), "datatype": datatypes[n],
             "parameters": {"binary_data_size": len(raws[n])}}
            for n, x in tensors.items()
        ],
        "outputs": [{"name": o.name, "parameters": {"binary_data": True}} for o in outputs],
    })
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for n, x in tensors.items():
        req.inputs.add(name=n, datatype=datatypes[n], shape=list(x.shape))
        req.raw_input_contents.append(raws[n])
    return Bodies(json=json_body, binary=header + b"".join(raws.values()),
                  binary_header_length=len(header), grpc=req.SerializeToString())


def build_plan(sc: Scenario, *, target_http: str | None = None, target_grpc: str | None = None) -> WorkPlan:
    """Everything the load generators need, with payloads pre-encoded."""
    http = (target_http or sc.target.http).rstrip("/")
    grpc_target = sc.target.grpc if target_grpc is None else target_grpc
    from flywheel.common.settings import load_settings

    api_key = load_settings().api_key
    authorization = f"Bearer {api_key}" if api_key else ""
    needs_meta = not sc.payload.inputs or not sc.payload.outputs
    metadata = fetch_metadata(http, sc.model, sc.version, sc.timeout_s, authorization) if needs_meta else None
    inputs, outputs = resolve_specs(sc, metadata)
    rng = np.random.default_rng(sc.payload.seed)
    datatypes = {i.name: i.datatype for i in inputs}
    variants = [
        encode(sc.model, sc.version, {i.name: generate(i, rng) for i in inputs}, datatypes, outputs)
        for _ in range(sc.payload.variants)
    ]
    weights = sc.mix.weights()
    if weights["grpc"] > 0 and not grpc_target:
        raise ConfigError("mix.grpc > 0 but the target has no gRPC address")
    return WorkPlan(
        http=http,
        grpc=grpc_target,
        infer_path=model_path(sc.model, sc.version) + "/infer",
        grpc_method="/inference.GRPCInferenceService/ModelInfer",
        weights={k: v for k, v in weights.items() if v > 0},
        timeout_s=sc.timeout_s,
        variants=variants,
        outputs=outputs,
        batch=sc.payload.batch,
        authorization=authorization,
    )
