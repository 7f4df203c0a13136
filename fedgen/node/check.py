"""``fedgen node check``: a site node's health checks, one line each.

Each check returns a :class:`Check` (``OK``, ``WARN``, ``FAIL`` or ``SKIP`` with one line of
detail); a check whose input failed an earlier check is skipped. ``run_checks`` never raises
for a problem it is meant to find.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedgen.errors import FedgenError
from fedgen.node.config import SiteConfig, load_site_config, parse_host_port

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
DEFAULT_MIN_DAYS = 30


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name:<11} {self.detail}"


class _Failed(Exception):
    def __init__(self, detail: str, status: str = FAIL) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def run_checks(
    config: str | Path,
    *,
    build_cache: bool = True,
    network: bool = True,
    min_days: float = DEFAULT_MIN_DAYS,
    timeout: float = 5.0,
    emit: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Run every check on the site node configured in ``config``; ``emit`` sees each as it ends."""
    results: list[Check] = []

    def run(name: str, fn: Callable[[], str], *, needs: tuple[str, ...] = ()) -> bool:
        failed = [n for n in needs if any(c.name == n and c.status in (FAIL, SKIP) for c in results)]
        if failed:
            chk = Check(name, SKIP, f"skipped ({', '.join(failed)} failed)")
        else:
            try:
                chk = Check(name, OK, fn())
            except _Failed as exc:
                chk = Check(name, exc.status, exc.detail)
            except FedgenError as exc:
                chk = Check(name, FAIL, str(exc))
            except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
                chk = Check(name, FAIL, f"unexpected error: {type(exc).__name__}: {exc}")
        results.append(chk)
        if emit is not None:
            emit(chk)
        return chk.status in (OK, WARN)

    cfg: list[SiteConfig] = []

    def check_config() -> str:
        c = load_site_config(config)
        cfg.append(c)
        return f"{c.path}: site {c.site}, aggregator {c.aggregator}"

    if not run("config", check_config):
        return results
    c = cfg[0]
    header: dict[str, object] = {}
    run("state_dir", lambda: _check_state_dir(c))
    run("vcf", lambda: _check_vcf(c, header))
    run("samples", lambda: _check_samples(c, header), needs=("vcf",))
    run("cache", lambda: _check_cache(c, build_cache), needs=("vcf", "samples", "state_dir"))
    run("policy", lambda: _check_policy(c))
    run("training", _check_training)
    run("ca_cert", lambda: _check_ca(c, min_days))
    run("node_key", lambda: _check_key(c))
    if network:
        run("aggregator", lambda: _check_aggregator(c, min_days, timeout), needs=("ca_cert",))
    else:
        results.append(Check("aggregator", SKIP, "skipped (--offline)"))
        if emit is not None:
            emit(results[-1])
    run("audit_log", lambda: _check_audit_log(c))
    return results


# ---------------------------------------------------------------- data


def _check_training() -> str:
    """Risk-model training needs torch and opacus (DP-SGD) in the node's environment."""
    try:
        import opacus
        import torch

        from fedgen.analyses import REGISTRY, _load_builtin

        _load_builtin()
    except ImportError as exc:
        raise _Failed(f"risk-model training unavailable: {exc.name} is not installed (pip install opacus)", WARN) from None
    if "dp_model_update" not in REGISTRY:
        raise _Failed("risk-model training unavailable: fedgen.analyses.learn did not load", WARN)
    return f"risk-model training available (torch {torch.__version__}, opacus {opacus.__version__}, DP-SGD rounds)"


def _check_state_dir(c: SiteConfig) -> str:
    import os
    import stat

    d = c.state_dir
    if not d.exists():
        raise _Failed(f"{d}: not found (fedgen node init creates it)")
    if not d.is_dir():
        raise _Failed(f"{d}: not a folder")
    probe = d / f".fedgen-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _Failed(f"{d}: not writable by this user ({exc.strerror})") from None
    mode = stat.S_IMODE(d.stat().st_mode)
    if mode & 0o007:
        raise _Failed(f"{d}: other users can access it (mode {mode:04o}); run: chmod 700 {d}", WARN)
    return f"{d}: writable, mode {mode:04o}"


