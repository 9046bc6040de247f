"""Run one claimed job on Ray Train, then register what it trained.

Steps: load the data (driver, once; or, for data larger than the driver,
build lazy Ray Data datasets that the workers stream: training/streamed.py)
-> wait for the workers' resources (a
placement group, bounded by ``resources.wait_s``: a job that cannot get its
CPUs fails with a message saying so instead of hanging, which is what a
trainer does when, say, a Serve replica holds a CPU it needs) ->
``TorchTrainer.fit`` with ``FailureConfig(max_failures)`` (a dead worker
restarts the group, which resumes from our last checkpoint) -> export the
final weights to ONNX, check it, and register it with its metrics, a
reference sample of training inputs and its lineage -> optionally add it to
a running server as a canary.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from flywheel.protocol.errors import FlywheelError, UnavailableError
from flywheel.training.loop import append_log, job_paths, train_loop

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    pass


def wait_for_resources(workers: int, cpus: float, gpus: float, wait_s: float, job_id: str,
                       should_stop: Callable[[], bool] = lambda: False, placement: str = "pack") -> None:
    """Return once ``workers`` bundles of (cpus, gpus) could be reserved
    together, placed as ``placement`` (resources.placement) says;
    UnavailableError naming what is free after ``wait_s``; JobCancelled
    when ``should_stop`` says so meanwhile."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from flywheel.training.spec import PLACEMENTS

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * workers, strategy=PLACEMENTS[placement])
    ready, deadline = False, time.monotonic() + wait_s
    try:
        while not ready and time.monotonic() < deadline:
            ready = pg.wait(timeout_seconds=min(1.0, max(0.01, deadline - time.monotonic())))
            if not ready and should_stop():
                raise JobCancelled(f"job {job_id} cancelled while waiting for its resources")
    finally:
        remove_placement_group(pg)
    if not ready:
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        spread = (f" on {workers} different nodes (resources.placement: strict_spread; {nodes} alive)"
                  if placement == "strict_spread" else "")
        raise UnavailableError(
            f"job {job_id}: cannot get {workers} worker(s) x {bundle}{spread} within {wait_s:.0f}s "
            f"(resources.wait_s); free now {free} of {total}: another job, or a Serve replica, "
            "holds them. Free them, lower resources.workers/cpus_per_worker, or raise wait_s"
        )


def run_job(record, *, registry_uri: str, artifacts_uri: str, dataset: Any = None,
            should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train ``record`` (a running JobRecord) to the end; returns the result
    dict stored with the job. Raises JobCancelled or the failure."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flywheel.training.data import load_data
    from flywheel.training.spec import PLACEMENTS, parse_spec
    from flywheel.training.torch_backend import NodeAddressTorchConfig

    spec = parse_spec(record.spec)
    job_dir = record.storage
    paths = job_paths(job_dir)
    os.makedirs(paths["output"], exist_ok=True)
    for marker in (paths["done"],):
        if os.path.exists(marker):
            os.remove(marker)
    _note(paths, f"attempt {record.attempts}: {spec.strategy} x {spec.resources.workers} worker(s), "
                 f"{spec.epochs} epoch(s), batch {spec.batch_size}, seed {spec.seed}")
    regression = spec.task == "regression"
    if spec.dataset.streamed:
        # never materialised here: Ray Data streams the rows to the workers
        from flywheel.training.streamed import open_streamed

        data = open_streamed(spec.dataset, seed=spec.seed, regression=regression)
    else:
        data = load_data(spec.dataset, seed=spec.seed, dataset=dataset, regression=regression)
    _note(paths, f"data: {data.description}, {data.n_train} train / {data.n_val} validation rows"
                 f"{' (streamed)' if data.streamed else ''}, fingerprint {data.fingerprint[:12]}")
    _same_data_and_code(paths, data.fingerprint, _user_code_digest(spec))
    # a spec that cannot train (user code that does not import, a factory
    # that returns no nn.Module, a model that does not take the rows) fails
    # here, before any worker starts, not in every worker retry
    check_model(spec, data)
    res = spec.resources
    wait_for_resources(res.workers, res.cpus_per_worker, res.gpus_per_worker, res.wait_s, record.id,
                       should_stop, res.placement)
    runtime_env = worker_runtime_env(spec, job_dir)
    loop_config = {"spec": record.spec, "job_dir": job_dir, "checkpoints": checkpoint_root(record)}
    streaming: dict = {}
    if data.streamed:
        from flywheel.training.streamed import ingest_config

        loop_config.update(streamed=True, row_shape=list(data.row_shape), train_rows=data.n_train)
        streaming = {"datasets": data.datasets, "dataset_config": ingest_config()}
    else:
        loop_config["data"] = ray.put((data.x_train, data.y_train, data.x_val, data.y_val))
    # Bound the trainer's own wait for its workers (Ray retries a worker
    # group that cannot start forever by default): a job whose CPUs were
    # taken between our reservation and the trainer's fails, not hangs.
    os.environ[_START_TIMEOUT_ENV] = str(max(30.0, res.wait_s))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        **streaming,
        # gloo between nodes at their Ray addresses, never a loopback one
        torch_config=NodeAddressTorchConfig(),
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})},
            placement_strategy=PLACEMENTS[res.placement],
        ),
        run_config=RunConfig(
            # unique per attempt: re-running a finished name returns the old result
            name=f"{record.name}-{record.id}-{uuid.uuid4().hex[:6]}",
            storage_path=run_root(record),
            failure_config=FailureConfig(max_failures=spec.max_failures, controller_failure_limit=1),
            worker_runtime_env=runtime_env,
        ),
    )
    outcome: dict = {}
    fitting = threading.Thread(target=lambda: outcome.setdefault("result", _fit(trainer)), daemon=True)
    fitting.start()
    while fitting.is_alive():
        fitting.join(1.0)
        if should_stop() and not os.path.exists(paths["cancel"]) and not os.path.exists(paths["done"]):
            with open(paths["cancel"], "w") as f:  # the loop stops at its next check
                f.write(f"{time.time()}\n")
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise result
    if result is not None and result.error is not None:
        raise result.error
    if not os.path.exists(paths["done"]):  # the loop stopped early: a cancel
        raise JobCancelled(f"job {record.id} cancelled")
    return _finish(record, spec, data, paths, registry_uri, artifacts_uri)


