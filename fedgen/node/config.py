"""Site node and aggregator configuration files (TOML).

A **site node config** (``node.toml``, written by ``fedgen node init``; annotated copy in
``nodes/node.example.toml``)::

    [site]        name, vcf, samples, state_dir, policy
    [aggregator]  address (host:port of the study's SuperLink), ca_cert (the study CA)
    [auth]        private_key, public_key (the node's ECDSA key pair, OpenSSH format)
    [node]        runtime_port, poll_interval, log_level, threads, row_cache_mb   (optional)

An **aggregator config** (``aggregator.toml``, ``fedgen aggregator init``;
``nodes/aggregator.example.toml``)::

    [aggregator]  host, port, state_dir, admin_hosts, log_level
    [tls]         ca_cert, cert, key

Relative paths are relative to the folder holding the config file. The SuperNode receives
only the site's node config (:meth:`SiteConfig.node_config`: ``site``, ``vcf``, ``samples``,
``state_dir``, ``policy``), written to ``<state_dir>/run/node-config.toml`` by ``fedgen node
start``; addresses, certificates and keys never reach the ClientApp.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedgen.errors import ConfigError

SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

#: Files in a site's state folder.
POLICY_FILE = "policy.toml"
AUDIT_LOG = "audit.jsonl"
LEDGER_FILE = "ledger.sqlite"
KEYS_DIR = "keys"
PRIVATE_KEY = "keys/node.key"
PUBLIC_KEY = "keys/node.key.pub"
RUN_DIR = "run"

DEFAULT_FLEET_PORT = 9092
DEFAULT_RUNTIME_PORT = 9094
DEFAULT_POLL = 1.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_HOSTS = ("127.0.0.1", "::1")


# ---------------------------------------------------------------- helpers


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


class _Reader:
    """Typed access to a parsed TOML file, with errors that name the file and key."""

    def __init__(self, path: Path, data: dict[str, Any], known: Mapping[str, tuple[str, ...]]) -> None:
        self.path = Path(path)
        self.base = self.path.resolve().parent
        self.data = data
        for section, value in data.items():
            if section not in known:
                raise ConfigError(f"{self.path}: unknown section [{section}] (known: {', '.join(f'[{k}]' for k in known)})")
            if not isinstance(value, dict):
                raise ConfigError(f"{self.path}: {section} must be a [{section}] table")
            extra = sorted(set(value) - set(known[section]))
            if extra:
                raise ConfigError(
                    f"{self.path}: unknown key(s) in [{section}]: {', '.join(extra)} (known: {', '.join(known[section])})"
                )

    def get(self, section: str, key: str, default: Any = ...) -> Any:
        value = self.data.get(section, {}).get(key, default)
        if value is ...:
            raise ConfigError(f"{self.path}: [{section}] {key} is not set")
        return value

    def string(self, section: str, key: str, default: Any = ...) -> str:
        value = self.get(section, key, default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.path}: [{section}] {key} must be a non-empty string, got {value!r}")
        return value.strip()

    def path_(self, section: str, key: str, default: Any = ...) -> Path:
        return resolve_path(self.string(section, key, default), self.base)

    def integer(self, section: str, key: str, default: Any = ..., *, lo: int, hi: int) -> int:
        value = self.get(section, key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{self.path}: [{section}] {key} must be a whole number in [{lo}, {hi}], got {value!r}")
        return value

    def number(self, section: str, key: str, default: Any = ..., *, lo: float, hi: float) -> float:
        value = self.get(section, key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
            raise ConfigError(f"{self.path}: [{section}] {key} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        return float(value)

    def boolean(self, section: str, key: str, default: Any = ...) -> bool:
        value = self.get(section, key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path}: [{section}] {key} must be true or false, got {value!r}")
        return value

    def level(self, section: str, key: str) -> str:
        value = self.string(section, key, "INFO").upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{self.path}: [{section}] {key} must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return value


def resolve_path(value: str | os.PathLike[str], base: Path) -> Path:
    """``value`` with ``~`` expanded, relative to ``base``, made absolute (not resolving symlinks)."""
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = Path(base) / p
    return Path(os.path.normpath(p))


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` → (host, port); ConfigError naming ``what`` if malformed."""
    text = str(text).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text) or re.fullmatch(r"([A-Za-z0-9.\-_]+):(\d+)", text)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT (e.g. aggregator.example.org:{DEFAULT_FLEET_PORT}), got {text!r}")
    return m.group(1), int(m.group(2))


