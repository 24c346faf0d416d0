"""What the deploy/kubernetes checks share: rendering, reading workloads as the kubelet does."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from agentvm.cli.services import NAMES
from agentvm.common.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = {"base": KUBERNETES / "base", "example": KUBERNETES / "overlays" / "example"}
# The oldest Kubernetes these manifests are meant for, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
NAMESPACE = "agent-vm"
IMAGE = "ghcr.io/agent-vm/agent-vm"
CERT_MANAGER_SCHEMA = Path(__file__).parent / "schemas" / "cert-manager.io_v1.json"
COMPONENT = "app.kubernetes.io/component"
# What each service dials, by Settings field: the service at the other end.
DIALS: dict[str, dict[str, str]] = {
    "vm-manager": {"monitor_addr": "monitor"},
    "pool-manager": {"vm_manager_addr": "vm-manager", "monitor_addr": "monitor"},
    "executor": {
        "vm_manager_addr": "vm-manager",
        "executor_pool": "pool-manager",
        "monitor_addr": "monitor",
    },
    "monitor": {"vm_manager_addr": "vm-manager", "pool_manager_addr": "pool-manager"},
    "e2b-gateway": {"executor_addr": "executor"},
}
# Sample values of the downward-API variables the manifests use, to resolve $(VAR).
FIELD_SAMPLES = {"status.hostIP": "10.0.0.5", "status.podIP": "10.1.2.3"}
DISCOVERING = ("executor", "pool-manager")

Obj = dict[str, Any]


# -- rendering --------------------------------------------------------------------------------
def kubectl() -> str:
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )
    if found is None:
        # docs/SCALE_OUT.md: rendered "where kubectl exists"; reported as skipped, never passed.
        pytest.skip(
            "kubectl is not installed: the deploy/kubernetes checks render with `kubectl "
            "kustomize`; install kubectl to run them"
        )
    return found


@functools.cache
def render(name: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {KUSTOMIZATIONS[name]} failed:\n{done.stderr}")
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def of_kind(objs: tuple[Obj, ...], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: tuple[Obj, ...]) -> dict[str, Obj]:
    """The five services' DaemonSet/Deployments, by the component they run."""
    found = {
        o["spec"]["template"]["metadata"]["labels"][COMPONENT]: o
        for o in objs
        if o["kind"] in ("DaemonSet", "Deployment")
    }
    assert sorted(found) == sorted(NAMES), "one workload per service of agentvm.cli.services"
    return found


def container(workload: Obj) -> Obj:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_of(c: Obj) -> dict[str, str]:
    """The container's environment as the kubelet makes it ($(VAR) expanded)."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = FIELD_SAMPLES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                str(item["value"]),
            )
    return env


def settings_under(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the container reads them: its AGENTVM_* variables and no others."""
    for name in list(os.environ):
        if name.startswith("AGENTVM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    assert sep, f"{address!r} is not HOST:PORT"
    assert port.isdigit(), f"{address!r} is not HOST:PORT"
    return host.strip("[]"), int(port)


def port_named(c: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name!r}: {ports}"
    return int(ports[name])


def mounted_files(workload: Obj) -> dict[str, str]:
    """Every file a Secret volume puts in the container: its path -> 'secret/key'."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in container(workload)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        for item in secret["items"]:
            files[f"{mount['mountPath']}/{item['path']}"] = f"{secret['secretName']}/{item['key']}"
    return files


def mount_paths(workload: Obj) -> dict[str, Obj]:
    return {m["mountPath"]: m for m in container(workload)["volumeMounts"]}


def selects(selector: Mapping[str, str], workload: Obj) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())