_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller


def checkpoint_root(record) -> str:
    """Where a job's checkpoints go: ``spec.storage`` (a local folder or an
    fsspec URI such as s3://...) or the job's own folder."""
    base = _uri_root(record)
    return f"{base}/checkpoints" if base else job_paths(record.storage)["checkpoints"]


# URI schemes Ray Train's storage (pyarrow.fs) reads itself
_PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "file")


def run_root(record) -> str:
    """Ray Train's ``storage_path``: beside the checkpoints on a URI storage
    pyarrow reads (for s3:// it takes the same AWS_* endpoint and keys as
    s3fs), else in the job's folder. Ray checks that every worker can reach
    it; we keep no state there that a resume needs, but on shared storage
    no node's disk holds a part of the run."""
    base = _uri_root(record)
    if base and base.split("://", 1)[0] in _PYARROW_SCHEMES:
        return f"{base}/ray"
    return os.path.join(record.storage, "ray")


def _uri_root(record) -> str:
    """The job's own prefix on a URI storage (``s3://b/p/<name>-<id>``), or
    "" when its storage is a local folder (which holds the job's folder)."""
    base = record.spec.get("storage") or ""
    return f"{base.rstrip('/')}/{record.name}-{record.id}" if "://" in base else ""


def worker_runtime_env(spec, job_dir: str) -> dict:
    """The Train workers' runtime environment: the job's ``code`` folder,
    packed into the job's folder (training/code_package.py), as their
    ``working_dir``: every node that runs a worker unpacks it and starts
    the worker in it, on its import path, so a job's own modules import on
    a cluster of several nodes too."""
    if not spec.code:
        return {}
    from flywheel.training.code_package import pack_code

    return {"working_dir": pack_code(spec.code, os.path.join(job_dir, "code"))}