def toml_str(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (paths with quotes/backslashes survive)."""
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` atomically with ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- site node config

_SITE_KEYS = {
    "site": ("name", "vcf", "pgen", "bed", "build", "samples", "state_dir", "policy", "audit_payloads",
             "audit_payload_retention_days"),
    "aggregator": ("address", "ca_cert"),
    "auth": ("private_key", "public_key"),
    "node": ("runtime_port", "poll_interval", "log_level", "threads", "row_cache_mb"),
}


@dataclass
class SiteConfig:
    """A site node's configuration (paths absolute)."""

    path: Path
    site: str
    vcf: Path
    samples: Path
    state_dir: Path
    policy: Path
    aggregator: str
    ca_cert: Path
    private_key: Path
    public_key: Path
    runtime_port: int = DEFAULT_RUNTIME_PORT
    poll_interval: float = DEFAULT_POLL
    log_level: str = "INFO"
    audit_payloads: bool = True
    audit_payload_retention_days: float = 0.0  # 0 = keep for ever
    #: threads for block work (0 = every core the node may use)
    threads: int = 0
    #: memory for per-variant work reused across IRLS rounds (fedgen.analyses.rowcache), MB
    row_cache_mb: float = 256.0
    #: which key ``vcf`` came from: "vcf" (VCF/BCF file), "pgen" or "bed" (PLINK fileset prefix)
    genotype_kind: str = "vcf"
    #: declared genome build ("GRCh37"/"GRCh38"), when the genotype files' headers do not show it
    build: str = ""

    def node_config(self) -> dict[str, str]:
        """What the ClientApp sees as ``context.node_config`` (see fedgen.cohort.load_cohort)."""
        return {
            "site": self.site,
            self.genotype_kind: str(self.vcf),
            "samples": str(self.samples),
            "state_dir": str(self.state_dir),
            "policy": str(self.policy),
            "audit_payloads": "true" if self.audit_payloads else "false",
            "audit_payload_retention_days": f"{self.audit_payload_retention_days:g}",
            "threads": str(self.threads),
            "row_cache_mb": f"{self.row_cache_mb:g}",
            **({"build": self.build} if self.build else {}),
        }

    @property
    def audit_log(self) -> Path:
        return self.state_dir / AUDIT_LOG

    @property
    def run_dir(self) -> Path:
        return self.state_dir / RUN_DIR


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a site node config; raise ConfigError naming the file and key."""
    path = Path(path).expanduser()
    r = _Reader(path, _read_toml(path, "node config"), _SITE_KEYS)
    site = r.string("site", "name")
    if not SITE_RE.match(site):
        raise ConfigError(f"{path}: [site] name {site!r}: use letters, digits, '-' or '_'")
    state_dir = r.path_("site", "state_dir")
    kinds = [k for k in ("vcf", "pgen", "bed") if r.get("site", k, None) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{path}: [site] give exactly one genotype input: vcf (VCF/BCF file), pgen (PLINK 2 fileset "
                          f"prefix) or bed (PLINK 1 fileset prefix); got {', '.join(kinds) or 'none'}")
    address = r.string("aggregator", "address")
    parse_host_port(address, what=f"{path}: [aggregator] address")
    return SiteConfig(
        path=path.resolve(),
        site=site,
        vcf=r.path_("site", kinds[0]),
        genotype_kind=kinds[0],
        build=r.string("site", "build", "") if r.get("site", "build", None) is not None else "",
        samples=r.path_("site", "samples"),
        state_dir=state_dir,
        policy=r.path_("site", "policy", str(state_dir / POLICY_FILE)),
        aggregator=address,
        ca_cert=r.path_("aggregator", "ca_cert"),
        private_key=r.path_("auth", "private_key", str(state_dir / PRIVATE_KEY)),
        public_key=r.path_("auth", "public_key", str(state_dir / PUBLIC_KEY)),
        runtime_port=r.integer("node", "runtime_port", DEFAULT_RUNTIME_PORT, lo=1, hi=65535),
        poll_interval=r.number("node", "poll_interval", DEFAULT_POLL, lo=0.01, hi=60.0),
        log_level=r.level("node", "log_level"),
        threads=r.integer("node", "threads", 0, lo=0, hi=4096),
        row_cache_mb=r.number("node", "row_cache_mb", 256.0, lo=0.0, hi=1048576.0),
        audit_payloads=r.boolean("site", "audit_payloads", True),
        audit_payload_retention_days=r.number("site", "audit_payload_retention_days", 0.0, lo=0.0, hi=36500.0),
    )


def render_site_config(
    *,
    site: str,
    vcf: Path,
    samples: Path,
    state_dir: Path,
    aggregator: str,
    ca_cert: Path,
    private_key: Path,
    public_key: Path,
    policy: Path,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
    poll_interval: float = DEFAULT_POLL,
) -> str:
    """The node config ``fedgen node init`` writes (same layout as nodes/node.example.toml)."""
    return f"""\
# fedgen site node configuration for site "{site}" (written by `fedgen node init`).
# Check it with:  fedgen node check --config <this file>
# Start it with:  fedgen node start --config <this file>
# Relative paths are relative to the folder holding this file.

[site]
# The site's name in studies (letters, digits, '-' or '_'); the study's sites file uses it.
name = {toml_str(site)}
# Genotypes: VCF or BCF, bgzipped or plain, indexed or not.
vcf = {toml_str(vcf)}
# Samples table: tab-separated, header row, IID column = VCF sample IDs, then phenotypes/covariates.
samples = {toml_str(samples)}
# The node's own folder: genotype cache, policy, privacy ledger, audit log, keys. Keep it private.
state_dir = {toml_str(state_dir)}
# What this site agrees to compute and release (fedgen node check validates it).
policy = {toml_str(policy)}
# Keep a copy of every payload that left (audit-payloads/<sha256>.npz) so `fedgen audit --verify`
# can re-hash it; false keeps only the hashes in audit.jsonl.
audit_payloads = true
# Delete kept payloads after this many days (0 = keep them; the log keeps every hash either way).
audit_payload_retention_days = 0

[aggregator]
# The study's aggregator (Flower SuperLink), host:port. The node only connects out to it.
address = {toml_str(aggregator)}
# The study CA certificate: the node talks TLS to the aggregator and trusts only this CA.
ca_cert = {toml_str(ca_cert)}

[auth]
# This node's ECDSA key pair (OpenSSH format). The private key never leaves this server;
# the public key is registered at the aggregator (fedgen aggregator register).
private_key = {toml_str(private_key)}
public_key = {toml_str(public_key)}

[node]
# Local port of the node's runtime API (bound to 127.0.0.1 only; not reachable from outside).
runtime_port = {int(runtime_port)}
# Seconds between polls of the aggregator while idle.
poll_interval = {float(poll_interval)!r}
log_level = "INFO"
# Threads for the site's block work (GLM sums): 0 = every core the node may use.
threads = 0
# Memory (MB) for per-variant work that logistic/Firth rounds reuse (the variants' rows for the
# study's sample set and their disclosure-rule cells): about variants × samples bytes covers a
# whole study; 0 turns it off. It changes speed, never results.
row_cache_mb = 256
"""


# ---------------------------------------------------------------- aggregator config

_AGG_KEYS = {
    "aggregator": ("host", "port", "state_dir", "admin_hosts", "log_level"),
    "tls": ("ca_cert", "cert", "key"),
}


@dataclass
class AggregatorConfig:
    """The aggregator's configuration (paths absolute)."""

    path: Path
    host: str
    port: int
    state_dir: Path
    ca_cert: Path
    cert: Path
    key: Path
    admin_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_HOSTS))
    log_level: str = "INFO"

    @property
    def database(self) -> Path:
        """The SuperLink's state: registered site keys, runs (survives restarts)."""
        return self.state_dir / "superlink.db"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the Flower CLI used for admin commands (register, list nodes)."""
        return self.state_dir / "flwr-cli"

    @property
    def sites_file(self) -> Path:
        """Registered sites: name → node id and public key fingerprint."""
        return self.state_dir / "sites.json"

    @property
    def local_address(self) -> str:
        """Where admin commands on this machine reach the SuperLink (loopback if it listens there)."""
        host = self.host
        if host in WILDCARD_HOSTS:
            host = "127.0.0.1" if host != "::" else "::1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def allowed_admin_hosts(self) -> list[str]:
        """Client addresses allowed on the Control and Runtime APIs.

        Loopback (the SuperLink's own SuperExec and ServerApps connect from there), then
        ``admin_hosts``, then the listen address itself when it is a specific one.
        """
        hosts = list(dict.fromkeys([*LOOPBACK_HOSTS, *self.admin_hosts]))
        if self.host not in WILDCARD_HOSTS and self.host not in hosts:
            hosts.append(self.host)
        return hosts


def load_aggregator_config(path: str | os.PathLike[str]) -> AggregatorConfig:
    path = Path(path).expanduser()
    r = _Reader(path, _read_toml(path, "aggregator config"), _AGG_KEYS)
    host = r.get("aggregator", "host", "0.0.0.0")
    if not isinstance(host, str):
        raise ConfigError(f"{path}: [aggregator] host must be a string, got {host!r}")
    admin = r.get("aggregator", "admin_hosts", list(LOOPBACK_HOSTS))
    if not isinstance(admin, list) or not all(isinstance(h, str) for h in admin):
        raise ConfigError(f"{path}: [aggregator] admin_hosts must be a list of IP addresses")
    for h in admin:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise ConfigError(f"{path}: [aggregator] admin_hosts: {h!r} is not an IP address") from None
    return AggregatorConfig(
        path=path.resolve(),
        host=host.strip(),
        port=r.integer("aggregator", "port", DEFAULT_FLEET_PORT, lo=1, hi=65535),
        state_dir=r.path_("aggregator", "state_dir"),
        ca_cert=r.path_("tls", "ca_cert"),
        cert=r.path_("tls", "cert"),
        key=r.path_("tls", "key"),
        admin_hosts=list(admin),
        log_level=r.level("aggregator", "log_level"),
    )


def render_aggregator_config(
    *, host: str, port: int, state_dir: Path, ca_cert: Path, cert: Path, key: Path, admin_hosts: list[str] | None = None
) -> str:
    admin = ", ".join(toml_str(h) for h in (admin_hosts or LOOPBACK_HOSTS))
    return f"""\
# fedgen aggregator configuration (written by `fedgen aggregator init`).
# Start it with:  fedgen aggregator start --config <this file>
# Relative paths are relative to the folder holding this file.

[aggregator]
# Listen address and port of the SuperLink (sites connect here over TLS; open this port to
# the sites' outgoing addresses only). "0.0.0.0" = all interfaces.
host = {toml_str(host)}
port = {int(port)}
# SuperLink state (registered site keys, runs) and admin CLI settings. Keep it private.
state_dir = {toml_str(state_dir)}
# Client addresses allowed to use the Control API (submit studies, register sites); the
# aggregator's own loopback addresses always are. Sites need only the Fleet API: keep this
# to the aggregator itself unless you know why not.
admin_hosts = [{admin}]
log_level = "INFO"

[tls]
# The study CA certificate, and this aggregator's certificate and private key issued by it
# (nodes/make-certs.sh). The certificate must name every address sites use to reach it.
ca_cert = {toml_str(ca_cert)}
cert = {toml_str(cert)}
key = {toml_str(key)}
"""
