"""deploy/kubernetes against the code (drift): addresses, ports, variables, TLS, policies."""

from __future__ import annotations

import ast
import functools
import re

import pytest

from agentvm.cli.services import service_specs
from agentvm.common import tls
from agentvm.common.config import METRICS_PORTS, Settings
from agentvm.common.nodes_kubernetes import Target
from tests.deploy.manifests import (
    COMPONENT,
    DIALS,
    DISCOVERING,
    NAMESPACE,
    ROOT,
    Obj,
    container,
    env_of,
    host_port,
    mount_paths,
    mounted_files,
    of_kind,
    port_named,
    selects,
    settings_under,
    workloads,
)


# -- (c) drift: the manifests against the code ---------------------------------------------------
def test_each_container_runs_its_service_module(objects: tuple[Obj, ...]) -> None:
    specs = {s.name: s for s in service_specs(Settings())}
    for name, workload in workloads(objects).items():
        assert container(workload)["command"] == ["python", "-m", specs[name].module]


@functools.cache
def known_variables() -> frozenset[str]:
    """Every AGENTVM_* name the code reads: string literals in services/agentvm, and the
    per-service metrics variables Settings.metrics_addr builds."""
    names = {
        node.value
        for path in (ROOT / "services" / "agentvm").rglob("*.py")
        if "/v1/" not in str(path)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"AGENTVM_[A-Z0-9_]+", node.value)
    }
    names |= {f"AGENTVM_{s.upper().replace('-', '_')}_METRICS_ADDR" for s in METRICS_PORTS}
    return frozenset(names)


def test_every_variable_is_one_the_code_reads(objects: tuple[Obj, ...]) -> None:
    assert "AGENTVM_STATE_DIR" in known_variables()
    for name, workload in workloads(objects).items():
        unknown = {v for v in env_of(container(workload)) if v.startswith("AGENTVM_")}
        unknown -= known_variables()
        assert not unknown, f"{name}: {sorted(unknown)} are read by nothing in services/agentvm"