def check_model(spec, data) -> None:
    """Build the model (a built-in, or the user's factory with the job's
    code importable) and run two training rows through it, its loss, its
    metrics and any train_step hook, in the driver: user code that does not
    import or keep its contract fails the job now, naming the field.
    ConfigError for user code, InvalidInputError for shapes and sizes."""
    import torch

    from flywheel.protocol.errors import InvalidInputError
    from flywheel.training.user_code import Objective, StepContext, build_job_model, shipped

    if spec.batch_size > data.n_train:
        raise InvalidInputError(f"batch_size {spec.batch_size} exceeds the {data.n_train} training rows")
    what = spec.model.label + (f" {spec.model.hparams}" if spec.model.architecture else f" {spec.model.kwargs}")
    with shipped(spec.code):
        model, shape = build_job_model(spec.model, data.x_train.shape[1])
        objective = Objective(spec)
        try:
            x = torch.from_numpy(data.x_train[:2]).reshape(-1, *shape)
            out = model(x)
        except Exception as exc:
            raise InvalidInputError(
                f"model {what} does not take the data's rows ({data.x_train.shape[1:]} per row"
                + (f", as model.input_shape {list(shape)}" if spec.model.factory else "") + f"): {exc}"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise InvalidInputError(f"model {what} returned a {type(out).__name__}; expected one output tensor")
        y = torch.from_numpy(data.y_train[:2])
        if not spec.loss:
            _check_outputs(spec, data, out, what)
        objective.loss_value(out, y)
        with torch.no_grad():
            objective.evaluate(out.detach(), y)
        if spec.dataset.transform:
            from flywheel.training.stream_rows import apply_transform
            from flywheel.training.user_code import resolve

            rows = data.x_train[:2].reshape(-1, *(data.row_shape or data.x_train.shape[1:]))
            apply_transform(resolve(spec.dataset.transform, "dataset.transform"), rows.copy())
        if objective.hook is not None:
            ctx = StepContext(rank=0, world_size=1, epoch=0, global_step=0, device=torch.device("cpu"),
                              loss_fn=objective.loss_fn)
            objective.step_loss(model, (x, y), ctx)


def _check_outputs(spec, data, out, what: str) -> None:
    """Outputs the task's built-in loss can compare with the labels."""
    from flywheel.protocol.errors import InvalidInputError

    if spec.task == "regression":
        if out.reshape(len(out), -1).shape[1] != 1:
            raise InvalidInputError(f"model {what} gives {tuple(out.shape[1:])} per row; task regression "
                                    "needs one value per row (or a loss of your own)")
        return
    classes = data.n_classes
    if out.shape[-1] < classes:
        raise InvalidInputError(f"model has {out.shape[-1]} outputs; the labels need {classes} classes")


def _same_data_and_code(paths: dict, fingerprint: str, user_code: str = "") -> None:
    """Pin the data (and code) a job started with: a resumed attempt on other
    data, or on an edited ``code`` folder (``user_code``: its digest, "" =
    none), would mix two datasets or two models under one lineage."""
    from flywheel.registry import code_version
    from flywheel.protocol.errors import PreconditionFailedError

    commit, dirty = code_version(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(paths["log"]), "lineage.json")
    if os.path.exists(path):
        with open(path) as f:
            first = json.load(f)
        if first["data_fingerprint"] != fingerprint:
            raise PreconditionFailedError(
                f"the data changed since this job started (fingerprint {first['data_fingerprint'][:12]} -> "
                f"{fingerprint[:12]}); submit a new job instead of resuming"
            )
        if first.get("user_code_sha256", "") != user_code:
            raise PreconditionFailedError(
                "the job's code folder (code:) changed since this job started; submit a new job instead of resuming"
            )
        return
    with open(path, "w") as f:
        json.dump({"data_fingerprint": fingerprint, "code_commit": commit, "code_dirty": dirty,
                   "user_code_sha256": user_code}, f)


def _user_code_digest(spec) -> str:
    if not spec.code or not os.path.isdir(spec.code):
        return ""  # a missing folder fails in check_model, naming code
    from flywheel.training.code_package import code_digest

    return code_digest(spec.code)


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as exc:  # handed to the waiting thread
        return exc


def _note(paths: dict, line: str) -> None:
    append_log(paths["log"], line)


def _finish(record, spec, data, paths, registry_uri: str, artifacts_uri: str) -> dict:
    """Export the last checkpoint's weights and register them."""
    from safetensors.torch import save_file

    from flywheel.registry import Lineage, Registry
    from flywheel.runtime.export import export_onnx
    from flywheel.training.checkpoint import CheckpointStore
    from flywheel.training.model_artifacts import factory_model_artifacts
    from flywheel.training.user_code import shipped

    state = CheckpointStore(checkpoint_root(record)).latest()
    if state is None:
        raise FlywheelError(f"job {record.id} finished without a checkpoint")
    with shipped(spec.code):
        model, sig = _final_model(spec, data)
    model.load_state_dict(state.model)
    out = paths["output"]
    weights = os.path.join(out, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.model.items()}, weights)
    reference = os.path.join(out, "reference.npy")
    np.save(reference, data.x_train[: spec.dataset.reference_rows])
    metrics_path = os.path.join(out, "metrics.json")
    final = state.metrics[-1] if state.metrics else {}
    with open(metrics_path, "w") as f:
        json.dump({"final": final, "history": state.metrics}, f, indent=1)
    result: dict = {"metrics": final, "weights": weights, "global_step": state.counters["global_step"]}
    artifacts = {"model.safetensors": weights, "reference.npy": reference}
    if spec.export.onnx and spec.model.factory:
        # a user model may use what ONNX cannot express: the weights are
        # registered all the same and the result says why there is no ONNX
        try:
            with shipped(spec.code):
                onnx_path = export_onnx(model.eval(), sig, os.path.join(out, "model.onnx"))
        except Exception as exc:  # noqa: BLE001 - any export failure of user code is reported the same way
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            result["onnx_error"] = f"model.factory {spec.model.factory!r} did not export to ONNX: {message}"
            _note(paths, result["onnx_error"])
        else:
            result["onnx"] = artifacts["model.onnx"] = onnx_path
            _note(paths, f"exported {onnx_path} (checked against torch)")
    elif spec.export.onnx:
        onnx_path = export_onnx(model.eval(), sig, os.path.join(out, "model.onnx"))
        result["onnx"] = artifacts["model.onnx"] = onnx_path
        _note(paths, f"exported {onnx_path} (checked against torch)")
    if not spec.export.register:
        return result
    params, tags = _params(spec), {}
    if spec.model.factory:
        # servable without ONNX: backend torch with torch.factory reads the
        # code and the manifest registered beside the weights
        packed = factory_model_artifacts(spec.model, sig, weights, code=spec.code,
                                         pack_dir=os.path.join(record.storage, "code"),
                                         onnx=result.get("onnx", ""), task=spec.task)
        artifacts.update(packed.artifacts)
        params = packed.params
        if "onnx_error" in result:
            tags["onnx_error"] = result["onnx_error"][:1000]
    name = spec.export.model_name or spec.name
    with open(os.path.join(os.path.dirname(paths["log"]), "lineage.json")) as f:
        started = json.load(f)  # the data and code of the job's first attempt
    reg = Registry.open(registry_uri, artifacts_uri)
    try:
        mv = reg.register_version(
            name,
            artifacts,
            actor=f"training-job:{record.id}",
            signature={"inputs": [tensor_info(t) for t in sig.inputs],
                       "outputs": [tensor_info(t) for t in sig.outputs]},
            metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and np.isfinite(v)},
            params=params,
            tags=tags,
            lineage=Lineage(
                data_fingerprint=started["data_fingerprint"], code_commit=started["code_commit"],
                code_dirty=started["code_dirty"], training_config=record.spec, job_id=record.id,
            ),
        )
    finally:
        reg.close()
    result["ref"] = mv.ref
    _note(paths, f"registered {mv.ref}")
    if spec.export.canary_url:
        # the version is registered whatever the server says: a canary that
        # cannot start is reported in the result, not a failed job (whose
        # resume would register the same weights again)
        try:
            result["canary"] = _start_canary(spec, mv)
            _note(paths, f"canary of {mv.ref} started on {spec.export.canary_url}")
        except Exception as exc:  # noqa: BLE001 - any failure of the hand-off is reported the same way
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            result["canary_error"] = message
            _note(paths, f"canary of {mv.ref} on {spec.export.canary_url} not started: {message}")
    return result


