"""`agent-vm e2b`: API keys of the E2B-compatible gateway and the client's environment."""

from __future__ import annotations

import json
import shlex

import click

from agentvm.cli.base import print_table, settings
from agentvm.cli.group import fail
from agentvm.common.config import Settings
from agentvm.e2b_gateway.tenants import DEFAULT_MAX_SANDBOXES, KeyStore, TenantError


def _store() -> KeyStore:
    return KeyStore(settings().state_dir / "e2b" / "keys.json")


@click.group()
def e2b() -> None:
    """The E2B-compatible API (docs/E2B.md): keys and client settings."""


@e2b.group()
def key() -> None:
    """API keys: one tenant per name, stored hashed."""


@key.command("create")
@click.argument("name")
@click.option(
    "--max-sandboxes",
    type=int,
    default=DEFAULT_MAX_SANDBOXES,
    show_default=True,
    help="Sandboxes the tenant may hold at once (applies to all its keys).",
)
def key_create(name: str, max_sandboxes: int) -> None:
    """A new API key for tenant NAME (printed once; only its hash is kept)."""
    try:
        click.echo(_store().create(name, max_sandboxes))
    except TenantError as exc:
        fail(str(exc))


@key.command("rm")
@click.argument("name")
@click.option("--id", "key_id", default="", help="Only the key with this id (`key list`).")
def key_rm(name: str, key_id: str) -> None:
    """Revoke tenant NAME's keys (at once: the gateway re-reads the key file)."""
    try:
        removed = _store().remove(name, key_id)
    except TenantError as exc:
        fail(str(exc))
    click.echo(f"revoked {removed} key{'s' if removed != 1 else ''} of {name}")


@key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def key_list(as_json: bool) -> None:
    """The keys: tenant, id, creation time and the tenant's limit (never the key)."""
    try:
        keys = _store().all_keys()
    except TenantError as exc:
        fail(str(exc))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "tenant": k.tenant,
                        "id": k.key_id,
                        "created_at": k.created_at,
                        "max_sandboxes": k.max_sandboxes,
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
        return
    print_table(
        ("TENANT", "ID", "CREATED", "MAX SANDBOXES"),
        [(k.tenant, k.key_id, k.created_at, k.max_sandboxes) for k in keys],
    )


def gateway_url(s: Settings) -> str:
    """The URL an E2B client on this host reaches the gateway's HTTP API at."""
    tls_on = bool(s.e2b_tls_cert) or s.e2b_tls == "ca"
    host, _, port = s.e2b_http_addr.rpartition(":")
    if s.e2b_tls == "ca" and not s.e2b_tls_cert:
        # The name the certificate carries, not the address bound.
        host = next((n.strip() for n in s.e2b_hostnames.split(",") if n.strip()), host)
    if host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 - a bound address, not a bind
        host = "127.0.0.1"
    return f"{'https' if tls_on else 'http'}://{host}:{port}"


@e2b.command("env")
@click.option("--key", "api_key", default="", help="The API key to put in E2B_API_KEY.")
def env(api_key: str) -> None:
    """The export lines an E2B SDK client on this host needs."""
    s = settings()
    url = gateway_url(s)
    lines = [f"export E2B_API_URL={shlex.quote(url)}", f"export E2B_SANDBOX_URL={shlex.quote(url)}"]
    if s.e2b_tls == "ca" and not s.e2b_tls_cert:
        ca = shlex.quote(str(s.tls_dir / "ca.pem"))
        lines += [f"export SSL_CERT_FILE={ca}", f"export NODE_EXTRA_CA_CERTS={ca}"]
    lines.append(
        f"export E2B_API_KEY={shlex.quote(api_key)}"
        if api_key
        else "# export E2B_API_KEY=...   (`agent-vm e2b key create NAME` makes one)"
    )
    click.echo("\n".join(lines))
