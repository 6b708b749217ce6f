"""Prometheus rules, config and dashboard against a real daemon and a real server.

promtool and prometheus come from Debian's `prometheus` package. Tests that need
them are skipped, with the reason, when the binaries are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from deeperhub import metrics
from deeperhub.metrics import EXPECTED_SECURITY_SERIES

from .daemon import Daemon, free_port
from .test_metrics_daemon import QUIET_LIMITS, drive_traffic, scrape

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "etc" / "prometheus"
DASHBOARD = ROOT / "etc" / "grafana" / "deeperhub.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (apt-get install prometheus)",
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (apt-get install prometheus)",
)

# A daemon that served traffic, and the text of its /metrics.
Exposition = tuple[Daemon, str]

SERIES_NAME = re.compile(r"\bdeeperhub_[a-z0-9_]+")


def promtool(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def exposition(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, str]]:
    """A daemon that served every kind of traffic, and its /metrics text."""
    daemon = Daemon(tmp_path_factory.mktemp("prometheus") / "var", env=QUIET_LIMITS)
    daemon.start()
    try:
        drive_traffic(daemon)
        scrape(daemon)
        # The supervisor creates the per-worker counters once per second.
        time.sleep(1.5)
        yield daemon, scrape(daemon)
    finally:
        daemon.stop()


def sample_names(text: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def family_names(text: str) -> set[str]:
    """Return metric names as documented: counters with `_total`."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            expressions.append(query["query"])
    return expressions


def rule_expressions() -> list[str]:
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    # The rule file is YAML; expressions are the `expr:` blocks up to the next
    # key at the same indentation.
    return re.findall(r"expr: \|?\n?((?:.*\n)+?)\s+(?:for|labels):", text)


@needs_promtool
def test_alert_rules_pass_check() -> None:
    output = promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS: 8 rules found" in output


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    output = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in output


@needs_promtool
def test_prometheus_config_passes_check() -> None:
    promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)


@needs_promtool
def test_scrape_passes_check_metrics(exposition: Exposition) -> None:
    _, text = exposition
    promtool("check", "metrics", stdin=text)


def test_rule_expressions_found() -> None:
    # Guards the regular expression in rule_expressions.
    expressions = rule_expressions()
    assert len(expressions) == 8
    assert all("deeperhub_" in expression for expression in expressions)


def test_dashboard_and_rules_use_exported_series(
    exposition: Exposition,
) -> None:
    _, text = exposition
    exported = sample_names(text)
    expressions = dashboard_expressions() + rule_expressions()
    referenced = {name for expr in expressions for name in SERIES_NAME.findall(expr)}

    missing = sorted(
        name
        for name in referenced
        if name not in exported and name not in EXPECTED_SECURITY_SERIES
    )
    assert missing == []
    assert len(referenced) > 25


def test_dashboard_has_three_panel_groups() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = groups.setdefault(panel["title"], [])
        else:
            current.append(panel["title"])
    assert list(groups) == ["System overview", "WebSockets", "Database"]
    assert {"Host CPU busy", "Memory", "Disk used (database filesystem)"} <= set(
        groups["System overview"]
    )
    assert {"Active WebSocket connections", "Message rate"} <= set(
        groups["System overview"]
    )
    assert {"Connections per second", "Message delivery latency", "Error rate"} <= set(
        groups["WebSockets"]
    )
    assert {"Query time (p95)", "Read pool usage", "Database size"} <= set(
        groups["Database"]
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_scraped_series_is_documented(exposition: Exposition) -> None:
    _, text = exposition
    documented = set(SERIES_NAME.findall(METRICS_DOC.read_text()))
    undocumented = sorted(family_names(text) - documented)
    assert undocumented == []


def declared_series() -> set[str]:
    """Return the names of the series declared in deeperhub.metrics."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, (Gauge, Histogram)):
            names.add(value._name)
    return names


def test_every_documented_series_exists(exposition: Exposition) -> None:
    """Each row of docs/metrics.md is scraped or declared (labelled, unused yet)."""
    _, text = exposition
    known = family_names(text) | declared_series()
    table_rows = re.findall(
        r"^\| `(deeperhub_[a-z0-9_]+)`", METRICS_DOC.read_text(), re.M
    )
    assert len(table_rows) > 40
    missing = sorted(name for name in table_rows if name not in known)
    assert missing == []


def query(port: int, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=5
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@needs_prometheus
@pytest.mark.timeout(90)
def test_prometheus_server_scrapes_daemon(
    exposition: Exposition, tmp_path: Path
) -> None:
    daemon, _ = exposition
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {PROMETHEUS_DIR / 'alerts.yml'}\n"
        "scrape_configs:\n  - job_name: deeperhub\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        # /-/ready turns 200 once the storage is open; queries before that get
        # a 503 with a text body.
        up: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2)
                if ready.status_code == 200:
                    up = query(port, 'up{job="deeperhub"}')
            except httpx.HTTPError:
                up = []
            if up and up[0]["value"][1] == "1":
                break
            time.sleep(0.5)
        assert up, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert up[0]["value"][1] == "1"

        workers = query(port, "deeperhub_worker_up == 1")
        assert {r["metric"]["worker"] for r in workers} >= {
            "db_writer",
            "alert_dispatcher",
            "security_monitor",
            "acceptor-1",
        }
        opened = query(port, "sum(deeperhub_ws_connections_opened_total)")
        assert float(opened[0]["value"][1]) >= 2
        cpu = query(port, "sum by (worker) (deeperhub_process_cpu_seconds_total)")
        assert {r["metric"]["worker"] for r in cpu} >= {"supervisor", "db_writer"}

        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).json()
        loaded = [
            rule
            for group in rules["data"]["groups"]
            for rule in group["rules"]
            if rule["type"] == "alerting"
        ]
        assert len(loaded) == 8
        assert all(rule["health"] != "err" for rule in loaded), loaded
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()
