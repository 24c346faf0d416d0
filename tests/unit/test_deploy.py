"""The files in deploy/ (Prometheus, Grafana, systemd) against docs/MONITOR_DESIGN.md.

Every metric the dashboard and the alerting rules name must be one the design defines, the
scrape targets must be the design's metrics addresses, and every service has its unit.
PyYAML is not a dependency of the project, so the YAML files get a structural check by text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "MONITOR_DESIGN.md"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "agent-vm-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SYSTEMD = DEPLOY / "systemd"

# service name -> Python module it runs.
SERVICES = {
    "vm-manager": "agentvm.vm_manager",
    "pool-manager": "agentvm.pool_manager",
    "executor": "agentvm.executor",
    "monitor": "agentvm.monitor",
    "e2b-gateway": "agentvm.e2b_gateway",
}
# Served by every service itself (the paragraph after the design's metrics table).
PER_SERVICE_METRICS = {
    "agentvm_grpc_server_handled_total",
    "agentvm_grpc_server_handling_seconds",
    "agentvm_events_dropped_total",
}
ALERT_NAMES = {
    "AgentVMAnomaly",
    "AgentVMEventsLost",
    "AgentVMPoolEmpty",
    "AgentVMServiceDown",
    "AgentVMExecutionErrors",
    "AgentVMGrpcErrors",
}
DATASOURCE_UID = "${DS_PROMETHEUS}"
METRIC_TOKEN = re.compile(r"\bagentvm_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- the design ---------------------------------------------------------------------------------


def _metrics_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    start = text.index("## Metrics")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@cache
def design_table() -> dict[str, tuple[str, str]]:
    """Metric name -> (type, labels cell) from the rows of the design's metrics table."""
    table: dict[str, tuple[str, str]] = {}
    for line in _metrics_section().splitlines():
        if line.startswith("| `agentvm_"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            table[cells[0].strip("`")] = (cells[1], cells[2])
    return table


@cache
def design_per_service() -> set[str]:
    """The agentvm_ names the design's text after the table gives (in backquotes)."""
    section = _metrics_section()
    after = section[section.rindex("| `agentvm_") :]
    return set(re.findall(r"`(agentvm_[a-z_]+)(?:\{[^`]*\})?`", after))


@cache
def design_metrics_addrs() -> dict[str, int]:
    """Service -> metrics port, from "`127.0.0.1:9470` monitor, `:9471` vm-manager, ..."."""
    text = " ".join(_metrics_section().split())
    found = re.findall(r"`(?:127\.0\.0\.1)?:(\d+)`\s+([a-z0-9-]+)", text)
    return {service: int(port) for port, service in found}


def known_metrics() -> set[str]:
    return set(design_table()) | design_per_service()


def histograms() -> set[str]:
    # The per-service names give no type; counters end in _total, the rest is a histogram.
    table = {name for name, (kind, _) in design_table().items() if kind == "histogram"}
    return table | {name for name in design_per_service() if not name.endswith("_total")}


def metric_names(text: str) -> set[str]:
    """The design metric each agentvm_ token of text means (histogram series suffixes off)."""
    names = set()
    for token in METRIC_TOKEN.findall(text):
        name = token
        for suffix in HISTOGRAM_SUFFIXES:
            if token.endswith(suffix) and token.removesuffix(suffix) in histograms():
                name = token.removesuffix(suffix)
                break
        names.add(name)
    return names


def test_design_tables_parse() -> None:
    table = design_table()
    assert len(table) >= 15
    assert table["agentvm_execution_duration_seconds"][0] == "histogram"
    assert table["agentvm_executions_total"][0] == "counter"
    assert design_per_service() >= PER_SERVICE_METRICS
    assert design_metrics_addrs() == {
        "monitor": 9470,
        "vm-manager": 9471,
        "pool-manager": 9472,
        "executor": 9473,
        "e2b-gateway": 9474,
    }


def test_metric_names_strip_histogram_suffixes() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) ("
        "rate(agentvm_execution_duration_seconds_bucket[5m])))"
        " / agentvm_grpc_server_handling_seconds_count + agentvm_executions_total"
    )
    assert metric_names(expr) == {
        "agentvm_execution_duration_seconds",
        "agentvm_grpc_server_handling_seconds",
        "agentvm_executions_total",
    }
    # A counter keeps its name; _count on it is not a design name.
    assert metric_names("agentvm_executions_total_count") == {"agentvm_executions_total_count"}


