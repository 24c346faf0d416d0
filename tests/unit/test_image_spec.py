"""Image specs are parsed strictly: every mistake names file, field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentvm.common import image_spec
from agentvm.common.image_spec import ImageSpecError, parse, parse_file

REPO = Path(__file__).resolve().parents[2]


def spec(tmp_path: Path, text: str) -> image_spec.ImageSpec:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return parse_file(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ImageSpecError) as err:
        spec(tmp_path, text)
    assert str(tmp_path / "spec.toml") in err.value.message
    return err.value.message


def test_the_shipped_coder_spec_parses() -> None:
    coder = parse_file(REPO / "images" / "coder.toml")
    assert coder.name == "coder"
    assert {"git", "nodejs", "npm", "gcc", "make", "python3-venv", "curl"} <= set(coder.apt)
    assert coder.pip_venv == "/opt/venv"
    assert coder.env["PATH"].startswith("/opt/venv/bin:")
    assert coder.disk_gib == 8


def test_every_field(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "gitconfig").write_text("[user]\n")
    s = spec(
        tmp_path,
        """
name = "mine:1"
disk_gib = 4
apt = ["git", "nodejs=18.19.0+dfsg-6~deb12u2"]
npm = ["typescript@5.6.3", "@scope/pkg"]
run = ["echo hi"]
workdir = "/srv/app/"
user = "1000:1000"
cmd = ["node", "main.js"]
[pip]
packages = ["requests==2.32.3", "pyyaml>=6; python_version >= '3.8'"]
venv = "/opt/venv"
[env]
LANG = "C.UTF-8"
[[files]]
src = "conf/gitconfig"
dest = "/root/.gitconfig"
mode = "0600"
""",
    )
    assert s.name == "mine:1"
    assert s.apt == ("git", "nodejs=18.19.0+dfsg-6~deb12u2")
    assert s.npm == ("typescript@5.6.3", "@scope/pkg")
    assert s.workdir == "/srv/app"
    assert s.files[0].src == (tmp_path / "conf" / "gitconfig").resolve()
    assert s.files[0].dest == "/root/.gitconfig"
    assert s.files[0].mode == 0o600
    assert s.env == {"LANG": "C.UTF-8"}
    assert s.cmd == ("node", "main.js")


def test_an_empty_spec_is_the_default_base(tmp_path: Path) -> None:
    s = spec(tmp_path, "")
    assert (s.base, s.disk_gib, s.apt, s.files) == ("debian:bookworm", 8, (), ())


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("packages = ['git']", "unknown field packages; allowed: name, base"),
        (
            "[pip]\npackage = ['x']",
            "unknown field [pip].package; allowed: [pip].packages, [pip].venv",
        ),
        ("[[files]]\nsrc='a'\ndest='/a'\nowner='me'", "unknown field files[0].owner"),
        ("apt = 'git'", "apt must be a list of strings, not a string ('git')"),
        ("apt = ['git', 3]", "apt[1] must be a string, not an integer (3)"),
        ("disk_gib = '8'", "disk_gib must be an integer (GiB), not a string ('8')"),
        ("disk_gib = true", "disk_gib must be an integer (GiB), not a boolean (True)"),
        ("disk_gib = 0", "disk_gib = '0': expected 1 to 256"),
        ("base = 'alpine'", "base = 'alpine': expected debian:bookworm"),
        ("name = 'Coder!'", "name = 'Coder!'"),
        ("apt = ['git; rm -rf /']", "apt[0] = 'git; rm -rf /': expected a Debian package name"),
        ("npm = ['../evil']", "npm[0] = '../evil': expected an npm package name"),
        ("[pip]\npackages = ['requests===']", "[pip].packages[0] = 'requests==='"),
        ("[pip]\npackages = ['x @ file:///etc/passwd']", "a requirement from an index"),
        ("[pip]\nvenv = 'venv'", "[pip].venv = 'venv': expected an absolute path"),
        ("pip = 3", "[pip] must be a table"),
        ("[env]\n'A-B' = 'x'", "[env].A-B = 'A-B': expected a variable name"),
        ("[env]\nA = 1", "[env].A must be a string, not an integer (1)"),
        ("workdir = '/a/../b'", "workdir = '/a/../b': expected a path without '..'"),
        ("user = 'root; id'", "user = 'root; id'"),
        ("files = 'x'", "[[files]] must be an array of tables"),
        ("[[files]]\nsrc = 'x'", "files[0] needs both src and dest"),
        ("apt = [", "not valid TOML"),
        ("base = 'image:Bad Name'", "base = 'image:Bad Name': expected debian:bookworm, or image:"),
        ("base = 'ubuntu'", "base = 'ubuntu': expected debian:bookworm, or image:NAME"),
        ("base = 'image:busybox'\napt = ['git']", 'apt needs base = "debian:bookworm"'),
    ],
)
def test_mistakes_name_the_field_and_what_is_allowed(tmp_path: Path, text: str, says: str) -> None:
    assert says in error(tmp_path, text)


@pytest.mark.parametrize(
    ("src", "dest", "says"),
    [
        ("../outside", "/x", "files[0].src = '../outside': expected a path inside the spec's"),
        ("/etc/shadow", "/x", "files[0].src = '/etc/shadow': expected a path inside"),
        ("link-out", "/x", "files[0].src = 'link-out': expected a path inside"),
        ("missing", "/x", "files[0].src = 'missing': expected an existing file"),
        ("ok", "relative", "files[0].dest = 'relative': expected an absolute path"),
        ("ok", "/proc/x", "files[0].dest = '/proc/x': expected a path outside /proc"),
        ("ok", "/run/agentvm/agent.sock", "expected a path outside"),
        ("ok", "/workspace", "expected a path outside"),
        ("ok", "/", "expected a path outside"),
    ],
)
def test_files_stay_in_the_spec_directory_and_out_of_the_guests_places(
    tmp_path: Path, src: str, dest: str, says: str
) -> None:
    (tmp_path / "ok").write_text("x")
    (tmp_path / "link-out").symlink_to("/etc/hostname")
    assert says in error(tmp_path, f"[[files]]\nsrc = '{src}'\ndest = '{dest}'\n")


def test_a_missing_or_unreadable_spec_says_so(tmp_path: Path) -> None:
    with pytest.raises(ImageSpecError, match="no such spec file"):
        parse_file(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ImageSpecError, match="cannot read the spec"):
        parse_file(tmp_path / "bin.toml")
    with pytest.raises(ImageSpecError, match="not valid TOML"):
        parse("= 1", tmp_path / "x.toml")


def test_every_documented_example_parses(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "IMAGES.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```toml\n")[1:]]
    assert len(blocks) >= 7, "docs/IMAGES.md lost its per-feature examples"
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "motd").write_text("hi")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "a.conf").write_text("")
    parsed = [
        spec(tmp_path, b if b.lstrip().startswith("name") else 'name = "doc"\n' + b) for b in blocks
    ]
    assert parsed[0].name == "coder"
    merged = {f.dest for p in parsed for f in p.files}
    assert {"/etc/motd", "/etc/myapp"} <= merged
    assert any(p.pip == ("requests==2.32.3", "pyyaml==6.0.2") for p in parsed)
    assert any(p.run for p in parsed)


@pytest.mark.parametrize("ref", ["busybox", "busybox:1.36", "0123456789abcdef" * 4])
def test_a_stored_image_can_be_the_base(tmp_path: Path, ref: str) -> None:
    s = spec(tmp_path, f'base = "image:{ref}"\nrun = ["true"]')
    assert s.base_image == ref
    assert spec(tmp_path, "").base_image == ""
