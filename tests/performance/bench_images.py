"""Benchmark: named images (issue 15): building `coder`, its size, booting it, importing OCI.

Run (real VMs; take the VM-tests lock for the whole run):
    flock /tmp/vmtests.lock .venv/bin/python -m tests.performance.bench_images [--boots 5]

Starts a vm-manager of its own (test dirs and VM prefix, its own image store;
the build cache is the installation's, AGENTVM_CACHE_DIR, shared with the
built-in guest image) and prints one JSON object:

* ``coder_build_s``: images/coder.toml built
  - ``cold``: every step of coder's chain uncached. The step directories
    (``CACHE/build/<key>/``: the host's root, pip and npm steps and the
    in-VM layers, keys computed as spec_fetch/spec_build compute them) are
    moved aside first and put back if the build fails; the build writes them
    again. The host fetches from the network (Debian mirror, PyPI).
  - ``warm``: the same spec again, the image already in the store (nothing
    runs: the image id is found and tagged).
  - ``no_cache``: BuildImageRequest(no_cache=True). It re-runs only the
    in-VM layers; the host's fetch steps come from the cache, and as the
    image id is unchanged nothing is compressed or stored again.
  - ``last_run_step_changed``: the spec with its last ``run`` command edited
    (a fresh one each run): one build VM for that layer, then the compression.
  each with the time between consecutive progress events (per phase).
* ``coder_image``: size_bytes (the compressed root.qcow2), content_bytes,
  disk_bytes; the built-in image's file size beside it.
* ``boot``: cold create-to-ready of a VM of the built-in image and of `coder`
  (standard profile, ISOLATED), interleaved, and the first ``Execute(['true'])``
  on a new channel once READY (a coder VM also mounts its image root,
  ConfigureRoot, before it is READY).
* ``oci_import_s``: ImportImage of tests/ociimages.py's busybox image
  (oci-archive, two layers), then of the same archive again (deduplicated).

Every figure comes with a baseline measured in the same run (a host
``subprocess.run(['true'])``, or the built-in image), because these machines
are noisy; the ratios are what to compare between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentvm.common import image_spec
from agentvm.common.config import Settings
from agentvm.v1 import common_pb2, vm_manager_pb2
from agentvm.vm_manager import spec_build, spec_fetch
from tests.imagebuild import BUILD_TIMEOUT_S, CODER_SPEC, spec_source
from tests.ociimages import busybox_image
from tests.performance.bench_boot import host_true
from tests.vmharness import BOOT_TIMEOUT_S, VMManagerProcess, execute, lone_vmm_process


@dataclass
class Timed:
    """One BuildImage or ImportImage call: wall time, per-phase times, the image."""

    seconds: float = 0.0
    image: vm_manager_pb2.Image | None = None
    # (phase, cached, seconds from its progress event to the next event or the end)
    phases: list[tuple[str, bool, float]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.seconds, 2),
            "phases": [
                {"phase": p, "cached": c, "s": round(s, 2)} for p, c, s in self.phases if s >= 0.05
            ],
        }


def _phases(marks: list[tuple[float, str, bool]], end: float) -> list[tuple[str, bool, float]]:
    out = []
    for i, (t, phase, cached) in enumerate(marks):
        nxt = marks[i + 1][0] if i + 1 < len(marks) else end
        out.append((phase, cached, nxt - t))
    return out


def progress(figures: dict[str, Any]) -> None:
    """The figures so far, on stderr (a later failure does not lose them)."""
    sys.stderr.write(f"[figures so far] {json.dumps(figures)}\n")


def build(
    vmm: VMManagerProcess,
    source: vm_manager_pb2.ImageSpecSource,
    name: str,
    *,
    no_cache: bool = False,
) -> Timed:
    out = Timed()
    marks: list[tuple[float, str, bool]] = []
    req = vm_manager_pb2.BuildImageRequest(spec=source, name=name, no_cache=no_cache)
    t0 = time.perf_counter()
    for ev in vmm.stub().BuildImage(req, timeout=BUILD_TIMEOUT_S):
        if ev.HasField("log_line"):
            sys.stderr.write(f"[build] {ev.log_line}\n")
        elif ev.HasField("progress"):
            p = ev.progress
            phase = f"{p.phase} {p.done}/{p.total}" if p.phase == "fetch" else p.phase
            marks.append((time.perf_counter(), phase, p.cached))
        else:
            out.image = ev.image
    end = time.perf_counter()
    out.seconds = end - t0
    out.phases = _phases(marks, end)
    assert out.image is not None, "BuildImage ended without an image"
    return out


def import_image(vmm: VMManagerProcess, ref: str, name: str) -> Timed:
    out = Timed()
    marks: list[tuple[float, str, bool]] = []
    req = vm_manager_pb2.ImportImageRequest(ref=ref, name=name)
    t0 = time.perf_counter()
    for ev in vmm.stub().ImportImage(req, timeout=BUILD_TIMEOUT_S):
        if ev.HasField("progress"):
            marks.append((time.perf_counter(), ev.progress.phase, ev.progress.cached))
        else:
            out.image = ev.image
    end = time.perf_counter()
    out.seconds = end - t0
    out.phases = _phases(marks, end)
    assert out.image is not None, "ImportImage ended without an image"
    return out


def step_keys(spec: image_spec.ImageSpec, cache_dir: Path) -> list[str]:
    """Keys of every step of ``spec``'s build chain, in order (the last is the image's digest).

    The host steps' keys are spec_fetch's; the in-VM layers' are chained from
    spec_build.layers_of as SpecBuilder.run chains them. layers_of needs the
    host steps' results: they are taken from the cache (built first if they
    are not there; the cold build moves them aside anyway).
    """
    root = spec_fetch.root_step(spec, cache_dir, _quiet)
    pip = spec_fetch.pip_step(spec, cache_dir, _quiet)
    npm = spec_fetch.npm_step(spec, cache_dir, _quiet)
    keys = [root.key, pip.key, npm.key]
    key = root.key
    for layer in spec_build.layers_of(spec, pip, npm):
        key = spec_build._key(key, layer.inputs)
        keys.append(key)
    return keys


def _quiet(_line: str) -> None:
    pass


def cold_build(vmm: VMManagerProcess, cache_dir: Path) -> tuple[Timed, list[str]]:
    """coder built with none of its steps cached; the steps it had are put back on failure."""
    spec = image_spec.parse(CODER_SPEC.read_text(), CODER_SPEC)
    keys = step_keys(spec, cache_dir)
    build_dir = cache_dir / "build"
    aside = build_dir / f".bench-aside-{secrets.token_hex(4)}"
    aside.mkdir(parents=True)
    moved = []
    try:
        for key in keys:
            if (build_dir / key).exists():
                (build_dir / key).rename(aside / key)
                moved.append(key)
        timed = build(vmm, spec_source(CODER_SPEC), "coder")
        assert timed.image is not None
        # The keys computed here are the ones the build used: its digest is the last.
        assert timed.image.digest == "sha256:" + keys[-1], (timed.image.digest, keys[-1])
        assert all(c is False for _p, c, _s in timed.phases), timed.phases
    except BaseException:
        for key in moved:
            if not (build_dir / key).exists():
                (aside / key).rename(build_dir / key)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return timed, moved


def edited_last_step(spec_text: str, marker: str) -> str:
    spec = image_spec.parse(spec_text, CODER_SPEC)
    last = spec.run[-1]
    quoted = json.dumps(last)
    assert spec_text.count(quoted) == 1, f"cannot find {quoted} once in {CODER_SPEC}"
    return spec_text.replace(quoted, json.dumps(f"{last} && echo {marker}"))


def boots(vmm: VMManagerProcess, n: int) -> dict[str, Any]:
    """n cold boots of each image, interleaved (the order alternates), and the first Execute."""
    stub = vmm.stub()
    ready: dict[str, list[float]] = {"default": [], "coder": []}
    first_exec: dict[str, list[float]] = {"default": [], "coder": []}
    for i in range(n):
        order = ["default", "coder"] if i % 2 == 0 else ["coder", "default"]
        for which in order:
            t0 = time.perf_counter()
            vm = stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    image="" if which == "default" else "coder",
                    profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                    network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                    start=True,
                    labels={"bench": "images"},
                ),
                timeout=BOOT_TIMEOUT_S,
            ).vm
            try:
                req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
                vm = stub.WaitVM(req, timeout=BOOT_TIMEOUT_S).vm
                ready[which].append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                res = execute(vm.agent_endpoint, ["true"])
                first_exec[which].append(time.perf_counter() - t1)
                assert res.status.exit_code == 0, res
            finally:
                stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)
    return _summary(ready, first_exec)


def _summary(ready: dict[str, list[float]], first_exec: dict[str, list[float]]) -> dict[str, Any]:
    """Per image: the create-to-ready and first-Execute times, and coder / default."""
    out: dict[str, Any] = {}
    for which in ("default", "coder"):
        out[which] = {
            "n": len(ready[which]),
            "create_to_ready_s_p50": round(statistics.median(ready[which]), 3),
            "create_to_ready_s": [round(x, 3) for x in ready[which]],
            "first_exec_true_ms_p50": round(statistics.median(first_exec[which]) * 1000, 1),
            "first_exec_true_ms": [round(x * 1000, 1) for x in first_exec[which]],
        }
    out["coder_over_default_ready_p50"] = round(
        out["coder"]["create_to_ready_s_p50"] / out["default"]["create_to_ready_s_p50"], 3
    )
    out["coder_over_default_first_exec_p50"] = round(
        out["coder"]["first_exec_true_ms_p50"] / out["default"]["first_exec_true_ms_p50"], 3
    )
    return out


def template_restores(vmm: VMManagerProcess, n: int) -> dict[str, Any]:
    """A memory template of each image, then n clones of each, interleaved (the
    order alternates): CreateVM(from_template) to READY, and the first Execute."""
    stub = vmm.stub()
    keys = {}
    for which in ("default", "coder"):
        req = vm_manager_pb2.PrepareTemplateRequest(
            image="" if which == "default" else "coder",
            profile=common_pb2.RESOURCE_PROFILE_STANDARD,
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        )
        keys[which] = stub.PrepareTemplate(req, timeout=BOOT_TIMEOUT_S * 2).template.key
    ready: dict[str, list[float]] = {"default": [], "coder": []}
    first_exec: dict[str, list[float]] = {"default": [], "coder": []}
    try:
        for i in range(n):
            order = ["default", "coder"] if i % 2 == 0 else ["coder", "default"]
            for which in order:
                t0 = time.perf_counter()
                vm = stub.CreateVM(
                    vm_manager_pb2.CreateVMRequest(
                        image="" if which == "default" else "coder",
                        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                        from_template=True,
                        labels={"bench": "images"},
                    ),
                    timeout=BOOT_TIMEOUT_S,
                ).vm
                try:
                    assert vm.from_template, vm
                    assert vm.state == common_pb2.VM_STATE_READY, vm
                    ready[which].append(time.perf_counter() - t0)
                    t1 = time.perf_counter()
                    res = execute(vm.agent_endpoint, ["true"])
                    first_exec[which].append(time.perf_counter() - t1)
                    assert res.status.exit_code == 0, res
                finally:
                    stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)
    finally:
        for key in keys.values():
            stub.DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=key), timeout=60)
    return _summary(ready, first_exec)


def run(vmm: VMManagerProcess, *, n_boots: int, cold: bool, no_cache: bool) -> dict[str, Any]:
    cache_dir = Settings().cache_dir
    stub = vmm.stub()
    host = stub.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=10)
    builtin = stub.GetImage(vm_manager_pb2.GetImageRequest(), timeout=30)
    assert builtin.present, "the built-in image is not built: run `agent-vm image build`"
    figures: dict[str, Any] = {
        "machine": {
            "accelerator": common_pb2.Accelerator.Name(host.accelerator),
            "cpus": os.cpu_count(),
            "libvirt": host.libvirt_version,
            "qemu": host.qemu_version,
        },
    }
    build_figs: dict[str, Any] = {}
    spec_text = CODER_SPEC.read_text()
    if cold:
        timed, moved = cold_build(vmm, cache_dir)
        build_figs["cold"] = {**timed.figures(), "steps_moved_aside": len(moved)}
        progress({"coder_build_s": build_figs})
    else:
        timed = build(vmm, spec_source(CODER_SPEC), "coder")
        build_figs["first_in_this_store"] = timed.figures()
    coder = timed.image
    assert coder is not None
    warm = build(vmm, spec_source(CODER_SPEC), "coder")
    assert warm.image is not None
    assert warm.image.id == coder.id
    build_figs["warm"] = warm.figures()
    if no_cache:
        nc = build(vmm, spec_source(CODER_SPEC), "coder", no_cache=True)
        assert nc.image is not None
        assert nc.image.id == coder.id
        build_figs["no_cache"] = nc.figures()
    marker = f"bench-{secrets.token_hex(4)}"
    edited = edited_last_step(spec_text, marker)
    edit = build(vmm, spec_source(CODER_SPEC, edited), "coder-edited")
    assert edit.image is not None
    assert edit.image.id != coder.id
    build_figs["last_run_step_changed"] = edit.figures()
    # That layer is of no use to anyone after this run.
    shutil.rmtree(cache_dir / "build" / edit.image.digest.removeprefix("sha256:"))
    vmm.stub().DeleteImage(vm_manager_pb2.DeleteImageRequest(name="coder-edited"), timeout=60)
    figures["coder_build_s"] = build_figs
    progress(figures)
    figures["coder_image"] = {
        "size_bytes": coder.size_bytes,
        "content_bytes": coder.content_bytes,
        "disk_bytes": coder.disk_bytes,
        "size_mib": round(coder.size_bytes / 2**20, 1),
        "content_mib": round(coder.content_bytes / 2**20, 1),
        "disk_mib": round(coder.disk_bytes / 2**20, 1),
        # The built-in image's proto has no size; its path is a directory (kernel,
        # initrd, rootfs.qcow2): the compressed root is the figure to compare.
        "builtin_rootfs_qcow2_mib": round(
            (Path(builtin.image.path) / "rootfs.qcow2").stat().st_size / 2**20, 1
        ),
    }
    figures["boot"] = boots(vmm, n_boots)
    progress(figures)
    figures["template_restore"] = template_restores(vmm, n_boots)
    figures["template_restore"]["default_restore_over_default_cold_boot_p50"] = round(
        figures["template_restore"]["default"]["create_to_ready_s_p50"]
        / figures["boot"]["default"]["create_to_ready_s_p50"],
        3,
    )
    progress(figures)
    oci_dir = vmm.base / "bench-oci"
    oci_dir.mkdir()
    refs = busybox_image(oci_dir)
    first = import_image(vmm, refs["oci-archive"], "busybox")
    again = import_image(vmm, refs["oci-archive"], "busybox")
    assert first.image is not None
    assert again.image is not None
    assert again.image.id == first.image.id
    figures["oci_import_s"] = {
        "busybox_first": first.figures(),
        "busybox_reimport_deduplicated": again.figures(),
        "image_size_bytes": first.image.size_bytes,
        "content_bytes": first.image.content_bytes,
        "first_over_reimport": round(first.seconds / again.seconds, 1),
    }
    base = host_true(50)
    base_p50 = statistics.median(base)
    figures["host_subprocess_true_ms"] = {"p50": round(base_p50 * 1000, 3)}
    figures["ratios"] = {
        "default_ready_p50_over_host_true": round(
            figures["boot"]["default"]["create_to_ready_s_p50"] / base_p50
        ),
        "coder_ready_p50_over_host_true": round(
            figures["boot"]["coder"]["create_to_ready_s_p50"] / base_p50
        ),
        "oci_import_over_default_ready": round(
            first.seconds / figures["boot"]["default"]["create_to_ready_s_p50"], 2
        ),
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=5, help="cold boots of each image")
    parser.add_argument(
        "--no-cold",
        action="store_true",
        help="keep coder's cached build steps (the first build then takes what is cached)",
    )
    parser.add_argument(
        "--skip-no-cache", action="store_true", help="skip the no_cache=True rebuild"
    )
    parser.add_argument(
        "--templates-only",
        action="store_true",
        help="only template restores of the built-in image and coder (coder from the cache)",
    )
    args = parser.parse_args()
    with lone_vmm_process() as vmm:
        os.environ["AGENTVM_TOKEN_FILE"] = str(vmm.token_file)
        os.environ["AGENTVM_TLS_DIR"] = str(vmm.tls_dir)
        if args.templates_only:
            assert build(vmm, spec_source(CODER_SPEC), "coder").image is not None
            figures = {"template_restore": template_restores(vmm, args.boots)}
        else:
            figures = run(
                vmm, n_boots=args.boots, cold=not args.no_cold, no_cache=not args.skip_no_cache
            )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