def _check_vcf(c: SiteConfig, header: dict[str, object]) -> str:
    from fedgen.cohort.vcf import detect_format, read_vcf

    if c.genotype_kind in ("pgen", "bed"):
        from fedgen.cohort.plinkfiles import read_fileset

        h, blocks, _ = read_fileset(c.vcf, c.genotype_kind)
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
        header["samples"] = list(h.samples)
        return f"{c.vcf}: PLINK {'2' if c.genotype_kind == 'pgen' else '1'} fileset, {len(h.samples)} samples"
    fmt = detect_format(c.vcf)
    h, blocks, _ = read_vcf(c.vcf, threads=1)
    close = getattr(blocks, "close", None)
    if close is not None:
        close()
    header["samples"] = list(h.samples)
    if not h.samples:
        raise _Failed(f"{c.vcf}: VCF has no sample columns")
    return f"{c.vcf}: {fmt}, {len(h.samples)} samples, {len(h.contigs)} contigs in header"


def _check_samples(c: SiteConfig, header: dict[str, object]) -> str:
    from fedgen.cohort.samples import read_samples_table

    table = read_samples_table(c.samples)
    vcf_samples = list(header.get("samples") or [])
    in_table = set(table.iid)
    matched = sum(1 for s in vcf_samples if s in in_table)
    if matched == 0:
        raise _Failed(
            f"{c.samples}: no IID matches a VCF sample (table: {', '.join(table.iid[:3]) or 'empty'}; "
            f"VCF: {', '.join(vcf_samples[:3])})"
        )
    cols = ", ".join(table.columns) or "none"
    return f"{c.samples}: {len(table.iid)} rows, {matched} of {len(vcf_samples)} VCF samples matched; columns: {cols}"


def _check_cache(c: SiteConfig, build: bool) -> str:
    from fedgen.cohort import cohort as co

    _, fp = co.genotype_fingerprint(c.node_config())
    final = co.cache_dir(c.state_dir, fp)
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        return f"{final}: current ({meta['n_variants']} variants x {len(meta['samples'])} samples)"
    if not build:
        raise _Failed(f"not built for the current {c.vcf.name} (run fedgen node check without --no-build)")
    t0 = time.perf_counter()
    cohort = co.load_cohort(c.node_config())
    return (
        f"built now in {time.perf_counter() - t0:.1f} s: {cohort.counts['variants']} variants x "
        f"{cohort.counts['vcf_samples']} samples ({cohort.n_samples} analysed)"
    )


def _check_policy(c: SiteConfig) -> str:
    from fedgen.federation.fab_gate import describe_accepted, installed_version
    from fedgen.node.policy import known_analyses, load_policy, read_policy, validate_policy

    try:
        policy = read_policy(c.policy)
    except ValueError as exc:
        raise _Failed(str(exc)) from None
    problems = validate_policy(policy, known_analyses=known_analyses())
    if problems:
        raise _Failed(f"{c.policy}: " + "; ".join(problems))
    effective = load_policy(c.policy)
    version = installed_version()
    detail = (
        f"{c.policy}: {len(policy['allowed_analyses'])} analyses allowed, min_count {policy['min_count']}, "
        f"epsilon_budget {policy['epsilon_budget']:g}, delta {policy['delta']:g}, "
        f"max_variants_per_request {policy['max_variants_per_request']}; "
        f"installed fedgen {version}; {describe_accepted(effective)}"
    )
    if version not in effective["accepted_fedgen_versions"] and not effective["accepted_fab_hashes"]:
        raise _Failed(
            f"{detail} (the installed fedgen {version} is not accepted, so this node refuses every study; "
            "add it to accepted_fedgen_versions)",
            WARN,
        )
    return detail


# ---------------------------------------------------------------- certificates and keys


def _expiry(days: float, min_days: float, what: str) -> None:
    if days < 0:
        raise _Failed(f"{what} expired {-days:.0f} days ago")
    if days < min_days:
        raise _Failed(f"{what} expires in {days:.0f} days (renew it; this check fails under {min_days:g} days)")


