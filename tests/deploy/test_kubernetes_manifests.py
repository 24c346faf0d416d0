"""Offline checks of deploy/kubernetes: it renders, every object is valid, it agrees with the code.

No cluster here (docs/SCALE_OUT.md, "What can be tested here"). What is checked:

* both kustomizations render with ``kubectl kustomize`` (kustomize's
  semantics, patches and image overrides included, have no faithful
  pure-Python stand-in; where kubectl is not installed these checks are
  reported as skipped, as the issue has it: "where kubectl exists"; the CI
  machines have it);
* every rendered object passes ``kubernetes-validate --strict`` for each of
  KUBERNETES_VERSIONS; cert-manager's kinds, which it has no schema for, pass
  a vendored strict schema (``schemas/cert-manager.io_v1.json``); any other
  kind without a schema fails;
* drift: commands, listen and dial addresses, Service ports and their names,
  metrics ports and scrape annotations, TLS files and identities, the token,
  the discovery setting, probes and every AGENTVM_* name agree with
  ``Settings``, ``METRICS_PORTS``, ``service_specs`` and ``tls``, read under
  each container's own environment (a rename in config.py fails here);
* the probes' command runs against a real gRPC health server over mutual TLS
  (SERVING passes, NOT_SERVING and no server fail).

The drift and probe checks are in test_kubernetes_drift.py and
test_kubernetes_probes.py; what they share in manifests.py.
"""

from __future__ import annotations

import functools
import json
import tomllib

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from agentvm.cli.services import NAMES
from agentvm.common import tls
from tests.deploy.manifests import (
    CERT_MANAGER_SCHEMA,
    IMAGE,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    NAMESPACE,
    ROOT,
    Obj,
    container,
    mounted_files,
    of_kind,
    render,
    workloads,
)


# -- (a) renders --------------------------------------------------------------------------
def test_each_kustomization_renders_the_whole_installation(objects: tuple[Obj, ...]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Namespace", NAMESPACE) in kinds
    assert ("DaemonSet", "vm-manager") in kinds
    for name in ("pool-manager", "executor", "monitor", "e2b-gateway"):
        assert ("Deployment", name) in kinds
        assert ("Service", name) in kinds
    assert ("Service", "vm-manager") in kinds
    for name in NAMES:
        assert ("ServiceAccount", name) in kinds
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]


def test_replicas_as_the_design_says() -> None:
    base = of_kind(render("base"), "Deployment")
    assert {n: d["spec"]["replicas"] for n, d in base.items()} == {
        "executor": 2,
        "pool-manager": 1,
        "monitor": 1,
        "e2b-gateway": 2,
    }
    # pool-manager is the single writer of pool targets; monitor of the audit log.
    for single in ("pool-manager", "monitor"):
        for objs in (render("base"), render("example")):
            deployment = of_kind(objs, "Deployment")[single]
            assert deployment["spec"]["replicas"] == 1
            assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_the_image_is_this_version_in_base_and_overridable() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for c in map(container, workloads(render("base")).values()):
        assert c["image"] == f"{IMAGE}:{version}"
    images = {container(w)["image"] for w in workloads(render("example")).values()}
    kustomization = yaml.safe_load((KUSTOMIZATIONS["example"] / "kustomization.yaml").read_text())
    (override,) = kustomization["images"]
    assert override["name"] == IMAGE
    assert images == {f"{override['newName']}:{override['newTag']}"}


# -- (b) schemas ---------------------------------------------------------------------------
@functools.cache
def cert_manager_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads(CERT_MANAGER_SCHEMA.read_text())
    if kind not in schema["$defs"] or kind == "metadata":
        pytest.fail(f"cert-manager.io/v1 {kind}: not in {CERT_MANAGER_SCHEMA}; describe it there")
    sub = {**schema["$defs"][kind], "$defs": schema["$defs"]}
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(sub)
    return validator


def validation_errors(obj: Obj, version: str) -> list[str]:
    where = f"{obj['kind']} {obj['metadata']['name']}"
    if obj["apiVersion"].split("/")[0] == "cert-manager.io":
        if obj["apiVersion"] != "cert-manager.io/v1":
            return [f"{where}: {obj['apiVersion']} (only cert-manager.io/v1 is described)"]
        errors = cert_manager_validator(obj["kind"]).iter_errors(obj)
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}; a kind without a schema is not valid here"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_strict_validation(objects: tuple[Obj, ...], version: str) -> None:
    errors = [e for o in objects for e in validation_errors(o, version)]
    assert not errors, "\n".join(errors)


def test_the_overlay_validates_its_cert_manager_objects() -> None:
    """The CRD branch above is exercised, and its schema is strict."""
    objs = render("example")
    crds = [o for o in objs if o["apiVersion"].startswith("cert-manager.io/")]
    assert {o["kind"] for o in crds} == {"Issuer", "Certificate"}
    cert = next(o for o in crds if o["kind"] == "Certificate")
    typo = {**cert, "spec": {**cert["spec"], "dnsName": ["x"]}}
    assert validation_errors(typo, KUBERNETES_VERSIONS[-1])
    bad_usage = {**cert, "spec": {**cert["spec"], "usages": ["server-auth"]}}
    assert validation_errors(bad_usage, KUBERNETES_VERSIONS[-1])
    deployment = of_kind(objs, "Deployment")["executor"]
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    assert validation_errors(typo, KUBERNETES_VERSIONS[-1])


# -- cert-manager (the overlay) ------------------------------------------------------------
def test_the_overlay_issues_each_identity_as_tls_py_expects() -> None:
    objs = render("example")
    certificates = {
        c["spec"]["secretName"]: c["spec"] for c in of_kind(objs, "Certificate").values()
    }
    issuers = of_kind(objs, "Issuer")
    mounted = {
        name: {v.split("/")[0] for v in mounted_files(w).values()}
        for name, w in workloads(objs).items()
    }
    for who in tls.IDENTITIES:
        spec = certificates[f"agent-vm-tls-{who}"]
        assert spec["commonName"] == tls.common_name(who)
        usages = set(spec["usages"])
        assert "client auth" in usages
        if who in tls.SERVICES:
            assert spec["dnsNames"] == [tls.server_name(who)]
            assert "server auth" in usages
            assert f"agent-vm-tls-{who}" in mounted[who]
        else:
            assert "dnsNames" not in spec
            assert "server auth" not in usages
        # Issued by the installation's CA: a CA issuer whose Secret is a CA certificate.
        issuer = issuers[spec["issuerRef"]["name"]]["spec"]
        assert certificates[issuer["ca"]["secretName"]]["isCA"] is True
    # The gateway's HTTPS certificate names the Service clients reach in the cluster.
    http = certificates["agent-vm-e2b-http"]
    assert "e2b-gateway.agent-vm.svc" in http["dnsNames"]
    assert "agent-vm-e2b-http" in mounted["e2b-gateway"]
