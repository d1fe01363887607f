"""deploy/k8s/ is valid, offline, against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail) and KEDA's CRDs (vendored in deploy/k8s/schemas/), a broken manifest fails, and the
manifests agree with the worker: probes on its metrics port, a kill timeout above its shutdown grace,
torch threads equal to the CPU limit, KEDA counting the jobs queue the worker consumes."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from consumer.settings import ENV_PREFIX, FLAGS, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# the oldest Kubernetes minor still common on managed clusters, and the newest kubernetes-validate has
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
}
# the RabbitMQ scaler's trigger metadata (KEDA v2.20.2 pkg/scalers/rabbitmq_scaler.go, order=triggerMetadata
# or resolvedEnv); the CRD types `metadata` as a free map, so a misspelt key would be ignored silently
RABBITMQ_TRIGGER_KEYS = frozenset({
    "queueName", "mode", "queueLength", "value", "activationValue", "host", "hostFromEnv", "protocol",
    "vhostName", "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
    "usernameFromEnv", "passwordFromEnv"})


# ---- loading and validating -------------------------------------------------------------------

def manifests() -> list[dict[str, Any]]:
    """Every document of every file the kustomization lists, in order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def api_server_view(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as plain JSON Schema: int-or-string accepts both, and an object with
    declared properties rejects unknown fields (the API server would prune them silently)."""
    if isinstance(schema, list):
        return [api_server_view(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: api_server_view(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(file: str) -> jsonschema.Draft7Validator:
    schema = api_server_view(json.loads((K8S / "schemas" / file).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any], k8s_version: str) -> None:
    """Raise jsonschema.ValidationError (kubernetes_validate's is one) if `doc` is not valid."""
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        crd_validator(crd).validate(doc)
    else:
        kubernetes_validate.validate(doc, k8s_version, strict=True)


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def secret_keys(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["metadata"]["name"], key) for d in docs if d["kind"] == "Secret"
            for key in {**d.get("data", {}), **d.get("stringData", {})}}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def settings(docs) -> WorkerSettings:
    """The worker's settings as the pod gets them: the ConfigMap plus the container's LORAQ_* env."""
    env = dict(the(docs, "ConfigMap")["data"])
    secrets = {(d["metadata"]["name"], k): v for d in docs if d["kind"] == "Secret"
               for k, v in d["stringData"].items()}
    for var in container(docs).get("env", []):
        if var["name"].startswith(ENV_PREFIX):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    known = {flag.env for flag in FLAGS}
    assert set(env) <= known, f"unknown to consumer.settings: {sorted(set(env) - known)}"
    return WorkerSettings.from_args([], env=env)  # every value parses


# ---- schemas ----------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest(docs):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kustomization["namespace"] == the(docs, "Namespace")["metadata"]["name"]
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Secret", "Deployment",
                                        "PodDisruptionBudget", "TriggerAuthentication", "ScaledObject"}


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_manifests_are_valid(docs, k8s_version):
    for doc in docs:
        validate(doc, k8s_version)


def replicas_as_text(docs):
    the(docs, "Deployment")["spec"]["replicas"] = "two"


def misspelt_probe(docs):
    c = container(docs)
    c["livenessProbes"] = c.pop("livenessProbe")


def pdb_budget_as_list(docs):
    the(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] = [1]


def scaledobject_unknown_field(docs):
    the(docs, "ScaledObject")["spec"]["maxReplicas"] = 100


def scaledobject_without_triggers(docs):
    del the(docs, "ScaledObject")["spec"]["triggers"]


def scaledobject_count_as_text(docs):
    the(docs, "ScaledObject")["spec"]["maxReplicaCount"] = "100"


def secret_ref_without_key(docs):
    del the(docs, "TriggerAuthentication")["spec"]["secretTargetRef"][0]["key"]


@pytest.mark.parametrize("breakage", [
    replicas_as_text, misspelt_probe, pdb_budget_as_list, scaledobject_unknown_field,
    scaledobject_without_triggers, scaledobject_count_as_text, secret_ref_without_key])
def test_a_broken_manifest_fails(docs, breakage: Callable[[list[dict[str, Any]]], None]):
    broken = copy.deepcopy(docs)
    breakage(broken)
    changed = [b for d, b in zip(docs, broken, strict=True) if d != b]
    assert len(changed) == 1
    with pytest.raises(jsonschema.ValidationError):
        validate(changed[0], K8S_VERSIONS[-1])


# ---- agreement with the worker ----------------------------------------------------------------

def test_probes_are_separate_endpoints_on_the_metrics_port(docs, settings):
    c = container(docs)
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == settings.metrics_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_kill_timeout_exceeds_the_shutdown_grace(docs, settings):
    grace = the(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_grace_s + 10  # the kubelet SIGKILLs only after the worker's own grace


def test_torch_threads_follow_the_cpu_limit(docs, settings):
    c = container(docs)
    (omp,) = [v for v in c["env"] if v["name"] == "OMP_NUM_THREADS"]
    assert omp["valueFrom"]["resourceFieldRef"] == {"containerName": c["name"], "resource": "limits.cpu",
                                                    "divisor": "1"}
    resources = c["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: the CPU limit is the share
    assert settings.engine.device.startswith("cuda") and resources["limits"]["nvidia.com/gpu"] == 1


def test_references_resolve(docs):
    deployment = the(docs, "Deployment")
    c = container(docs)
    keys = secret_keys(docs)
    for var in c["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert (ref["name"], ref["key"]) in keys
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert {s["configMapRef"]["name"] for s in c["envFrom"]} <= config_maps
    for ref in the(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]:
        assert (ref["name"], ref["key"]) in keys
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert the(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} == volumes


def test_keda_scales_the_deployment_on_the_jobs_queues(docs, settings):
    deployment = the(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the count; apply must not reset it
    spec = the(docs, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    assert set(meta) <= RABBITMQ_TRIGGER_KEYS, sorted(set(meta) - RABBITMQ_TRIGGER_KEYS)
    assert (meta["protocol"], meta["mode"], meta["useRegex"], meta["operation"]) == (
        "http", "QueueLength", "true", "sum")  # ready + unacked, summed over the matching queues
    assert int(meta["value"]) == settings.max_batch
    topology = settings.topology
    pattern = re.compile(meta["queueName"])
    assert pattern.search(topology.queue) and pattern.search(topology.worker_queue("w1-abc"))
    for other in (topology.dead_queue, topology.queue + ".x", "x" + topology.queue):
        assert not pattern.search(other)
    auth = the(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["host"]