def _check_ca(c: SiteConfig, min_days: float) -> str:
    from fedgen.node.pki import read_cert_info

    infos = read_cert_info(c.ca_cert)
    cas = [i for i in infos if i.is_ca]
    if not cas:
        raise _Failed(f"{c.ca_cert}: not a CA certificate ({infos[0].subject}); use the study CA's ca.pem")
    best = max(cas, key=lambda i: i.not_after)
    _expiry(best.days_left(), min_days, f"{c.ca_cert}: CA certificate {best.subject}")
    return f"{c.ca_cert}: {best.subject}, expires {best.not_after:%Y-%m-%d} ({best.days_left():.0f} days)"


def _check_key(c: SiteConfig) -> str:
    from fedgen.node.pki import fingerprint, key_pair_matches, load_node_private_key, loose_permissions

    key = load_node_private_key(c.private_key)
    loose = loose_permissions(c.private_key)
    if loose:
        raise _Failed(f"{c.private_key}: private key {loose}")
    if not c.public_key.exists():
        raise _Failed(f"{c.public_key}: public key file not found (the aggregator registers this file)")
    if not key_pair_matches(c.private_key, c.public_key):
        raise _Failed(f"{c.public_key} does not belong to {c.private_key}")
    return f"{c.private_key}: ECDSA {key.curve.name}, fingerprint {fingerprint(key.public_key())} (register {c.public_key})"


# ---------------------------------------------------------------- aggregator


def _check_aggregator(c: SiteConfig, min_days: float, timeout: float) -> str:
    from cryptography import x509

    host, port = parse_host_port(c.aggregator, what=f"{c.path}: [aggregator] address")
    ctx = ssl.create_default_context(cafile=str(c.ca_cert))
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                version = tls.version()
                tls.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                status_line = tls.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
    except ssl.SSLCertVerificationError as exc:
        raise _Failed(
            f"{c.aggregator}: TLS certificate not accepted ({exc.verify_message}); "
            f"is {c.ca_cert} the study CA, and does the aggregator certificate name {host}?"
        ) from None
    except ssl.SSLError as exc:
        raise _Failed(f"{c.aggregator}: TLS handshake failed ({exc.reason or exc}); is this the aggregator's port?") from None
    except socket.gaierror as exc:
        raise _Failed(f"{c.aggregator}: cannot resolve {host} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise _Failed(f"{c.aggregator}: connection refused (aggregator not running, or wrong port)") from None
    except (socket.timeout, TimeoutError):
        raise _Failed(f"{c.aggregator}: no answer within {timeout:g} s (firewall? outbound TCP {port} must be open)") from None
    except OSError as exc:
        raise _Failed(f"{c.aggregator}: cannot connect ({exc.strerror or exc})") from None
    ms = (time.perf_counter() - t0) * 1000
    if " 200" not in status_line:
        raise _Failed(f"{c.aggregator}: TLS OK but /health answered {status_line!r}; is this a fedgen aggregator?")
    cert = x509.load_der_x509_certificate(der) if der else None
    expiry = ""
    if cert is not None:
        import datetime as dt

        days = (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400
        _expiry(days, min_days, f"{c.aggregator}: the aggregator's certificate")
        expiry = f", its certificate expires {cert.not_valid_after_utc:%Y-%m-%d} ({days:.0f} days)"
    return f"{c.aggregator}: reachable, {version}, certificate verified by the study CA{expiry}, {ms:.0f} ms"


def _check_audit_log(c: SiteConfig) -> str:
    path = c.audit_log
    if not path.exists():
        return f"{path}: no entries yet"
    n = 0
    last = ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise _Failed(f"{path}: line {i} is not JSON (the audit log must be JSON lines)") from None
            if not isinstance(entry, dict):
                raise _Failed(f"{path}: line {i} is not a JSON object")
            n += 1
            last = str(entry.get("time") or entry.get("timestamp") or last)
    return f"{path}: {n} entries" + (f", last at {last}" if last else "")
