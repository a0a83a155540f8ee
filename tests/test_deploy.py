"""What is under ``deploy/`` and the Dockerfiles, validated (no container runtime or cluster runs
here, so nothing of it is applied or built):

- every Kubernetes manifest against the Kubernetes JSON schemas (``kubernetes-validate``, strict:
  no unknown fields) of a current version, every file listed by a kustomization and every listed
  file present;
- the Deployments' probes, resources, security settings, writable paths and grace period;
- the settings in the ConfigMap and ``compose.yaml`` against ``config.Settings``;
- every ``adaface_*`` metric the alert rules, the adapter rules and the Grafana dashboard use
  against what ``/metrics`` exports on a real gunicorn server;
- the Dockerfiles against the rules we keep (hadolint is not packaged for this Debian): a pinned
  base without ``latest``, a non-root ``USER`` before ``CMD``, a ``HEALTHCHECK`` on ``/readyz``,
  apt without recommends and with its lists removed, pip without a cache.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

import config
from conftest import REPO, photo
from test_server import request, start

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.34.0"
DEPLOYMENTS = (KUBERNETES / "cpu" / "deployment.yaml", KUBERNETES / "gpu" / "deployment.yaml")
#: the largest peak RSS measured for one worker (hostile 51 Mpx strips, README "Limits"), bytes
PEAK_RSS = 2_140 * 10 ** 6
SETTINGS = {f"ADAFACE_{f.upper()}" for f in config.Settings.__dataclass_fields__}


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def _quantity(value: str) -> float:
    """A Kubernetes quantity (``1536Mi``, ``2Gi``, ``2``, ``500m``) as a number (bytes, cores)."""
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_manifest_is_valid_against_the_kubernetes_schema(path):
    from kubernetes_validate.utils import validate
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        validate(doc, KUBERNETES_VERSION, strict=True)        # raises on any schema violation


def test_kustomizations_list_every_manifest_and_only_existing_ones():
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text())["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_file():
                listed.add(target)
            else:
                assert (target / "kustomization.yaml").exists(), f"{kustomization}: {entry} is no kustomization"
    assert set(p.resolve() for p in _manifests()) == listed


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.parent.name)
def test_deployment_probes_resources_and_security(path):
    [deployment] = _docs(path)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert _quantity(resources["limits"]["memory"]) >= PEAK_RSS
    assert _quantity(resources["requests"]["cpu"]) >= 2                  # what the figures were measured on
    startup, ready, live = (container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["path"] == "/livez"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # model load, ONNX export, warm-up
    settings = _docs(KUBERNETES / "base" / "configmap.yaml")[0]["data"]
    body_timeout = float(settings.get("ADAFACE_BODY_TIMEOUT", config.Settings().body_timeout))
    assert pod["terminationGracePeriodSeconds"] > body_timeout + 30          # gunicorn's graceful timeout
    # every path the service writes is on a writable volume
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    writable = [env["TMPDIR"], env["NUMBA_CACHE_DIR"], env["XDG_CACHE_HOME"], env["HOME"],
                settings["ADAFACE_CACHE_DIR"], "/app/data"]
    for path_ in writable:
        mount = next((m for p, m in mounts.items() if path_ == p or path_.startswith(p + "/")), None)
        assert mount is not None and not mount.get("readOnly"), path_
        assert "emptyDir" in volumes[mount["name"]], path_
    assert mounts["/weights"]["readOnly"] and settings["ADAFACE_WEIGHTS"].startswith("/weights/")
    assert settings["ADAFACE_API_KEYS_FILE"].startswith("/keys/") and mounts["/keys"]["readOnly"]
    image = container["image"].split()[0]
    assert ":" in image and not image.endswith(":latest")
    if path.parent.name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1" and env["ADAFACE_DEVICE"] == "cuda"


def test_configmap_and_compose_name_only_real_settings_with_valid_values():
    data = _docs(KUBERNETES / "base" / "configmap.yaml")[0]["data"]
    assert set(data) <= SETTINGS, set(data) - SETTINGS
    config.Settings.from_env(data)                                      # raises SettingsError on a bad value
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    env = {k: v for k, v in services["adaface"]["environment"].items() if k.startswith("ADAFACE_")}
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    config.Settings.from_env(env)
    assert env["ADAFACE_GALLERY_URL"].startswith("postgresql://") and "@postgres:" in env["ADAFACE_GALLERY_URL"]
    assert services["adaface"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["adaface"]["healthcheck"]["test"])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["adaface"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["adaface"]["build"]["context"] / "Dockerfile").exists()
    for service in services.values():
        assert not service["image"].endswith(":latest") and ":" in service["image"]
    for volume in [v for s in services.values() for v in s.get("volumes", [])]:
        name = volume.split(":")[0]
        assert name.startswith("..") or name in compose["volumes"], volume
    statefulset = _docs(KUBERNETES / "postgres" / "statefulset.yaml")[0]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == services["postgres"]["image"]


def _metric_names(text: str) -> set:
    return set(re.findall(r"\badaface_[a-z_]+", text))


@pytest.mark.server
def test_alerts_adapter_rules_and_dashboard_use_metrics_the_server_exports(tmp_path):
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    dashboard = json.loads((DEPLOY / "grafana" / "adaface.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p["targets"]]
    assert targets and all(t["expr"] for t in targets)
    used = _metric_names(" ".join(r["expr"] for r in rules) + " " + " ".join(t["expr"] for t in targets)
                         + (DEPLOY / "prometheus" / "adapter-rules.yaml").read_text()
                         + (KUBERNETES / "base" / "hpa.yaml").read_text())
    server = start(tmp_path, "synthetic", ADAFACE_ARCH="ir_18", ADAFACE_DEVICE="cpu").wait_ready()
    try:
        assert request(server.port, "POST", "/byte_represent_json", photo("img1_aligned.jpg"))[0] == 200
        request(server.port, "POST", "/v1/embed", b"not an image")
        status, _, body = request(server.port, "GET", "/metrics")
    finally:
        server.stop()
    assert status == 200
    exported = _metric_names(body.decode())
    missing = {name for name in used if name not in exported}
    assert not missing, f"not exported by /metrics: {sorted(missing)}"
    # the queue depth the autoscaler reads, and the series the panels need, carry data
    assert 'adaface_errors_total{code="not_an_image"' in body.decode() or \
        'adaface_errors_total{code="bad_image"' in body.decode()
    assert {"adaface_queue_depth", "adaface_request_seconds_bucket", "adaface_batch_size_sum",
            "adaface_forward_seconds_bucket", "adaface_requests_total"} <= exported


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_rules(name):
    text = (REPO / name).read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.startswith("#")]
    froms = [l.split()[1] for l in lines if l.startswith("FROM ")]
    assert froms, "no FROM"
    for base in froms:
        assert re.fullmatch(r"[a-z0-9./-]+:[0-9][\w.-]*", base) and "latest" not in base, base
    users = [i for i, l in enumerate(lines) if l.startswith("USER ")]
    cmd = max(i for i, l in enumerate(lines) if l.startswith("CMD "))
    assert users and users[-1] < cmd and lines[users[-1]].split()[1] not in ("0", "root")
    assert any(l.startswith("HEALTHCHECK ") and "/readyz" in l for l in lines)
    for line in (l for l in lines if "apt-get install" in l):
        assert "--no-install-recommends" in line and "rm -rf /var/lib/apt/lists" in line
    assert "PIP_NO_CACHE_DIR=1" in text
    assert re.search(r"EXPOSE 30035\b", text)
    if name == "Dockerfile.cuda":
        assert "ADAFACE_DEVICE=cuda" in text and "whl/cu" in text
