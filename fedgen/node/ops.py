"""What the ``fedgen node`` and ``fedgen aggregator`` commands do (the CLI is a thin shell).

Flower mechanics (flwr 1.41, checked against its source):

* TLS: the SuperLink serves one HTTPS port (Fleet, Control and Runtime APIs) with
  ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; a SuperNode verifies it with
  ``--root-certificates CA``; the ``flwr`` CLI with ``root-certificates`` in its connection.
* Node authentication: the SuperLink runs with ``--enable-supernode-auth`` (refused with
  ``--insecure``); each site's ECDSA public key (OpenSSH format) is registered through the
  Control API with ``flwr supernode register KEY.pub CONNECTION``; the SuperNode signs every
  Fleet request with ``--auth-supernode-private-key KEY``. An unregistered key cannot
  activate (Flower exit code 305, "Failed to activate SuperNode").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgen.errors import ConfigError, FedgenError
from fedgen.node import pki
from fedgen.node.config import (
    POLICY_FILE,
    PRIVATE_KEY,
    PUBLIC_KEY,
    SITE_RE,
    AggregatorConfig,
    SiteConfig,
    load_aggregator_config,
    load_site_config,
    parse_host_port,
    render_aggregator_config,
    render_site_config,
    resolve_path,
    write_private,
)

log = logging.getLogger("fedgen.node")

ADMIN_CONNECTION = "fedgen-aggregator"
NODE_CONFIG_FILE = "node-config.toml"

__all__ = [
    "init_site",
    "site_command",
    "rotate_key",
    "init_aggregator",
    "aggregator_command",
    "register_site",
    "unregister_site",
    "list_nodes",
]


# ---------------------------------------------------------------- site node


@dataclass
class SiteInit:
    config: Path
    state_dir: Path
    public_key: Path
    fingerprint: str
    created: list[str]
    warnings: list[str]


def init_site(
    *,
    site: str,
    vcf: str | Path,
    samples: str | Path,
    state_dir: str | Path,
    aggregator: str,
    ca_cert: str | Path,
    config: str | Path | None = None,
    private_key: str | Path | None = None,
    runtime_port: int = 9094,
    poll_interval: float = 1.0,
    force: bool = False,
) -> SiteInit:
    """Write a site's node config, state folder, default policy and (unless given) key pair.

    Existing keys and policy files are kept; an existing config is replaced only with ``force``.
    ``private_key`` uses an existing key pair (its public key must be ``<private_key>.pub``).
    """
    cwd = Path.cwd()
    if not SITE_RE.match(site):
        raise ConfigError(f"site name {site!r}: use letters, digits, '-' or '_'")
    parse_host_port(aggregator, what="--aggregator")
    state = resolve_path(state_dir, cwd)
    cfg_path = resolve_path(config, cwd) if config else state / "node.toml"
    if cfg_path.exists() and not force:
        raise ConfigError(f"{cfg_path} already exists (use --force to replace it; keys and policy are kept)")
    vcf_p, samples_p, ca_p = (resolve_path(p, cwd) for p in (vcf, samples, ca_cert))
    created: list[str] = []
    warnings: list[str] = []
    for p, what in ((vcf_p, "VCF"), (samples_p, "samples table"), (ca_p, "CA certificate")):
        if not p.exists():
            warnings.append(f"{what} {p} does not exist yet (fedgen node check will fail until it does)")
    if ca_p.exists():
        infos = pki.read_cert_info(ca_p)
        if not any(i.is_ca for i in infos):
            raise ConfigError(f"{ca_p}: not a CA certificate; --ca-cert takes the study CA's ca.pem")

    if not state.exists():
        created.append(f"state folder {state}")
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    (state / "keys").mkdir(exist_ok=True)
    os.chmod(state / "keys", 0o700)

    if private_key:
        priv = resolve_path(private_key, cwd)
        pub = priv.with_name(priv.name + ".pub")
        pki.load_node_private_key(priv)
        if not pub.exists():
            raise ConfigError(f"{pub} not found (the public key must sit beside the private key)")
        if not pki.key_pair_matches(priv, pub):
            raise ConfigError(f"{pub} does not belong to {priv}")
        loose = pki.loose_permissions(priv)
        if loose:
            warnings.append(f"private key {priv}: {loose}")
    else:
        priv, pub = state / PRIVATE_KEY, state / PUBLIC_KEY
        if priv.exists():
            pki.load_node_private_key(priv)
            if not pub.exists():
                raise ConfigError(f"{priv} exists but {pub} does not; restore it or remove both to make a new pair")
        else:
            pki.generate_node_key(priv, pub, comment=f"fedgen-site-{site}")
            created.append(f"key pair {priv} (+ .pub)")
    fp = pki.fingerprint_public_key(pub)

    policy = state / POLICY_FILE
    if not policy.exists():
        from fedgen.node.policy import default_policy_text

        write_private(policy, default_policy_text(site), 0o600)
        created.append(f"default policy {policy}")

    text = render_site_config(
        site=site,
        vcf=vcf_p,
        samples=samples_p,
        state_dir=state,
        aggregator=aggregator,
        ca_cert=ca_p,
        private_key=priv,
        public_key=pub,
        policy=policy,
        runtime_port=runtime_port,
        poll_interval=poll_interval,
    )
    write_private(cfg_path, text, 0o600)
    created.append(f"node config {cfg_path}")
    load_site_config(cfg_path)  # what we wrote must load
    return SiteInit(config=cfg_path, state_dir=state, public_key=pub, fingerprint=fp, created=created, warnings=warnings)


def _preflight_site(c: SiteConfig) -> None:
    problems: list[str] = []
    try:
        infos = pki.read_cert_info(c.ca_cert)
        if all(i.days_left() < 0 for i in infos):
            problems.append(f"{c.ca_cert}: the CA certificate has expired")
    except FedgenError as exc:
        problems.append(str(exc))
    try:
        pki.load_node_private_key(c.private_key)
    except FedgenError as exc:
        problems.append(str(exc))
    if not c.state_dir.is_dir():
        problems.append(f"{c.state_dir}: state folder not found (run fedgen node init)")
    try:
        from fedgen.node.policy import load_policy

        load_policy(c.policy)
    except ValueError as exc:  # the node would refuse every run: say so now
        problems.append(str(exc))
    if problems:
        raise FedgenError("cannot start the node: " + "; ".join(problems) + " (details: fedgen node check)")


def site_command(c: SiteConfig) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the SuperNode for site config ``c`` (TLS + node authentication)."""
    from fedgen.federation.local import flower_env

    node_cfg = c.run_dir / NODE_CONFIG_FILE
    import tomli_w

    write_private(node_cfg, tomli_w.dumps(c.node_config()), 0o600)
    argv = [
        sys.executable, "-m", "fedgen.federation.supernode",
        "--superlink", c.aggregator,
        "--root-certificates", str(c.ca_cert),
        "--auth-supernode-private-key", str(c.private_key),
        "--node-config", str(node_cfg),
        "--host", "127.0.0.1",
        "--port", str(c.runtime_port),
    ]  # fmt: skip
    home = c.state_dir / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(
        home,
        {
            "FEDGEN_SUPERNODE_POLL": f"{c.poll_interval:g}",
            "FEDGEN_NODE_LOG_LEVEL": c.log_level,
            "PYTHONSAFEPATH": "1",  # no current folder on sys.path: code comes from the installed packages
        },
    )
    return argv, env


