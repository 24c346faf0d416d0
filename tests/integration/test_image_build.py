"""Images built from specs on real VMs (vm_manager/spec_build.py, spec_fetch.py).

``coder`` (images/coder.toml) is built once per session (conftest's
``coder_image``); its fetched packages and layers are cached across runs
under the cache directory. ``coder-plus`` shares coder's root and pip steps
and adds an npm package, a copied file and a run step: building it after
coder shows that only the steps after the shared ones run.
"""

from __future__ import annotations

import secrets

import grpc
import pytest

from agentvm.v1 import vm_manager_pb2
from tests.imagebuild import CODER_SPEC, build, spec_source
from tests.vmharness import REPO, VMFactory, VMManagerProcess, execute, leftovers, new_leftovers

pytestmark = pytest.mark.vm

PLUS_SPEC = REPO / "tests" / "images" / "coder-plus.toml"


def test_coder_has_the_tools_coding_agents_use(
    vmm: VMManagerProcess, factory: VMFactory, coder_image: vm_manager_pb2.Image
) -> None:
    assert coder_image.kind == vm_manager_pb2.IMAGE_KIND_SPEC
    assert "coder" in coder_image.names
    assert any(p.startswith("git=") for p in coder_image.packages)
    assert any(p.startswith("requests==") for p in coder_image.packages)
    vm = factory.wait_ready(factory.create(image="coder").name)
    r = execute(
        vm.agent_endpoint,
        "set -e; pwd; echo $LANG; git config --system init.defaultBranch; "
        "for t in git curl node npm make gcc python3; do command -v $t; done; "
        "python -c 'import requests, yaml, pytest; print(requests.__version__)'; "
        "echo 'int main(void){return 42;}' > /tmp/t.c && gcc /tmp/t.c -o /tmp/t; "
        "/tmp/t || echo exit=$?",
        timeout=120,
    )
    assert r.status.exit_code == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[:3] == ["/workspace/work", "C.UTF-8", "main"], lines
    assert lines[3:10] == [
        "/usr/bin/git",
        "/usr/bin/curl",
        "/usr/bin/node",
        "/usr/bin/npm",
        "/usr/bin/make",
        "/usr/bin/gcc",
        "/opt/venv/bin/python3",  # the spec's venv is first on PATH
    ], lines
    assert lines[10:] == ["2.32.3", "exit=42"], lines


def test_a_build_after_coder_reuses_its_steps_and_runs_the_rest(
    vmm: VMManagerProcess, factory: VMFactory, coder_image: vm_manager_pb2.Image
) -> None:
    # The build cache outlives test runs: a marker new to this run makes the run
    # step new, so it must be built while coder's pip layer is reused.
    marker = f"run-{secrets.token_hex(4)}"
    last = '"semver 1.2.3 -i minor > /etc/next-version"'
    text = PLUS_SPEC.read_text()
    assert text.count(last) == 1
    text = text.replace(last, last[:-1] + f' && echo {marker} > /etc/m"')
    built = build(vmm, spec_source(PLUS_SPEC, text))
    assert built.image is not None
    assert built.image.id != coder_image.id
    assert built.cached("pip")  # coder's layer: same root, same wheels
    assert not built.cached("run 1/1")
    vm = factory.wait_ready(factory.create(image="coder-plus").name)
    r = execute(
        vm.agent_endpoint,
        "cat /etc/next-version /etc/m; stat -c '%a %U' /etc/motd; cat /etc/motd; "
        "semver 2.0.0 -i major",
    )
    assert r.status.exit_code == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        "1.3.0",
        marker,
        "640 root",
        "built by agent-vm from a spec",
        "3.0.0",
    ]
    factory.destroy(vm.name)
    # A second build of the same spec runs nothing and gives the same image.
    again = build(vmm, spec_source(PLUS_SPEC, text))
    assert again.image is not None
    assert again.image.id == built.image.id
    assert all(p.cached for p in again.progress if p.phase.startswith("run"))


def test_a_failing_build_step_names_its_output_and_exit_code_and_registers_nothing(
    vmm: VMManagerProcess, coder_image: vm_manager_pb2.Image
) -> None:
    toml = CODER_SPEC.read_text().replace('name = "coder"', 'name = "broken"')
    toml = toml.replace("run = [", 'run = [\n    "echo about to fail; echo oops >&2; exit 3",', 1)
    before = vmm.stub().ListImages(vm_manager_pb2.ListImagesRequest()).images
    left_before = leftovers(vmm)
    with pytest.raises(grpc.RpcError) as err:
        build(vmm, spec_source(CODER_SPEC, toml))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "exit code 3" in details, details
    assert "about to fail" in details, details
    assert "coder.toml" in details, details
    after = vmm.stub().ListImages(vm_manager_pb2.ListImagesRequest()).images
    assert [i.id for i in after] == [i.id for i in before]
    assert not new_leftovers(vmm, left_before)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("disk_gib = 8", "disk_gib = 8\ncolour = 'blue'"), "colour"),
        (("disk_gib = 8", "disk_gib = '8'"), "disk_gib"),
    ],
)
def test_a_spec_with_an_unknown_field_or_a_wrong_type_is_refused_naming_it(
    vmm: VMManagerProcess, edit: tuple[str, str], named: str
) -> None:
    toml = CODER_SPEC.read_text().replace(*edit)
    source = vm_manager_pb2.ImageSpecSource(toml=toml, filename="coder.toml")
    with pytest.raises(grpc.RpcError) as err:
        build(vmm, source)
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "coder.toml" in details, details
    assert named in details, details