# -- Grafana ------------------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel.get("targets", [])]


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for char in expr:
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and not in_string


def test_dashboard_header_and_variables() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] == "agent-vm"
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    vm = variables["vm"]
    assert vm["type"] == "query"
    assert vm["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
    assert vm["definition"] == "label_values(agentvm_vm_processes, vm)"
    assert vm["query"]["query"] == vm["definition"]


def test_dashboard_panels_and_layout() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(panel["type"] == "row" for panel in panels())
    taken: dict[tuple[int, int], str] = {}
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize("expr", exprs())
def test_dashboard_expr(expr: str) -> None:
    assert _balanced(expr), expr
    names = metric_names(expr)
    unknown = names - known_metrics()
    assert not unknown, f"not in docs/MONITOR_DESIGN.md: {sorted(unknown)} in {expr}"
    for token in METRIC_TOKEN.findall(expr):
        assert token not in histograms(), f"a histogram has only _bucket/_sum/_count: {expr}"
    if "histogram_quantile(" in expr:
        assert "_bucket" in expr
        assert re.search(r"\bby \([^)]*\ble\b", expr), f"quantile without le: {expr}"
    # Series with a vm label follow the dashboard's VM selection.
    per_vm = {name for name, (_, labels) in design_table().items() if "`vm`" in labels}
    if names & per_vm:
        assert 'vm=~"$vm"' in expr, expr


def test_dashboard_covers_every_design_metric() -> None:
    shown = set().union(*(metric_names(expr) for expr in exprs()))
    missing = (set(design_table()) | PER_SERVICE_METRICS) - shown
    assert not missing, f"design metrics without a panel: {sorted(missing)}"
    # The variable's query names a design metric too.
    assert metric_names("label_values(agentvm_vm_processes, vm)") <= known_metrics()


def test_dashboard_service_process_panels() -> None:
    joined = "\n".join(exprs())
    assert 'process_resident_memory_bytes{job=~"agent-vm.*"}' in joined
    assert 'process_cpu_seconds_total{job=~"agent-vm.*"}' in joined


# -- Prometheus (structural check by text: PyYAML is not a dependency) -------------------------


def yaml_lines(path: Path) -> list[str]:
    """The file's lines without comments and blank lines, checked for YAML basics."""
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert "\t" not in raw, f"{path.name}:{number}: tab"
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        assert indent % 2 == 0, f"{path.name}:{number}: odd indentation"
        lines.append(line)
    return lines


def blocks(lines: list[str], start: re.Pattern[str]) -> list[list[str]]:
    """Split lines into blocks, each from a line matching start to the next such line."""
    out: list[list[str]] = []
    for line in lines:
        if start.match(line):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def scrape_jobs() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """job_name -> [(target, labels)] of prometheus.yml's static_configs."""
    jobs: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for block in blocks(yaml_lines(PROMETHEUS), re.compile(r"\s*- job_name:")):
        name = block[0].split(":", 1)[1].strip().strip("\"'")
        entries: list[tuple[str, dict[str, str]]] = []
        for entry in blocks(block[1:], re.compile(r"\s*- targets:")):
            targets = re.findall(r"[\w.-]+:\d+", entry[0].split(":", 1)[1])
            labels: dict[str, str] = {}
            if len(entry) > 1:
                assert entry[1].strip() == "labels:", entry
                for line in entry[2:]:
                    key, value = line.strip().split(":", 1)
                    labels[key] = value.strip().strip("\"'")
            entries.extend((target, labels) for target in targets)
        jobs[name] = entries
    return jobs


def test_prometheus_config() -> None:
    lines = yaml_lines(PROMETHEUS)
    top = {line.split(":", 1)[0] for line in lines if not line.startswith(" ")}
    assert {"global", "rule_files", "scrape_configs"} <= top
    assert "  scrape_interval: 15s" in lines
    text = "\n".join(lines)
    rule_files = re.search(r"^rule_files:(.*?)(?=^\S)", text + "\nend:", re.M | re.S)
    assert rule_files is not None
    assert "alerts.yml" in rule_files.group(1)
    assert (PROMETHEUS.parent / "alerts.yml").is_file()

    ports = design_metrics_addrs()
    jobs = scrape_jobs()
    assert set(jobs) == {"agent-vm-monitor", "agent-vm-services"}
    # No service label on monitor: its own series carry one (it would become exported_service).
    assert jobs["agent-vm-monitor"] == [(f"127.0.0.1:{ports['monitor']}", {})]
    services = sorted(jobs["agent-vm-services"])
    expected = sorted(
        (f"127.0.0.1:{port}", {"service": service})
        for service, port in ports.items()
        if service != "monitor"
    )
    assert services == expected


def alert_rules() -> dict[str, str]:
    """alert name -> the text of its rule in alerts.yml."""
    rules = {}
    for block in blocks(yaml_lines(ALERTS), re.compile(r"\s*- alert:")):
        rules[block[0].split(":", 1)[1].strip()] = "\n".join(block)
    return rules


def test_alert_rules() -> None:
    lines = yaml_lines(ALERTS)
    assert lines[0] == "groups:"
    rules = alert_rules()
    assert set(rules) == ALERT_NAMES
    for name, rule in rules.items():
        for key in ("expr:", "annotations:", "summary:", "description:", "severity:"):
            assert key in rule, f"{name} has no {key}"
        expr = rule.split("expr:", 1)[1].split("\n        labels:", 1)[0]
        assert _balanced(expr), name
    assert 'up{job=~"agent-vm.*"} == 0' in rules["AgentVMServiceDown"]
    assert "for: 1m" in rules["AgentVMServiceDown"]
    assert "for: 5m" in rules["AgentVMPoolEmpty"]
    assert 'agentvm_pool_target_vms{bound="min"} > 0' in rules["AgentVMPoolEmpty"]
    assert 'agentvm_executions_total{outcome="error"}' in rules["AgentVMExecutionErrors"]


def test_alert_metric_names_are_in_the_design() -> None:
    names = metric_names(ALERTS.read_text(encoding="utf-8"))
    assert names, "no agentvm_ metric in alerts.yml"
    unknown = names - known_metrics()
    assert not unknown, f"not in docs/MONITOR_DESIGN.md: {sorted(unknown)}"
    assert not names & histograms(), "a histogram has only _bucket/_sum/_count series"


# -- systemd ------------------------------------------------------------------------------------


def unit(service: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)] of deploy/systemd/agent-vm-<service>.service."""
    path = SYSTEMD / f"agent-vm-{service}.service"
    assert path.is_file(), f"no unit for {service}"
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: key before a section"
        key, value = line.split("=", 1)
        current.append((key, value))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_systemd_unit(service: str) -> None:
    sections = unit(service)
    assert set(sections) == {"Unit", "Service", "Install"}
    assert values(sections["Service"], "Type") == ["simple"]
    assert values(sections["Service"], "ExecStart") == [
        f"/opt/agent-vm/.venv/bin/python -m {SERVICES[service]}"
    ]
    assert values(sections["Service"], "Restart") == ["on-failure"]
    assert values(sections["Install"], "WantedBy") == ["multi-user.target"]


def test_every_unit_is_a_known_service() -> None:
    for path in SYSTEMD.glob("*.service"):
        service = path.name.removeprefix("agent-vm-").removesuffix(".service")
        assert service in SERVICES, path.name


def test_monitor_unit() -> None:
    sections = unit("monitor")
    after = " ".join(values(sections["Unit"], "After")).split()
    wants = " ".join(values(sections["Unit"], "Wants")).split()
    for needed in ("agent-vm-vm-manager.service", "agent-vm-pool-manager.service"):
        assert needed in after
        assert needed in wants
    env = dict(value.split("=", 1) for value in values(sections["Service"], "Environment"))
    assert env["AGENTVM_MONITOR_METRICS_ADDR"] == f"127.0.0.1:{design_metrics_addrs()['monitor']}"
    assert env["AGENTVM_AUDIT_DIR"] == "/var/log/agent-vm/audit"


# -- README -------------------------------------------------------------------------------------


def test_readme_lists_services_and_monitoring() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for service in SERVICES:
        assert f"agent-vm-{service}.service" in readme
    assert "## Monitoring" in readme
    for service, port in design_metrics_addrs().items():
        variable = f"AGENTVM_{service.upper().replace('-', '_')}_METRICS_ADDR"
        assert re.search(rf"`{variable}` \| `127\.0\.0\.1:{port}`", readme), variable
    for needed in (
        "prometheus/prometheus.yml",
        "grafana/agent-vm-dashboard.json",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "agent-vm audit verify /var/log/agent-vm/audit",
    ):
        assert needed in readme, needed
