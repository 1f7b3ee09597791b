"""A real Prometheus for tests: scrape a target, query it, and check the shipped PromQL.

`Prometheus` starts the `prometheus` binary (Debian package `prometheus`) on a free loopback
port with a generated config that scrapes one target every second and loads the given rule
files, waits until it is ready, and queries its HTTP API. `check_expressions` evaluates every
query of the Grafana dashboard and every alert rule against it and reports which return no data.

Also here, because the tests that need no Prometheus use them too: `promql_metric_names` (the
metric names a PromQL expression selects) and `defined_metric_names` (the sample names a
prometheus_client registry can expose).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from editd.consumers.broker import free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "editd.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# Grafana's built-in variables, as Grafana would expand them for a short time range.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "10m",
    "${__range}": "10m",
}

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip


def promtool() -> str | None:
    return shutil.which("promtool")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


# -- PromQL names --------------------------------------------------------------------------


def expand_grafana_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def promql_selectors(expr: str) -> list[str]:
    """The vector selectors of a PromQL expression (`up{job="editd"}`), ranges dropped.

    A small scanner, not a full parser: enough for the expressions this project writes
    (functions, aggregations with by/without, binary operators with on/ignoring/group_*,
    range and subquery brackets, label matchers, string and number literals, comments).
    """
    text = expand_grafana_variables(expr)
    # Pass 1: set label-matcher blocks aside (they may hold any character inside quotes) and
    # blank out string literals and comments elsewhere.
    braces: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\"'`":
            i = _skip_string(text, i)
            out.append(" ")
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c == "{":
            j = i + 1
            while j < len(text) and text[j] != "}":
                j = _skip_string(text, j) if text[j] in "\"'`" else j + 1
            braces.append(text[i : j + 1])
            out.append(f" \x00{len(braces) - 1}\x00")
            i = j + 1
        else:
            out.append(c)
            i += 1
    s = "".join(out)
    # Pass 2: drop grouping label lists and range/subquery brackets, then read identifiers.
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\b(group_left|group_right)\b", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    selectors = []
    for m in re.finditer(r"(?<![\w.:\x00])([A-Za-z_:][\w:]*)\s*(\x00(\d+)\x00)?(\s*\()?", s):
        name, brace_index, call = m.group(1), m.group(3), m.group(4)
        if call or name.lower() in _KEYWORDS:
            continue
        selectors.append(name + (braces[int(brace_index)] if brace_index is not None else ""))
    return selectors


def _skip_string(text: str, i: int) -> int:
    """Index just past the string literal that starts at `text[i]`."""
    quote, j = text[i], i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if text[j] == "\\" and quote != "`" else 1
    return j + 1


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    return {re.sub(r"\{.*", "", sel) for sel in promql_selectors(expr)}


def defined_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name `registry` can expose, including families that have no child yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + sfx for sfx in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


# -- what the project ships ----------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Consumer lag' A", "annotation 'Rollbacks'", "alert EditdDown"
    expr: str
    conditional: bool  # alerts and annotations are empty until something happens


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                where = f"panel {panel['title']!r} {target.get('refId', '')}".strip()
                queries.append(Query(where, target["expr"], conditional=False))

    walk(dashboard.get("panels", []))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            where = f"annotation {annotation['name']!r}"
            queries.append(Query(where, annotation["expr"], conditional=True))
    return queries


def alert_queries(path: Path = RULES) -> list[Query]:
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Query(f"alert {rule['alert']}", rule["expr"], conditional=True)
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


# -- the server ----------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """`with Prometheus("127.0.0.1:8123") as prom:` — a private Prometheus scraping one target.

    The target's job is `editd` (the alert rules select on it). Storage lives in a temporary
    directory removed on exit.
    """

    def __init__(
        self,
        target: str,
        *,
        rule_files: list[Path] | None = None,
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        job: str = "editd",
        startup_timeout: float = 30.0,
    ) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus binary not found (Debian package `prometheus`)")
        self.binary = binary
        self.target = target
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._rule_files = [Path(p).resolve() for p in (rule_files or [])]
        self._scrape_interval = scrape_interval
        self._metrics_path = metrics_path
        self._startup_timeout = startup_timeout
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self._scrape_interval,
                "evaluation_interval": self._scrape_interval,
            },
            "rule_files": [str(p) for p in self._rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self._metrics_path,
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }

    def __enter__(self) -> Prometheus:
        self._dir = tempfile.TemporaryDirectory(prefix="editd-prometheus-")
        root = Path(self._dir.name)
        (root / "prometheus.yml").write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        self._log = (root / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._log.close()
            self._dir.cleanup()
            self._dir = None

    def log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        text = (Path(self._dir.name) / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready in {self._startup_timeout}s")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query now; the result vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for_scrapes(self, count: int = 3, timeout: float = 30.0) -> None:
        """Block until the target was scraped successfully `count` times."""
        expr = f'sum_over_time(up{{job="{self.job}"}}[5m])'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and float(result[0]["value"][1]) >= count:
                return
            time.sleep(0.2)
        targets = self.api("targets")["activeTargets"]
        raise PrometheusError(f"target not scraped {count} times in {timeout}s: {targets}")

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.2)
        raise PrometheusError(f"{expr} returned no data in {timeout}s")

    def rule_health(self) -> dict[str, str]:
        """Rule name -> "" if it evaluates cleanly, else its health and last error."""
        out = {}
        for group in self.api("rules")["groups"]:
            for rule in group["rules"]:
                ok = rule.get("health") in ("ok", "unknown") and not rule.get("lastError")
                out[rule["name"]] = "" if ok else f"{rule.get('health')}: {rule.get('lastError')}"
        return out


# -- the check -----------------------------------------------------------------------------


@dataclass
class Report:
    checked: int = 0
    no_data: list[str] = field(default_factory=list)  # "where: expr (what was empty)"
    errors: list[str] = field(default_factory=list)  # expressions Prometheus refused

    @property
    def ok(self) -> bool:
        return not self.no_data and not self.errors

    def __str__(self) -> str:
        lines = [f"{self.checked} expressions checked"]
        lines += [f"no data: {x}" for x in self.no_data]
        lines += [f"error: {x}" for x in self.errors]
        return "\n".join(lines)


def check_expressions(prom: Prometheus, queries: list[Query]) -> Report:
    """Evaluate each query now. A panel query must return data; an alert or annotation is
    empty while nothing is wrong, so it must evaluate without error and each series it
    selects must return data."""
    report = Report()
    for q in queries:
        report.checked += 1
        expr = expand_grafana_variables(q.expr)
        try:
            result = prom.query(expr)
        except PrometheusError as exc:
            report.errors.append(f"{q.where}: {expr} ({exc})")
            continue
        if not q.conditional:
            if not result:
                report.no_data.append(f"{q.where}: {expr}")
            continue
        for selector in promql_selectors(q.expr):
            if not prom.query(selector):
                report.no_data.append(f"{q.where}: {expr} (selector {selector} is empty)")
    return report
