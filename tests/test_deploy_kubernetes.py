"""The Kubernetes manifests in deploy/kubernetes: valid, consistent with each other and with their policy."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from supervisor.config import ConfigError, Settings, parse
from tests.harness import REPO_ROOT, ctl_command

K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}
# The oldest release the manifests are written for (lifecycle.preStop.sleep is beta, on by default, since 1.30)
# and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", None)

# What the KEDA CRD (keda.sh_scaledobjects.yaml) requires, plus what the prometheus scaler needs in metadata.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                                   "apiVersion": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            # KEDA's trigger metadata is map[string]string: a bare YAML number is rejected.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": {
                            "required": ["serverAddress", "query", "threshold"],
                            "properties": {
                                "serverAddress": {"type": "string", "pattern": "^https?://"},
                                "query": {"type": "string", "minLength": 1},
                                "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                            },
                        }}},
                    },
                },
            },
        },
    },
}

# What the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) requires of the fields used here.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "properties": {
                "selector": {"type": "object", "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}


def load_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


@pytest.fixture(scope="module")
def docs() -> list[tuple[Path, dict]]:
    found = load_docs()
    assert found, f"no manifests in {K8S_DIR}"
    return found


def the(docs, kind: str) -> dict:
    found = [d for _, d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def the_file(docs, kind: str) -> Path:
    return next(p for p, d in docs if d.get("kind") == kind)


@pytest.fixture(scope="module")
def deployment(docs) -> dict:
    return the(docs, "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "gpu-supervisor"]
    assert len(found) == 1, "the Deployment needs one container named gpu-supervisor"
    return found[0]


@pytest.fixture(scope="module")
def policy_text(docs, deployment, container) -> str:
    """The policy file the container reads, taken from the ConfigMap mounted at the --config path."""
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        vol = volumes[mount["name"]]
        if "configMap" not in vol:
            continue
        key = mount.get("subPath") or str(config_path.relative_to(mount["mountPath"]))
        cm = [d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == vol["configMap"]["name"]]
        assert cm, f"ConfigMap {vol['configMap']['name']} (volume {vol['name']}) is not among the manifests"
        assert key in cm[0]["data"], f"ConfigMap {vol['configMap']['name']} has no key {key}"
        return cm[0]["data"][key]
    raise AssertionError(f"no ConfigMap volume is mounted where {config_path} is")


@pytest.fixture(scope="module")
def policy(policy_text) -> Settings:
    return parse(policy_text, "ConfigMap gpu-supervisor-policy")


def kubernetes_validate() -> str:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    if exe.exists():
        return str(exe)
    found = shutil.which("kubernetes-validate")
    assert found, "kubernetes-validate is not installed (pip install kubernetes-validate)"
    return found


def run_validate(files: list[Path], version: str | None) -> subprocess.CompletedProcess:
    cmd = [kubernetes_validate(), "--strict"]
    if version:
        cmd += ["-k", version]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def probe_seconds(spec: dict) -> float:
    return spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3)


def pre_stop_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    assert pre, "the container needs a preStop hook so endpoints update before SIGTERM"
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    m = re.search(r"sleep\s+(\d+(?:\.\d+)?)", " ".join(cmd))
    assert m, f"preStop exec does not sleep: {cmd}"
    return float(m.group(1))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- the API server's view


def core_files(docs) -> list[Path]:
    return sorted({p for p, d in docs if d["apiVersion"] in CORE_API_VERSIONS})


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_core_manifests_pass_kubernetes_validate_strict(docs, version):
    files = core_files(docs)
    kinds = {d["kind"] for p, d in docs if p in files}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    # a file may hold only core kinds: kubernetes-validate cannot check a CRD kind and would only warn
    mixed = [p.name for p in files if any(q == p and d["apiVersion"] not in CORE_API_VERSIONS for q, d in docs)]
    assert not mixed, f"keep custom resources in their own files: {mixed}"
    res = run_validate(files, version)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == sum(1 for p, _ in docs if p in files), res.stdout


def test_strict_validation_catches_an_unknown_field(tmp_path, deployment):
    # the same check must fail on a misspelt field, or the test above proves nothing
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = run_validate([path], None)
    assert res.returncode != 0
    assert "livenesProbe" in res.stdout + res.stderr


# --- custom resources against their CRDs' required fields


def test_scaled_object_has_what_keda_requires(docs):
    so = the(docs, "ScaledObject")
    jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    triggers = [t for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(triggers) == 1
    meta = triggers[0]["metadata"]
    assert "gpu_supervisor_queue_depth" in meta["query"]
    assert float(meta["threshold"]) > 0
    assert so["spec"]["minReplicaCount"] >= 1, "scale-to-zero leaves no daemon to report queue depth"
    assert so["spec"]["maxReplicaCount"] >= so["spec"]["minReplicaCount"]


@pytest.mark.parametrize("breakage", ["no target name", "number threshold", "no query", "no triggers"])
def test_scaled_object_schema_rejects_what_keda_rejects(docs, breakage):
    so = copy.deepcopy(the(docs, "ScaledObject"))
    trigger = so["spec"]["triggers"][0]
    if breakage == "no target name":
        del so["spec"]["scaleTargetRef"]["name"]
    elif breakage == "number threshold":
        trigger["metadata"]["threshold"] = 10
    elif breakage == "no query":
        del trigger["metadata"]["query"]
    else:
        del so["spec"]["triggers"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)


def test_service_monitor_has_what_the_operator_requires(docs, container):
    sm = the(docs, "ServiceMonitor")
    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    assert the_file(docs, "ServiceMonitor") != the_file(docs, "Deployment"), "the ServiceMonitor is optional"
    service = the(docs, "Service")
    assert selects(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    names = sm["spec"].get("namespaceSelector", {}).get("matchNames")
    if names:
        assert service["metadata"]["namespace"] in names
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names, f"ServiceMonitor port {ep['port']} is not a Service port {port_names}"
        assert ep.get("path", "/metrics") == "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        broken = copy.deepcopy(sm)
        del broken["spec"]["selector"]
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


# --- the policy in the ConfigMap


def test_configmap_policy_is_valid(policy_text, policy, tmp_path):
    assert policy.listen.host in ("0.0.0.0", "::"), "the kubelet probes the pod IP: listen on every interface"
    # the real CLI accepts it too
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text)
    res = subprocess.run([sys.executable, "-m", "supervisor", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_broken_policy_would_be_caught(policy_text):
    with pytest.raises(ConfigError, match="drain"):
        parse(policy_text.replace("drain: {timeout_s: 30}", "drain: {timeout_s: 30, timout: 1}"))


# --- the Deployment


def test_container_runs_the_daemon_with_the_mounted_policy(container, policy_text):
    assert container["args"] == ["gpu-supervisor", "run", "--config", "/etc/gpu-supervisor/policy.yaml"]
    # args, not command: the image's entrypoint (tini, PID 1: forwards signals, reaps orphans) stays
    assert "command" not in container
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/gpu-supervisor")
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates, so SIGHUP would reload nothing"


def test_probes_use_readyz_and_healthz_on_the_listen_port(container, policy):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert policy.listen.port in ports.values()

    def target(probe: dict) -> tuple[str, int]:
        get = probe["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert target(container["startupProbe"]) == ("/readyz", policy.listen.port)
    assert target(container["readinessProbe"]) == ("/readyz", policy.listen.port)
    assert target(container["livenessProbe"]) == ("/healthz", policy.listen.port)
    # the model load may take worker.startup_timeout_s before the liveness probe starts counting
    assert probe_seconds(container["startupProbe"]) >= policy.worker.startup_timeout_s


async def test_the_daemon_answers_the_probes_with_this_policy(supervisor_factory, policy_text, container):
    # the ConfigMap's policy as is, except the worker (no model here) and the address (a free local port)
    cfg = yaml.safe_load(policy_text)
    cfg["listen"] = {"host": "127.0.0.1", "port": 0}
    cfg["worker"]["command"] = ctl_command()
    cfg["worker"]["startup_timeout_s"] = 20
    sp = await supervisor_factory(cfg)
    assert sp.session is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        async with sp.session.get(container[probe]["httpGet"]["path"]) as r:
            assert r.status == 200, f"{probe} {container[probe]['httpGet']['path']}: {r.status}"
    async with sp.session.get("/metrics") as r:
        assert "gpu_supervisor_queue_depth" in await r.text(), "the KEDA trigger's metric is not exposed"


def test_grace_period_covers_prestop_drain_and_worker_stop(deployment, container, policy):
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = pre_stop_seconds(container)
    assert 0 < pre_stop < grace
    needed = pre_stop + policy.drain.timeout_s + policy.worker.stop_grace_s
    assert grace > needed, (f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + "
                            f"drain.timeout_s {policy.drain.timeout_s} + worker.stop_grace_s "
                            f"{policy.worker.stop_grace_s}")


def test_gpu_limit_and_reload_documented(deployment, container):
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    notes = {**deployment["metadata"].get("annotations", {}),
             **deployment["spec"]["template"]["metadata"].get("annotations", {})}
    reload_notes = [v for v in notes.values() if re.search(r"kill -HUP|SIGHUP", v)]
    assert reload_notes, "document that a changed ConfigMap is applied by SIGHUP"


def test_security_context_and_writable_dirs(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for m in container["volumeMounts"]:
        assert m["name"] in volumes, f"mount {m['mountPath']} names no volume"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    # the worker's socket directory is an emptyDir; the state dir (async jobs) is a volume too
    runtime = mounts[env["RUNTIME_DIRECTORY"]]
    assert "emptyDir" in volumes[runtime["name"]]
    state = mounts[env["STATE_DIRECTORY"]]
    assert not state.get("readOnly")
    assert {"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(volumes[state["name"]])
    assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


# --- labels and selectors tie the objects together


def test_labels_and_selectors_are_consistent(docs, deployment, container):
    namespaces = {d["metadata"].get("namespace") for _, d in docs}
    assert len(namespaces) == 1 and None not in namespaces, f"one namespace for all: {namespaces}"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = the(docs, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for p in service["spec"]["ports"]:
        tp = p.get("targetPort", p["port"])
        assert tp in container_ports or tp in container_ports.values(), f"Service targetPort {tp} is not exposed"

    pdb = the(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"].get("minAvailable", 1) == 0, \
        "minAvailable: 1 with one replica would block every node drain"

    target = the(docs, "ScaledObject")["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count; a fixed one fights it on apply"

    policy_cm = [d for _, d in docs if d["kind"] == "ConfigMap"]
    vol_cms = {v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert {d["metadata"]["name"] for d in policy_cm} == vol_cms
