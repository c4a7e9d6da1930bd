"""The Kubernetes manifests (deploy/k8s), offline: the production overlay renders
(tools/kustomize.py, the same as `kubectl kustomize` where kubectl is installed),
every object is valid against the Kubernetes schemas (kubernetes-validate, strict),
and the manifests say what docs/production.md promises: a Deployment per server
ready by the gRPC health service, grace periods longer than the servers' own,
disruption budgets, Postgres reachable only from the platform's pods, TLS and HSM
Secrets, and the image the Containerfile builds. The readiness probe itself runs
against a real server."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from services.kernel.config import SERVICES, Settings
from services.ops import probe
from services.ops.harness import PROBE_PRINCIPAL
from tests.support.servers import Servers
from tools import kustomize
from workers.runtime.loop import STOP_GRACE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "production"
K8S_VERSION = "1.30.0"
IMAGE = "registry.example.org/mptc/stopcovid:0.1.0"

Object = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> list[Object]:
    return kustomize.render(OVERLAY)


def find(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def pod(deployment: Object) -> Object:
    spec: Object = deployment["spec"]["template"]["spec"]
    return spec


def selects(selector: Object, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_every_object_is_valid_kubernetes(rendered: list[Object]) -> None:
    assert len(rendered) > 20
    for obj in rendered:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The validation can fail: a misspelt field or a wrong type is refused.
    broken = find(rendered, "Deployment", "stopcovid-checkin") | {}
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["spec"]["replicas"] = "four"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken["spec"]["replicas"] = 4
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_offline_rendering_is_what_kubectl_kustomize_renders(rendered: list[Object]) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAY)], check=True, capture_output=True, timeout=120
    ).stdout
    theirs = [doc for doc in yaml.safe_load_all(out) if doc]

    def key(obj: Object) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(theirs, key=key)


def test_each_server_is_a_deployment_ready_by_grpc_health_and_stopped_gracefully(
    rendered: list[Object],
) -> None:
    config = find(rendered, "ConfigMap", "stopcovid-config")["data"]
    grace = float(config.get("STOPCOVID_GRACE_SECONDS", Settings.grace_seconds))
    for name in SERVICES:
        deployment = find(rendered, "Deployment", f"stopcovid-{name}")
        spec = pod(deployment)
        # SIGTERM starts the graceful stop (health NOT_SERVING, then grace for
        # in-flight calls); SIGKILL must come well after it.
        assert spec["terminationGracePeriodSeconds"] >= grace + 10
        (container,) = spec["containers"]
        assert container["image"] == IMAGE
        assert container["args"] == [f"services.{name}"]
        assert importlib.util.find_spec(f"services.{name}.__main__") is not None
        port = container["ports"][0]["containerPort"]
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "services.ops.probe"]
        args = dict(zip(command[3::2], command[4::2], strict=True))
        assert int(args["--port"]) == port
        spec_of = importlib.import_module(f"services.{name}.server").SPEC
        assert args["--service"] == spec_of.descriptor.full_name
        env = {e["name"]: e for e in container.get("env", [])}
        assert env[f"STOPCOVID_{name.upper()}_PORT"]["value"] == str(port)
        assert env[f"STOPCOVID_DB_PASSWORD_STOPCOVID_{name.upper()}"]["valueFrom"]
        mounted = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        # The devices CA's key is on the Venue servers and nowhere else (docs/pki.md).
        devices_ca = {"devices-ca": "stopcovid-devices-ca"} if name == "venue" else {}
        assert mounted == {"tls": "stopcovid-tls", "hsm": "stopcovid-hsm"} | devices_ca
        budget = find(rendered, "PodDisruptionBudget", f"stopcovid-{name}")
        assert budget["spec"]["minAvailable"] >= 1
        assert selects(
            budget["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
        )
    worker = find(rendered, "Deployment", "stopcovid-worker")
    assert pod(worker)["containers"][0]["args"] == ["workers"]
    venue_mounts = {
        m["name"]: m["mountPath"]
        for m in pod(find(rendered, "Deployment", "stopcovid-venue"))["containers"][0][
            "volumeMounts"
        ]
    }
    assert venue_mounts["devices-ca"] == f"{config['STOPCOVID_STATE_DIR']}/pki"
    assert pod(worker)["terminationGracePeriodSeconds"] > STOP_GRACE_SECONDS
    assert find(rendered, "PodDisruptionBudget", "stopcovid-worker")
    assert find(rendered, "Deployment", "stopcovid-checkin")["spec"]["replicas"] == 4


def test_only_the_platforms_pods_reach_postgres(rendered: list[Object]) -> None:
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    deny = find(rendered, "NetworkPolicy", "stopcovid-default-deny")["spec"]
    assert deny["podSelector"] == {} and "ingress" not in deny
    postgres_labels = {"app.kubernetes.io/name": "postgres"}
    allowed: list[Object] = []
    for policy in policies:
        if (
            not selects(policy["spec"]["podSelector"], postgres_labels)
            or not policy["spec"]["podSelector"]
        ):
            continue
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], "a rule with no `from` would admit everyone"
            allowed += [peer["podSelector"] for peer in rule["from"]]
    workloads = [o for o in rendered if o["kind"] in {"Deployment", "Job"}]
    assert len(workloads) == 6
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(selects(peer, labels) for peer in allowed), workload["metadata"]["name"]
    # A pod of anything else (a debugging pod, another team's service) is not admitted.
    assert not any(selects(peer, {"app.kubernetes.io/component": "debug"}) for peer in allowed)


def test_the_secrets_and_the_image_are_the_ones_named(rendered: list[Object]) -> None:
    tls = find(rendered, "Secret", "stopcovid-tls")["stringData"]
    config = find(rendered, "ConfigMap", "stopcovid-config")["data"]
    for setting in ("STOPCOVID_TLS_CA", "STOPCOVID_TLS_CERT", "STOPCOVID_TLS_KEY"):
        assert Path(config[setting]).name in tls
    assert (
        Path(config["STOPCOVID_PKCS11_PIN_FILE"]).name
        in find(rendered, "Secret", "stopcovid-hsm")["stringData"]
    )
    assert config["STOPCOVID_KEYSTORE"] == "pkcs11"
    recipe = (ROOT / "deploy" / "Containerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m"]' in recipe
    assert "uv sync --frozen --no-dev" in recipe


def test_the_readiness_probe_says_whether_a_server_serves(servers: Servers) -> None:
    pki = servers.pki.dir
    credentials = {
        "--ca": str(pki / "ca.pem"),
        "--cert": str(pki / f"{PROBE_PRINCIPAL}.pem"),
        "--key": str(pki / f"{PROBE_PRINCIPAL}.key"),
    }
    args = [item for pair in credentials.items() for item in pair]
    port = servers.target("checkin").rsplit(":", 1)[1]
    service = "stopcovid.checkin.v1.CheckInService"
    assert probe.main(["--port", port, "--service", service, *args]) == 0
    assert probe.main(["--port", port, "--service", "stopcovid.nothing.v1.X", *args]) == 1
    assert (
        probe.main(
            [
                "--port",
                port,
                "--service",
                service,
                "--timeout",
                "5",
                *args[:4],
                "--key",
                str(pki / "missing.key"),
            ]
        )
        == 1
    )
