"""Workspace listings and removals against trees a hostile guest builds (issue 22, items 3, 7).

``agentvm_guest.paths`` runs on the host inside shared workspaces, where the
guest can build any tree and change it at any moment: a listing must stay
bounded (entries, path bytes, depth, PATH_MAX) and iterative, and a
recursive removal must never open anything but a directory it reached by
a descriptor of its parent (never a symlink's target, never a FIFO).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentvm_guest import paths

LONG = "d" * 255


def nest(root: Path, name: str, levels: int) -> int:
    """Make ``levels`` nested directories named ``name`` under root; the deepest's descriptor."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def reference_listing(root: Path, rel: str = "") -> list[str]:
    """The order the listing promises: depth first, sorted by name (small trees only)."""
    out: list[str] = []
    for name in sorted(os.listdir(root / rel if rel else root)):
        path = f"{rel}/{name}" if rel else name
        out.append(path)
        full = root / path
        if full.is_dir() and not full.is_symlink():
            out.extend(reference_listing(root, path))
    return out


def test_listing_order_and_content_are_unchanged(tmp_path: Path) -> None:
    for p in ("b/x/1", "b/x/2", "a", "c/d/e/f", "b/y"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text(p)
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / (paths.TMP_PREFIX + "x")).write_text("hidden")
    got = paths.list_dir(str(tmp_path), recursive=True)
    want = [p for p in reference_listing(tmp_path) if not p.startswith(paths.TMP_PREFIX)]
    assert [e.path for e in got] == want
    link = next(e for e in got if e.path == "link")
    assert stat.S_ISLNK(link.mode)
    assert [e.path for e in paths.list_dir(str(tmp_path), "b")] == ["b/x", "b/y"]
    assert [e.path for e in paths.list_dir(str(tmp_path), "b", recursive=True)] == [
        "b/x",
        "b/x/1",
        "b/x/2",
        "b/y",
    ]


