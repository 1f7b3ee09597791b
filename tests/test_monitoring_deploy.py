"""What deploy/ ships: alert rules (promtool), dashboard queries, compose and k8s manifests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_harness import (
    DASHBOARD,
    REPO,
    RULES,
    alert_queries,
    dashboard_queries,
    defined_metric_names,
    promql_metric_names,
    promql_selectors,
    promtool,
)

from editd.monitoring.metrics import Metrics

DEPLOY = REPO / "deploy"
# Series Prometheus makes itself, not editd.
PROMETHEUS_SERIES = {"up"}


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed: apt-get install prometheus (CI installs it)")
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", "rules_test.yml", cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_compose_prometheus_config(tmp_path: Path) -> None:
    # The compose file mounts rules.yml at /etc/prometheus/; point at the repo copy instead.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("editd_consumer_lag", {"editd_consumer_lag"}),
        ('up{job="editd"} == 0', {"up"}),
        (
            "histogram_quantile(0.99, sum by (le, route) "
            "(rate(editd_http_request_seconds_bucket[$__rate_interval])))",
            {"editd_http_request_seconds_bucket"},
        ),
        ("time() - a_seconds > 3 * b_seconds + 300", {"a_seconds", "b_seconds"}),
        ('x{a="}}"} * on(instance) group_left(v) y offset 5m', {"x", "y"}),
        ('label_replace(z, "dst", "$1", "src", "(.*)") and w[1m:10s]', {"z", "w"}),
        ("sum(rate(q_total[5m])) without (le) / 1e-3 # a trailing comment_name", {"q_total"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_promql_selectors_keep_matchers() -> None:
    assert promql_selectors('rate(a{b="c", d=~"e|f"}[1m]) > bool 0') == ['a{b="c", d=~"e|f"}']


def test_dashboard_and_alerts_use_only_metrics_editd_defines() -> None:
    defined = defined_metric_names(Metrics().registry) | PROMETHEUS_SERIES
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 30
    for q in queries:
        names = promql_metric_names(q.expr)
        assert names, f"{q.where}: selects no metric: {q.expr}"
        unknown = names - defined
        assert not unknown, (
            f"{q.where}: {sorted(unknown)} not defined in editd/monitoring/metrics.py"
        )


def test_every_editd_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    used = set().union(
        *(promql_metric_names(q.expr) for q in dashboard_queries() + alert_queries())
    )
    families = {family.name for family in Metrics().registry.collect()}
    unused = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unused, f"metrics nobody looks at: {sorted(unused)}"


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "editd"
    titles = [p["title"] for p in dashboard["panels"]]
    for needed in (
        "Applied facts: ES / PS / NS / S",
        "Probe facts and canary",
        "Drift from the base model",
        "Edit throughput",
        "Edit stage durations",
        "Consumer lag",
        "Dead-lettered and rejected facts",
        "Request latency",
    ):
        assert needed in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and panel["description"]
        # Threshold lines come from the exported policy, drawn dashed.
        if "facts" in panel["title"] and "ES" in panel["title"]:
            assert any("editd_score_threshold" in t["expr"] for t in panel["targets"])
    annotations = {a["name"]: a for a in dashboard["annotations"]["list"]}
    assert "editd_model_version" in annotations["Model version"]["expr"]
    assert "editd_rollbacks_total" in annotations["Rollbacks"]["expr"]


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"kafka", "editd", "prometheus", "grafana"}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    editd = services["editd"]
    assert editd["build"]["dockerfile"] == "deploy/Dockerfile"
    devices = editd["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env = editd["environment"]
    assert env["EDITD_KAFKA__BOOTSTRAP_SERVERS"].startswith("[")
    assert all(k.startswith("EDITD_") for k in env)
    # every EDITD_ variable names a real settings key
    from editd.config import Settings

    for key in env:
        path = key.removeprefix("EDITD_").lower().split("__")
        section = Settings.model_fields[path[0]].annotation
        assert path[1] in section.model_fields, key
    # One editor, two replicas on the same image and model.
    replicas = [
        s for s in services.values() if s.get("command", [])[:3] == ["run", "--role", "replica"]
    ]
    assert len(replicas) == 2
    for replica in replicas:
        assert replica["image"] == editd["image"]
        assert replica["environment"]["EDITD_MODEL__PATH"] == env["EDITD_MODEL__PATH"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume


def test_k8s_manifests() -> None:
    docs = [
        d
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {
        "Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceMonitor",
    }  # fmt: skip
    named = {(d["kind"], d.get("metadata", {}).get("name")): d for d in docs}
    editor, replica = named["Deployment", "editd"], named["Deployment", "editd-replica"]
    for deployment in (editor, replica):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    (container,) = editor["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    secret_ref = env["EDITD_SERVE__ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"] == kinds["Secret"]["metadata"]["name"]
    assert editor["spec"]["replicas"] == 1
    assert editor["spec"]["strategy"]["type"] == "Recreate"  # one writer per store
    # N replicas behind their own Service, started as replicas.
    (container,) = replica["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["run", "--role", "replica"]
    assert replica["spec"]["replicas"] > 1
    labels = replica["spec"]["template"]["metadata"]["labels"]
    selector = named["Service", "editd-replica"]["spec"]["selector"]
    assert selector.items() <= labels.items()
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "replicas.yaml" in kustomization["resources"]


def test_k8s_config_map_is_a_valid_editd_config(tmp_path: Path) -> None:
    from editd.config import load_settings

    (doc,) = yaml.safe_load_all((DEPLOY / "k8s" / "configmap.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(doc["data"]["config.yaml"])
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers and settings.serve.host == "0.0.0.0"
    assert str(settings.store.data_dir) == "/data"