def code_boundary_summary(policy_path: str | Path) -> str:
    """One line: the installed fedgen and which study FABs this node's policy accepts."""
    import fedgen
    from fedgen.federation.fab_gate import describe_accepted
    from fedgen.node.policy import load_policy

    policy = load_policy(policy_path)
    return (
        f"runs only its installed fedgen {fedgen.__version__} ClientApp ({Path(fedgen.__file__).resolve().parent}); "
        f"study FABs: {describe_accepted(policy)}"
    )


def start_site(config: str | Path) -> None:
    """Replace this process with the site's SuperNode (foreground; systemd/compose supervise it)."""
    c = load_site_config(config)
    _preflight_site(c)
    argv, env = site_command(c)
    from fedgen.site import audit

    print(
        f"fedgen node: starting site {c.site} -> {c.aggregator} (TLS, CA {c.ca_cert}; "
        f"node key {pki.fingerprint(pki.load_node_private_key(c.private_key).public_key())})\n"
        f"fedgen node: {code_boundary_summary(c.policy)}\n"
        f"fedgen node: audit chain head {audit.head(c.state_dir)} (write it down outside the site to anchor the log)",
        file=sys.stderr,
        flush=True,
    )
    os.chdir(c.state_dir)
    os.execve(argv[0], argv, env)


def rotate_key(config: str | Path) -> tuple[Path, str, Path]:
    """New key pair for a site; the old one is kept as ``keys/retired/node-<time>.key``.

    Returns (public key, fingerprint, retired private key).
    """
    c = load_site_config(config)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    retired = c.private_key.parent / "retired"
    retired.mkdir(parents=True, exist_ok=True)
    os.chmod(retired, 0o700)
    old_priv = retired / f"node-{stamp}.key"
    if c.private_key.exists():
        os.replace(c.private_key, old_priv)
    if c.public_key.exists():
        os.replace(c.public_key, retired / f"node-{stamp}.key.pub")
    fp = pki.generate_node_key(c.private_key, c.public_key, comment=f"fedgen-site-{c.site}")
    return c.public_key, fp, old_priv


