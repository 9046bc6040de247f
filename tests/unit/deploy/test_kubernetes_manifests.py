"""deploy/kubernetes/ checked offline against what the cluster will check it
with: Kubernetes' own schemas (kubernetes-validate), the CRD schemas of
KubeRay and prometheus-operator (vendored in deploy/kubernetes/schemas/), Ray
Serve's ServeDeploySchema, and Flywheel's deploy config and job spec; plus the
facts that tie the files together (ports, labels, Secrets, replicas).

Not checked: the CRDs' CEL rules (``x-kubernetes-validations``), which need
an API server.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shlex
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import parse_config
from flywheel.cli.train import add_parser as add_train_parser
from flywheel.training.spec import parse_spec

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests are meant for.
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "ray.io_v1_rayservice.json",
    ("ray.io/v1", "RayJob"): "ray.io_v1_rayjob.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d is not None]


def _documents() -> list:
    return [
        pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for doc in load(path.name)
    ]


def _custom(param) -> bool:
    doc = param.values[0]
    return (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


# -- CRD schemas -------------------------------------------------------------


def _as_the_api_server_checks(node) -> None:
    """Add to an openAPIV3Schema, in place, what the API server enforces
    beyond plain JSON Schema: unknown fields are errors (kubectl's default
    strict field validation; pruning would drop them silently), ``nullable``
    admits null, and ``x-kubernetes-int-or-string`` admits both."""
    if isinstance(node, list):
        for item in node:
            _as_the_api_server_checks(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            for sub in value.values():
                _as_the_api_server_checks(sub)
        elif key not in ("enum", "default", "example"):  # values, not schemas
            _as_the_api_server_checks(value)


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    schema = json.loads((MANIFESTS / "schemas" / CRD_SCHEMAS[api_version, kind]).read_text())
    _as_the_api_server_checks(schema)
    return jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are draft-4 style


def validate_custom_resource(doc: dict) -> None:
    """Raise jsonschema.ValidationError where ``doc`` breaks its CRD's schema."""
    _crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)


# -- the Serve config in the RayService ----------------------------------------


class UnknownServeFieldError(Exception):
    """A key that ServeDeploySchema does not know (and would ignore)."""