def test_long_deep_names_are_refused_at_path_max_in_bounded_memory(deep_tmp: Path) -> None:
    """The reported attack: 700 levels of 255-byte names and 1,500 files at the bottom.

    Before: every file's path (179 KB each) was built, 1.5 GiB in the executor.
    Now: the walk stops where a path would pass PATH_MAX, having built nothing longer.
    """
    fd = nest(deep_tmp, LONG, 700)
    try:
        for i in range(1500):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    before = open_fds()
    tracemalloc.start()
    try:
        with pytest.raises(paths.LimitError, match=r"longer than 4096 bytes \(PATH_MAX\)"):
            paths.list_dir(str(deep_tmp), recursive=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"listing peaked at {peak} bytes"
    assert open_fds() == before
    # Non-recursive still works.
    assert [e.path for e in paths.list_dir(str(deep_tmp))] == [LONG]


def test_deep_short_names_hit_the_depth_limit_without_recursion_error(deep_tmp: Path) -> None:
    """1,200 levels (past Python's recursion limit): a clear LimitError, not RecursionError."""
    os.close(nest(deep_tmp, "d", 1200))
    before = open_fds()
    with pytest.raises(paths.LimitError, match=r"more than 256 levels deep"):
        paths.list_dir(str(deep_tmp), recursive=True)
    assert open_fds() == before
    entries = paths.list_dir(str(deep_tmp), recursive=True, max_depth=2000)
    assert len(entries) == 1200
    assert open_fds() == before


def test_wide_trees_hit_the_entry_and_byte_limits(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    for i in range(300):
        (tmp_path / "w" / f"{i:03d}{'n' * 200}").touch()
    before = open_fds()
    for _ in range(5):  # refused at the top directory: its descriptor is closed too
        with pytest.raises(paths.LimitError, match="more than 100 entries"):
            paths.list_dir(str(tmp_path), "w", recursive=True, limit=100)
    assert open_fds() == before
    with pytest.raises(paths.LimitError, match="more than 100 entries"):
        paths.list_dir(str(tmp_path), recursive=True, limit=100)
    with pytest.raises(paths.LimitError, match="more than 100 entries"):
        paths.list_dir(str(tmp_path), "w", limit=100)
    with pytest.raises(paths.LimitError, match="passes 20000 bytes of path names"):
        paths.list_dir(str(tmp_path), recursive=True, max_bytes=20_000)
    assert len(paths.list_dir(str(tmp_path), recursive=True)) == 301


def test_default_limits_are_what_the_documentation_states() -> None:
    assert paths.MAX_PATH == 4096
    assert paths.MAX_LIST_ENTRIES == 100_000
    assert paths.MAX_LIST_DEPTH == 256
    assert paths.MAX_LIST_BYTES == 8 * 2**20


# -- sparse and oversized files ----------------------------------------------------
def test_sparse_and_oversized_files_are_refused_before_the_first_byte(tmp_path: Path) -> None:
    with open(tmp_path / "huge", "wb") as fh:
        fh.truncate(15 * 2**40)  # 15 TiB, no disk
    (tmp_path / "small").write_bytes(b"x" * 1000)
    with pytest.raises(paths.SparseError, match="is sparse"):
        next(paths.read_chunks(str(tmp_path), "huge", refuse_sparse=True))
    with pytest.raises(paths.LimitError, match="over the limit of 100 bytes"):
        next(paths.read_chunks(str(tmp_path), "small", max_bytes=100))
    assert b"".join(d for d, _ in paths.read_chunks(str(tmp_path), "small", max_bytes=1000)) == (
        b"x" * 1000
    )
    # A dense file with a small hole is not "sparse".
    with open(tmp_path / "dense", "wb") as fh:
        fh.write(b"y" * 2**20)
        fh.seek(2**20 + 4096)
        fh.write(b"y")
    assert not paths.is_sparse(os.stat(tmp_path / "dense"))
    assert paths.is_sparse(os.stat(tmp_path / "huge"))


# -- removal -----------------------------------------------------------------------
def test_recursive_remove_of_a_deep_tree_is_iterative_and_bounded(deep_tmp: Path) -> None:
    """1,200 levels of 255-byte names (shutil.rmtree: RecursionError) go, with few descriptors."""
    root = deep_tmp / "ws"
    root.mkdir()
    (root / "top").mkdir()
    fd = nest(root / "top", LONG, 1200)
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.mkfifo("fifo", dir_fd=fd)
    os.symlink("/etc", "link", dir_fd=fd)
    os.close(fd)
    before = open_fds()
    peak = [before]
    real_open = os.open

    def counting_open(*args: Any, **kwargs: Any) -> int:
        peak[0] = max(peak[0], open_fds())
        return real_open(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", counting_open)
        paths.remove(str(root), "top", recursive=True)
    assert os.listdir(root) == []
    assert open_fds() == before
    assert peak[0] - before <= paths.MAX_REMOVE_DEPTH + 4


@contextlib.contextmanager
def swap_on_open(victim: str, swap: Callable[[int], None]) -> Iterator[list[int]]:
    """os.open patched: the first open of ``victim`` first runs ``swap(dir_fd)``.

    That is the guest winning the race at the worst moment: after the remover
    saw a directory, before it opened it. Yields the descriptors' (dev, ino)
    hashes of what was opened by that name.
    """
    real_open = os.open
    opened: list[int] = []
    done = [False]

    def hooked(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == victim and dir_fd is not None and not done[0]:
            done[0] = True
            swap(dir_fd)
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if path == victim:
            st = os.fstat(fd)
            opened.append(hash((st.st_dev, st.st_ino)))
        return fd

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", hooked)
        yield opened


def run_bounded(fn: Callable[[], None], timeout: float = 30.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it is still blocked after ``timeout``."""
    err: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            err.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    return err[0] if err else None if not t.is_alive() else TimeoutError("remove hung")


@pytest.mark.parametrize("depth", ["top", "nested"])
def test_directory_swapped_for_a_symlink_is_never_followed(tmp_path: Path, depth: str) -> None:
    host = tmp_path / "host"  # outside the workspace: the host's own files
    host.mkdir()
    (host / "precious").write_text("keep")
    host_id = hash((host.stat().st_dev, host.stat().st_ino))
    root = tmp_path / "ws"
    (root / "a" / "victim" / "sub").mkdir(parents=True)
    (root / "a" / "victim" / "sub" / "f").write_text("x")

    def swap(dir_fd: int) -> None:
        os.rename("victim", "moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.symlink(str(host), "victim", dir_fd=dir_fd)

    target = "a/victim" if depth == "top" else "a"
    with swap_on_open("victim", swap) as opened:
        err = run_bounded(lambda: paths.remove(str(root), target, recursive=True))
    assert host_id not in opened, "the remover opened a host directory through the symlink"
    assert (host / "precious").read_text() == "keep"
    assert not isinstance(err, TimeoutError)
    assert not (root / "a" / "victim").is_symlink() or depth == "nested"
    if depth == "nested":
        assert err is None
        assert not (root / "a").exists()


@pytest.mark.parametrize("depth", ["top", "nested"])
def test_directory_swapped_for_a_fifo_does_not_hang_the_remover(tmp_path: Path, depth: str) -> None:
    root = tmp_path / "ws"
    (root / "a" / "victim").mkdir(parents=True)
    (root / "a" / "victim" / "f").write_text("x")
    fifo = root / "a" / "victim"

    def swap(dir_fd: int) -> None:
        os.rename("victim", "moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.mkfifo("victim", dir_fd=dir_fd)

    target = "a/victim" if depth == "top" else "a"
    try:
        with swap_on_open("victim", swap):
            err = run_bounded(lambda: paths.remove(str(root), target, recursive=True), 20.0)
        assert not isinstance(err, TimeoutError), "the remover blocked opening a FIFO"
        assert err is None
        assert not fifo.exists()
    finally:
        # Release a remover blocked in open() (only without the fix).
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_remove_racing_a_guest_that_flips_directory_and_symlink(tmp_path: Path) -> None:
    """A real race: a thread flips ``ws/t/v`` between a directory and a link to a host dir."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "precious").write_text("keep")
    root = tmp_path / "ws"
    root.mkdir()
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            v = root / "t" / "v"
            with contextlib.suppress(OSError):
                if not v.is_symlink() and not v.exists():
                    v.mkdir()
                elif v.is_symlink():
                    v.unlink()
                    v.mkdir()
                    (v / "x").mkdir()
                else:
                    tmp = root / "t" / "tmp-link"
                    tmp.symlink_to(host)
                    tmp.replace(v)

    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                (root / "t").mkdir()
            err = run_bounded(lambda: paths.remove(str(root), "t", recursive=True), 20.0)
            assert not isinstance(err, TimeoutError)
            assert err is None or isinstance(err, (paths.PathError, FileNotFoundError)), err
    finally:
        stop.set()
        t.join(10)
    assert (host / "precious").read_text() == "keep"