def test_listen_address_container_port_and_service_agree(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = of_kind(objects, "Service")
    for name, workload in workloads(objects).items():
        c = container(workload)
        settings = settings_under(env_of(c), monkeypatch)
        (spec,) = [s for s in service_specs(settings) if s.name == name]
        host, port = host_port(spec.address)  # a unix: default means the variable was not read
        assert port == port_named(c, "grpc"), name
        assert host not in ("127.0.0.1", "localhost", "::1"), f"{name} serves on loopback only"
        (grpc_port,) = [p for p in services[name]["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["targetPort"] == "grpc"
        assert grpc_port["port"] == port, f"Service {name}: grpc port {grpc_port['port']}"
        assert selects(services[name]["spec"]["selector"], workload)


def test_dial_addresses_name_the_services(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = of_kind(objects, "Service")
    for name, workload in workloads(objects).items():
        settings = settings_under(env_of(container(workload)), monkeypatch)
        for field_name, target in DIALS[name].items():
            address = getattr(settings, field_name)
            host, port = host_port(address)
            assert host == f"{target}.{NAMESPACE}.svc", f"{name}.{field_name}={address!r}"
            (grpc_port,) = [p for p in services[target]["spec"]["ports"] if p["name"] == "grpc"]
            assert port == grpc_port["port"], f"{name}.{field_name}={address!r}"


def test_metrics_ports_and_scrape_annotations(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = of_kind(objects, "Service")
    for name, workload in workloads(objects).items():
        c = container(workload)
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if name not in METRICS_PORTS:
            assert "prometheus.io/scrape" not in annotations, f"{name} serves no /metrics"
            assert "metrics" not in {p["name"] for p in c["ports"]}
            continue
        settings = settings_under(env_of(c), monkeypatch)
        host, port = host_port(settings.metrics_addr(name))
        assert port == METRICS_PORTS[name] == port_named(c, "metrics"), name
        assert host not in ("127.0.0.1", "localhost", "::1"), f"{name}: /metrics on loopback"
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        (svc_port,) = [p for p in services[name]["spec"]["ports"] if p["name"] == "metrics"]
        assert svc_port["port"] == port


def test_tls_files_and_token_come_from_the_mounted_secrets(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, workload in workloads(objects).items():
        settings = settings_under(env_of(container(workload)), monkeypatch)
        assert settings.tls == "mutual"
        assert settings.auth == "token"
        files, generated = tls.configured_files(settings.tls_dir, name)
        # Given files are never generated (a Secret volume is read-only).
        assert not generated, f"{name}: set AGENTVM_TLS_CA/CERT/KEY"
        # The layout tls.py expects in AGENTVM_TLS_DIR, for this identity.
        assert files == tls.files_in(settings.tls_dir, name)
        mounted = mounted_files(workload)
        secret = f"agent-vm-tls-{name}"
        assert mounted[str(files.ca)] == f"{secret}/ca.crt"
        assert mounted[str(files.cert)] == f"{secret}/tls.crt"
        assert mounted[str(files.key)] == f"{secret}/tls.key"
        assert mounted[str(settings.token_file)] == "agent-vm-token/token"


def test_the_gateway_serves_https_with_its_mounted_certificate(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    workload = workloads(objects)["e2b-gateway"]
    c = container(workload)
    settings = settings_under(env_of(c), monkeypatch)
    mounted = mounted_files(workload)
    assert mounted[settings.e2b_tls_cert] == "agent-vm-e2b-http/tls.crt"
    assert mounted[settings.e2b_tls_key] == "agent-vm-e2b-http/tls.key"
    _, port = host_port(settings.e2b_http_addr)
    assert port == port_named(c, "https")
    # Its keys and access-token secret: STATE_DIR/e2b (e2b_gateway/__main__.py).
    assert mounted[str(settings.state_dir / "e2b" / "keys.json")] == "agent-vm-e2b/keys.json"
    assert mounted[str(settings.state_dir / "e2b" / "secret")] == "agent-vm-e2b/secret"
    (https,) = [
        p
        for p in of_kind(objects, "Service")["e2b-gateway"]["spec"]["ports"]
        if p["name"] == "https"
    ]
    assert https["targetPort"] == "https"


def test_vm_manager_uses_the_hosts_libvirt_and_directories(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemonset = of_kind(objects, "DaemonSet")["vm-manager"]
    spec = daemonset["spec"]["template"]["spec"]
    c = container(daemonset)
    assert spec["nodeSelector"]["agent-vm.io/kvm"] == "true"
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not spec.get("hostPID"), "vm_manager/workspace.py refuses capped workspaces then"
    assert c["securityContext"]["privileged"] is True
    settings = settings_under(env_of(c), monkeypatch)
    assert settings.libvirt_uri == "qemu:///system"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = mount_paths(daemonset)
    for path in (settings.state_dir, settings.cache_dir, settings.run_dir, settings.log_dir):
        # libvirt on the host opens what vm-manager names: the same path on both sides.
        mount = mounts[str(path)]
        assert volumes[mount["name"]]["hostPath"]["path"] == str(path)
    assert mounts[str(settings.state_dir)]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/dev/kvm"]["name"]]["hostPath"] == {
        "path": "/dev/kvm",
        "type": "CharDevice",
    }
    assert volumes[mounts["/var/run/libvirt"]["name"]]["hostPath"]["path"] == "/var/run/libvirt"


def test_headless_service_rbac_and_discovery_setting(
    objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = of_kind(objects, "Service")
    roles = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding").values()
    all_workloads = workloads(objects)
    assert services["vm-manager"]["spec"]["clusterIP"] == "None"
    for name, workload in all_workloads.items():
        pod = workload["spec"]["template"]["spec"]
        settings = settings_under(env_of(container(workload)), monkeypatch)
        assert pod["serviceAccountName"] == name
        if name not in DISCOVERING:
            assert not settings.nodes_kubernetes
            assert pod.get("automountServiceAccountToken") is False, name
            continue
        target = Target.parse(settings.nodes_kubernetes)
        assert target.namespace == NAMESPACE
        svc = services[target.service]
        assert svc["spec"]["clusterIP"] == "None"
        assert target.port in {p["name"] for p in svc["spec"]["ports"]}
        assert selects(svc["spec"]["selector"], all_workloads["vm-manager"])
        assert pod.get("automountServiceAccountToken", True) is not False
        granted = set()
        for binding in bindings:
            if {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE} in binding[
                "subjects"
            ]:
                for rule in roles[binding["roleRef"]["name"]]["rules"]:
                    if (
                        "discovery.k8s.io" in rule["apiGroups"]
                        and "endpointslices" in rule["resources"]
                    ):
                        granted |= set(rule["verbs"])
        assert {"list", "watch"} <= granted, f"{name} cannot list and watch endpointslices"


def policy_sources(rule: Obj) -> set[str] | None:
    """Components a rule admits (None: any source)."""
    if "from" not in rule:
        return None
    out = set()
    for peer in rule["from"]:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if "podSelector" in peer and "namespaceSelector" not in peer:
            out.add(labels.get(COMPONENT, "*"))
        else:
            out.add("other")
    return out


def test_network_policies(objects: tuple[Obj, ...]) -> None:
    policies = of_kind(objects, "NetworkPolicy")
    all_workloads = workloads(objects)
    assert policies["default-deny-ingress"]["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress"],
    }
    admitted: dict[str, dict[str, set[str] | None]] = {}
    for policy in policies.values():
        selected = [
            n
            for n, w in all_workloads.items()
            if selects(policy["spec"]["podSelector"].get("matchLabels", {}), w)
        ]
        if policy["metadata"]["name"] == "default-deny-ingress":
            continue
        (name,) = selected
        c = container(all_workloads[name])
        names = {p["name"] for p in c["ports"]}
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in names, f"policy {name}: no port {port['port']}"
                admitted.setdefault(name, {})[port["port"]] = policy_sources(rule)
    assert admitted["vm-manager"]["grpc"] == {"executor", "pool-manager", "monitor"}
    assert admitted["pool-manager"]["grpc"] == {"executor", "monitor"}
    assert admitted["executor"]["grpc"] is None
    assert admitted["e2b-gateway"]["https"] is None
    assert "*" in (admitted["monitor"]["grpc"] or set())
    for name in METRICS_PORTS:
        assert admitted[name]["metrics"] == {"other"}, f"{name}: scrape"


def test_disruption_budgets_select_replicated_services(objects: tuple[Obj, ...]) -> None:
    all_workloads = workloads(objects)
    covered = {}
    for pdb in of_kind(objects, "PodDisruptionBudget").values():
        (name,) = [
            n
            for n, w in all_workloads.items()
            if selects(pdb["spec"]["selector"]["matchLabels"], w)
        ]
        covered[name] = pdb["spec"]
    assert sorted(covered) == ["e2b-gateway", "executor", "vm-manager"]
    for name in ("executor", "e2b-gateway"):
        assert covered[name]["minAvailable"] < all_workloads[name]["spec"]["replicas"]


def test_every_container_has_requests_and_a_memory_limit(objects: tuple[Obj, ...]) -> None:
    for name, workload in workloads(objects).items():
        resources = container(workload)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