def _nested_model(annotation) -> type[pydantic.BaseModel] | None:
    """The pydantic model a field holds, directly or in a List / Optional."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _unknown_fields(data, model: type[pydantic.BaseModel], path: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{path}.{key}")
            continue
        sub = _nested_model(field.annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                unknown += _unknown_fields(item, sub, f"{path}.{key}[{i}]")
        else:
            unknown += _unknown_fields(value, sub, f"{path}.{key}")
    return unknown


def validate_serve_config(text: str) -> ServeDeploySchema:
    """A serveConfigV2 string as Ray Serve reads it: pydantic.ValidationError
    for a bad value; UnknownServeFieldError for a key Ray would ignore (a typo
    such as ``proxy_locaton`` would silently leave Serve's proxy on port 8000)."""
    data = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(data)
    unknown = _unknown_fields(data, ServeDeploySchema, "$")
    if unknown:
        raise UnknownServeFieldError(f"unknown Serve config fields: {', '.join(unknown)}")
    return schema


def serve_config() -> dict:
    return yaml.safe_load(one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def flywheel_config() -> dict:
    (app,) = serve_config()["applications"]
    return app["args"]["config"]


# -- the pods ------------------------------------------------------------------


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def pod_templates(doc: dict) -> dict[str, dict]:
    spec = cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def ray_clusters() -> list[dict]:
    return [one("rayservice.yaml", "RayService"), one("rayjob-train.yaml", "RayJob")]


def ingress_group() -> dict:
    (group,) = cluster_spec(one("rayservice.yaml", "RayService"))["workerGroupSpecs"]
    return group


def ingress_container() -> dict:
    (container,) = ingress_group()["template"]["spec"]["containers"]
    return container


# -- every document against its schema ---------------------------------------


@pytest.mark.parametrize("doc", [p for p in _documents() if not _custom(p)])
def test_builtin_kinds_validate_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("doc", [p for p in _documents() if _custom(p)])
def test_custom_resources_validate_against_their_crd_schema(doc):
    validate_custom_resource(doc)


def test_serve_config_validates_with_ray_serve_schema():
    schema = validate_serve_config(one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    assert schema.proxy_location.value == "Disabled"


def test_serve_application_is_built_by_the_flywheel_builder():
    (app,) = serve_config()["applications"]
    assert app["import_path"] == "flywheel.serving.deploy:app"


def test_flywheel_config_parses_and_may_bind_beyond_loopback():
    config = parse_config(flywheel_config())
    config.server.check_exposure()  # raises for a non-loopback host without auth
    assert config.server.host == "0.0.0.0"


def test_training_spec_in_the_configmap_parses():
    spec = parse_spec(yaml.safe_load(one("rayjob-train.yaml", "ConfigMap")["data"]["train.yaml"]))
    assert spec.export.register


# -- the facts that tie the files together ----------------------------------


def test_ingress_container_ports_are_the_configs_ports():
    ports = {p["name"]: p["containerPort"] for p in ingress_container()["ports"]}
    server = flywheel_config()["server"]
    assert ports["http"] == server["port"]
    assert ports["grpc"] == server["grpc_port"]


def test_ingress_readiness_probe_uses_the_v2_ready_route_on_the_http_port():
    container = ingress_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}


def test_a_pod_without_an_ingress_replica_is_not_restarted_for_it():
    # KubeRay's default liveness probe (the raylet's health) stays: a liveness
    # probe on the ingress would restart, forever, a pod that Serve happened
    # to leave without an ingress replica
    container = ingress_container()
    assert "livenessProbe" not in container
    assert "startupProbe" not in container


def test_one_ingress_worker_pod_per_ingress_replica():
    group = ingress_group()
    assert group["replicas"] == flywheel_config()["server"]["replicas"]
    assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]


def test_head_runs_no_serve_replica():
    assert cluster_spec(one("rayservice.yaml", "RayService"))["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_service_selects_the_ingress_pods_and_not_the_head():
    selector = one("service.yaml", "Service")["spec"]["selector"].items()
    templates = pod_templates(one("rayservice.yaml", "RayService"))
    assert selector <= templates["ingress"]["metadata"]["labels"].items()
    assert not selector <= templates["head"]["metadata"]["labels"].items()


def test_service_ports_lead_to_the_ingress_container_ports():
    container_ports = {p["name"] for p in ingress_container()["ports"]}
    for port in one("service.yaml", "Service")["spec"]["ports"]:
        assert port["targetPort"] in container_ports, port["name"]


def test_service_monitor_scrapes_metrics_on_the_service_http_port():
    service = one("service.yaml", "Service")
    monitor = one("servicemonitor.yaml", "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_every_ray_container_has_cpu_and_memory_requests_and_limits():
    for doc in ray_clusters():
        for group, template in pod_templates(doc).items():
            for container in template["spec"]["containers"]:
                for bound in ("requests", "limits"):
                    assert set(container["resources"][bound]) >= {"cpu", "memory"}, (doc["kind"], group, bound)


def test_ray_auth_mode_is_set_on_every_container_and_matches_the_cluster():
    for doc in ray_clusters():
        mode = cluster_spec(doc)["authOptions"]["mode"]
        for group, template in pod_templates(doc).items():
            for container in template["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert env.get("RAY_AUTH_MODE") == mode, (doc["kind"], group)


def test_every_secret_key_referenced_is_in_the_example_secrets():
    example = {(s["metadata"]["name"], key) for s in load("secrets.example.yaml") for key in s["stringData"]}
    referenced = set()
    for doc in ray_clusters():
        for template in pod_templates(doc).values():
            for container in template["spec"]["containers"]:
                for env in container["env"]:
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add((ref["name"], ref["key"]))
    (endpoint,) = one("servicemonitor.yaml", "ServiceMonitor")["spec"]["endpoints"]
    credentials = endpoint["authorization"]["credentials"]
    referenced.add((credentials["name"], credentials["key"]))
    assert referenced <= example, sorted(referenced - example)


def test_training_entrypoint_reads_the_spec_mounted_on_the_head():
    job = one("rayjob-train.yaml", "RayJob")
    parser = argparse.ArgumentParser(prog="flywheel")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    program, *argv = shlex.split(job["spec"]["entrypoint"])
    args = parser.parse_args(argv)
    head = pod_templates(job)["head"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "train-spec"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "train-spec"]
    assert program == "flywheel"
    assert args.command == "train"
    assert Path(args.spec).parent == Path(mount["mountPath"])
    assert volume["configMap"]["name"] == one("rayjob-train.yaml", "ConfigMap")["metadata"]["name"]
    assert Path(args.spec).name in one("rayjob-train.yaml", "ConfigMap")["data"]


# -- each validator can fail -------------------------------------------------


def test_crd_validation_rejects_a_misspelled_field():
    doc = copy.deepcopy(one("rayservice.yaml", "RayService"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpec"] = doc["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match=r"'workerGroupSpec' was unexpected"):
        validate_custom_resource(doc)


def test_crd_validation_rejects_a_wrong_type():
    doc = copy.deepcopy(one("rayservice.yaml", "RayService"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match=r"'two' is not of type 'integer'"):
        validate_custom_resource(doc)


def test_crd_validation_rejects_a_misspelled_field_inside_a_pod_template():
    doc = copy.deepcopy(one("rayjob-train.yaml", "RayJob"))
    container = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(jsonschema.ValidationError, match=r"'volumeMount' was unexpected"):
        validate_custom_resource(doc)


def test_crd_validation_rejects_a_value_outside_an_enum():
    doc = copy.deepcopy(one("rayservice.yaml", "RayService"))
    doc["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match=r"'password' is not one of"):
        validate_custom_resource(doc)


def test_kubernetes_validation_rejects_a_port_that_is_not_a_number():
    doc = copy.deepcopy(one("service.yaml", "Service"))
    doc["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError, match=r"'http' is not of type 'integer'"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_an_unknown_field():
    doc = copy.deepcopy(one("service.yaml", "Service"))
    doc["spec"]["selectors"] = doc["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError, match=r"'selectors' was unexpected"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_serve_config_check_rejects_an_unknown_top_level_key():
    data = serve_config()
    data["proxy_locaton"] = data.pop("proxy_location")
    with pytest.raises(UnknownServeFieldError, match=r"\$\.proxy_locaton"):
        validate_serve_config(yaml.safe_dump(data))


def test_serve_config_check_rejects_an_unknown_application_key():
    data = serve_config()
    data["applications"][0]["route_prefx"] = data["applications"][0].pop("route_prefix")
    with pytest.raises(UnknownServeFieldError, match=r"\$\.applications\[0\]\.route_prefx"):
        validate_serve_config(yaml.safe_dump(data))


def test_serve_schema_rejects_a_bad_proxy_location():
    data = serve_config()
    data["proxy_location"] = "Nowhere"
    with pytest.raises(pydantic.ValidationError, match=r"proxy_location"):
        validate_serve_config(yaml.safe_dump(data))


def test_flywheel_config_rejects_an_unknown_server_field():
    config = flywheel_config()
    config["server"]["allow_plain_text"] = True
    with pytest.raises(ConfigError, match=r"allow_plain_text"):
        parse_config(config)


def test_flywheel_config_without_auth_may_not_bind_beyond_loopback():
    config = flywheel_config()
    del config["server"]["auth"]
    with pytest.raises(ConfigError, match=r"server\.auth is off"):
        parse_config(config).server.check_exposure()