# ---------------------------------------------------------------- aggregator


def init_aggregator(
    *,
    state_dir: str | Path,
    ca_cert: str | Path,
    cert: str | Path,
    key: str | Path,
    host: str = "0.0.0.0",
    port: int = 9092,
    admin_hosts: list[str] | None = None,
    config: str | Path | None = None,
    force: bool = False,
) -> Path:
    cwd = Path.cwd()
    state = resolve_path(state_dir, cwd)
    cfg_path = resolve_path(config, cwd) if config else state / "aggregator.toml"
    if cfg_path.exists() and not force:
        raise ConfigError(f"{cfg_path} already exists (use --force to replace it)")
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    text = render_aggregator_config(
        host=host,
        port=port,
        state_dir=state,
        ca_cert=resolve_path(ca_cert, cwd),
        cert=resolve_path(cert, cwd),
        key=resolve_path(key, cwd),
        admin_hosts=admin_hosts,
    )
    write_private(cfg_path, text, 0o600)
    c = load_aggregator_config(cfg_path)
    _preflight_aggregator(c)
    return cfg_path


def _preflight_aggregator(c: AggregatorConfig) -> list[str]:
    """Raise FedgenError if the TLS files cannot work; return warnings."""
    warnings: list[str] = []
    pki.read_cert_info(c.ca_cert)
    info = pki.read_cert_info(c.cert)[0]
    if info.days_left() < 0:
        raise FedgenError(
            f"{c.cert}: the server certificate expired on {info.not_after:%Y-%m-%d}; renew it (nodes/make-certs.sh server)"
        )
    if info.days_left() < 30:
        warnings.append(f"{c.cert}: the server certificate expires in {info.days_left():.0f} days; renew it soon")
    if not pki.cert_matches_key(c.cert, c.key):
        raise FedgenError(f"{c.key} is not the private key of {c.cert}")
    if not pki.verify_issued_by(c.cert, c.ca_cert):
        raise FedgenError(f"{c.cert} was not issued by the CA in {c.ca_cert}; sites would reject it")
    names = set(info.names)
    if "127.0.0.1" not in names and "localhost" not in names:
        raise FedgenError(
            f"{c.cert} does not name 127.0.0.1 or localhost; the aggregator's own processes connect on loopback "
            "(nodes/make-certs.sh server adds them)"
        )
    loose = pki.loose_permissions(c.key)
    if loose:
        warnings.append(f"server key {c.key}: {loose}")
    return warnings


def _admin_env(c: AggregatorConfig) -> dict[str, str]:
    from fedgen.federation.local import flower_env, write_connection

    write_connection(c.cli_home, ADMIN_CONNECTION, address=c.local_address, insecure=False, root_certificates=str(c.ca_cert))
    return flower_env(c.cli_home, {"COLUMNS": "200"})