def _final_model(spec, data):
    """(module, V2 signature) to load the final weights into. A factory
    model's signature: input ``input`` FP32 ``[-1, *row shape]``; output
    ``logits`` (classification) or ``output`` with the shape of a forward
    pass on two training rows."""
    import torch

    from flywheel.runtime.signature import Signature, TensorSpec
    from flywheel.training.user_code import build_job_model

    if not spec.model.factory:
        from flywheel.runtime.architectures import build

        return build(spec.model.architecture, spec.model.hparams)
    model, shape = build_job_model(spec.model, data.x_train.shape[1])
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(data.x_train[:2]).reshape(-1, *shape))
    name = "logits" if spec.task == "classification" else "output"
    return model, Signature(inputs=(TensorSpec("input", "FP32", (-1, *shape)),),
                            outputs=(TensorSpec(name, "FP32", (-1, *out.shape[1:])),))


def _params(spec) -> dict:
    """The registry version's params: how the weights are rebuilt."""
    m = spec.model
    if m.factory:
        return {"factory": m.factory, "kwargs": dict(m.kwargs), "task": spec.task}
    return {"architecture": m.architecture, **m.hparams}


def tensor_info(t) -> dict:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def _start_canary(spec, mv) -> dict:
    """Add the new version to a running server's endpoint and ramp it up as
    a canary (the router's gates decide; see serving/_private/control_canary.py)."""
    from flywheel.client import Client
    from flywheel.common.settings import load_settings

    # a server with auth on wants a key of role operate (FLYWHEEL_API_KEY)
    with Client(spec.export.canary_url, api_key=load_settings().api_key or None) as client:
        client.add_variant(mv.name, {"version": str(mv.version), "ref": mv.ref})
        deadline = time.monotonic() + 120
        while client.endpoint(mv.name)["variants"].get(str(mv.version), {}).get("status") != "ready":
            if time.monotonic() > deadline:
                raise UnavailableError(f"{mv.ref} did not become ready on {spec.export.canary_url}")
            time.sleep(0.5)
        return client.start_canary(mv.name, {"variant": str(mv.version), **spec.export.canary})["canary"]