def aggregator_command(c: AggregatorConfig) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the aggregator's SuperLink (TLS + SuperNode authentication)."""
    from fedgen.federation.local import flower_env

    argv = [
        sys.executable, "-m", "fedgen.node.superlink",
        "--ssl-certfile", str(c.cert),
        "--ssl-keyfile", str(c.key),
        "--ssl-ca-certfile", str(c.ca_cert),
        "--enable-supernode-auth",
        "--host", c.host,
        "--port", str(c.port),
        "--database", str(c.database),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    home = c.state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(
        home,
        {"FEDGEN_ADMIN_HOSTS": ",".join(c.allowed_admin_hosts()), "FEDGEN_NODE_LOG_LEVEL": c.log_level},
    )
    return argv, env


def start_aggregator(config: str | Path) -> None:
    """Replace this process with the aggregator's SuperLink (foreground)."""
    c = load_aggregator_config(config)
    c.state_dir.mkdir(parents=True, exist_ok=True)
    for w in _preflight_aggregator(c):
        print(f"fedgen aggregator: warning: {w}", file=sys.stderr)
    _admin_env(c)  # the admin CLI connection, for register/nodes
    argv, env = aggregator_command(c)
    print(
        f"fedgen aggregator: starting SuperLink on {c.host}:{c.port} (TLS, node authentication on; "
        f"submit studies from this machine with federation.control_address={c.local_address} "
        f"federation.root_certificates={c.ca_cert})",
        file=sys.stderr,
        flush=True,
    )
    os.chdir(c.state_dir)
    os.execve(argv[0], argv, env)


def _flwr_json(c: AggregatorConfig, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
    from fedgen.federation.local import flower_cmd

    env = _admin_env(c)
    try:
        res = subprocess.run(
            [flower_cmd("flwr"), *args, "--format", "json"],
            env=env,
            cwd=str(c.state_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise FedgenError(f"flwr {' '.join(args)} did not answer within {timeout:g} s; is the aggregator running?") from None
    out = res.stdout
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        text = (res.stdout + res.stderr).strip()[-800:]
        raise FedgenError(f"flwr {' '.join(args)} failed (exit {res.returncode}): {text}")
    if not data.get("success", False):
        msg = str(data.get("error-message") or data).strip()
        lines = [ln for ln in msg.splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
        detail = " ".join(lines)
        if "Connect" in detail or "connection" in detail.lower():
            detail += f" (is the aggregator running on {c.local_address}?)"
        raise FedgenError(f"flwr {' '.join(args[:2])}: {detail}")
    return data


def _read_sites(c: AggregatorConfig) -> dict[str, list[dict[str, Any]]]:
    try:
        data = json.loads(c.sites_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FedgenError(f"{c.sites_file}: unreadable ({exc})") from None
    return {str(k): list(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_sites(c: AggregatorConfig, sites: dict[str, list[dict[str, Any]]]) -> None:
    write_private(c.sites_file, json.dumps(sites, indent=2, sort_keys=True) + "\n", 0o600)


def register_site(config: str | Path, site: str, public_key: str | Path) -> tuple[str, str]:
    """Register ``site``'s public key at the running SuperLink; return (node id, fingerprint)."""
    c = load_aggregator_config(config)
    if not SITE_RE.match(site):
        raise ConfigError(f"site name {site!r}: use letters, digits, '-' or '_'")
    pub = resolve_path(public_key, Path.cwd())
    fp = pki.fingerprint_public_key(pub)
    data = _flwr_json(c, ["supernode", "register", str(pub), ADMIN_CONNECTION, "--name", site])
    node_id = str(data.get("node-id", ""))
    sites = _read_sites(c)
    sites.setdefault(site, []).append(
        {"node_id": node_id, "fingerprint": fp, "registered_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    )
    _write_sites(c, sites)
    return node_id, fp


def unregister_site(config: str | Path, site: str, node_id: str | None = None) -> list[str]:
    """Revoke ``site``'s node key(s) (all, or only ``node_id``); return the node ids revoked.

    The registry keeps revoked entries (with ``revoked_at``) so ``nodes`` still names them.
    """
    c = load_aggregator_config(config)
    sites = _read_sites(c)
    entries = sites.get(site, [])
    active = [e for e in entries if not e.get("revoked_at")]
    targets = [e for e in active if node_id is None or str(e.get("node_id")) == str(node_id)]
    if not targets:
        live = {s: [str(e["node_id"]) for e in es if not e.get("revoked_at")] for s, es in sites.items()}
        known = ", ".join(f"{s} ({', '.join(ids)})" for s, ids in live.items() if ids)
        raise FedgenError(
            f"no active registration of site {site!r}" + (f" with node id {node_id}" if node_id else "")
            + f"; registered: {known or 'none'}"
        )  # fmt: skip
    revoked: list[str] = []
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for e in targets:
        with contextlib.suppress(FedgenError):  # already gone at the SuperLink: still record it here
            _flwr_json(c, ["supernode", "unregister", str(e["node_id"]), ADMIN_CONNECTION])
        e["revoked_at"] = now
        revoked.append(str(e["node_id"]))
    _write_sites(c, sites)
    return revoked


def list_nodes(config: str | Path) -> list[dict[str, str]]:
    """Registered SuperNodes with their site name (from this aggregator's registry) and status."""
    c = load_aggregator_config(config)
    data = _flwr_json(c, ["supernode", "ls", ADMIN_CONNECTION])
    by_id: dict[str, tuple[str, dict[str, Any]]] = {}
    for site, entries in _read_sites(c).items():
        for e in entries:
            by_id[str(e.get("node_id"))] = (site, e)
    rows = []
    for n in data.get("nodes", []):
        nid = str(n.get("node-id"))
        site, e = by_id.get(nid, ("?", {}))
        status = str(n.get("status", "?"))
        if status == "unregistered" and e.get("revoked_at"):
            status = "revoked"
        rows.append(
            {
                "site": site,
                "node_id": nid,
                "status": status,
                "fingerprint": str(e.get("fingerprint", "?")),
                "since": str(
                    n.get("online-at")
                    if status == "online"
                    else e.get("revoked_at")
                    if status == "revoked"
                    else n.get("created-at", "")
                ),  # fmt: skip
            }
        )
    rows.sort(key=lambda r: (r["site"], r["node_id"]))
    return rows
