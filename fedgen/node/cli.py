"""``fedgen node ...`` (site nodes) and ``fedgen aggregator ...`` (the study's SuperLink)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

NODE_HELP = """\
Site node commands. A hospital runs one node next to its genotype data:
  fedgen node init ...            write the node config, state folder, default policy and key pair
  fedgen node check --config F    health checks, one line each (exit 1 if any fails)
  fedgen node start --config F    run the node (Flower SuperNode, TLS + node authentication)
  fedgen node rotate-key --config F   new key pair (register it, restart, unregister the old one)
See nodes/README.md for the runbook."""

AGG_HELP = """\
Aggregator commands (the study's Flower SuperLink):
  fedgen aggregator init ...                    write the aggregator config
  fedgen aggregator start --config F            run the SuperLink (TLS, node authentication on)
  fedgen aggregator register --config F SITE KEY.pub   allow a site's node key
  fedgen aggregator nodes --config F            registered nodes and whether they are online
  fedgen aggregator unregister --config F SITE [--node-id N]   revoke a site's key(s)"""


def add_commands(subparsers: Any) -> None:
    """Add the ``node`` and ``aggregator`` command groups to the ``fedgen`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    node = subparsers.add_parser(
        "node", help="site node: init, check, start, rotate-key", description=NODE_HELP, formatter_class=fmt
    )
    nsub = node.add_subparsers(dest="node_command", required=True)

    p = nsub.add_parser("init", help="write a site's node config, state folder, policy and key pair")
    p.add_argument("--site", required=True, help="site name in studies (letters, digits, '-' or '_')")
    p.add_argument("--vcf", required=True, help="the site's VCF/BCF file")
    p.add_argument("--samples", required=True, help="the site's samples table (TSV with an IID column)")
    p.add_argument("--state-dir", required=True, help="the node's private folder (cache, policy, ledger, audit log, keys)")
    p.add_argument("--aggregator", required=True, help="HOST:PORT of the study's aggregator")
    p.add_argument("--ca-cert", required=True, help="the study CA certificate (ca.pem)")
    p.add_argument("--config", help="where to write the node config (default: STATE_DIR/node.toml)")
    p.add_argument("--private-key", help="use this existing key pair (KEY and KEY.pub) instead of making one")
    p.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the node's runtime API (127.0.0.1 only; default 9094)"
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls while idle (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing node config (keys and policy are always kept)")
    p.set_defaults(func=_node_init)

    p = nsub.add_parser("check", help="health checks: data, samples, cache, policy, certificates, key, aggregator")
    p.add_argument("--config", required=True, help="the node config (node.toml)")
    p.add_argument("--no-build", action="store_true", help="do not build a missing genotype cache (fail instead)")
    p.add_argument("--offline", action="store_true", help="skip the aggregator connection check")
    p.add_argument("--min-days", type=float, default=30, help="fail if a certificate expires within this many days (default 30)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the aggregator (default 5)")
    p.set_defaults(func=_node_check)

    p = nsub.add_parser("start", help="run the site node in the foreground (TLS, node authentication)")
    p.add_argument("--config", required=True, help="the node config (node.toml)")
    p.set_defaults(func=_node_start)

    p = nsub.add_parser("rotate-key", help="make a new key pair; the old one is kept under keys/retired/")
    p.add_argument("--config", required=True, help="the node config (node.toml)")
    p.set_defaults(func=_node_rotate)

    agg = subparsers.add_parser(
        "aggregator", help="aggregator: init, start, register, nodes, unregister", description=AGG_HELP, formatter_class=fmt
    )
    asub = agg.add_subparsers(dest="aggregator_command", required=True)

    p = asub.add_parser("init", help="write the aggregator config")
    p.add_argument("--state-dir", required=True, help="the aggregator's private folder (SuperLink database, admin settings)")
    p.add_argument("--ca-cert", required=True, help="the study CA certificate (ca.pem)")
    p.add_argument("--cert", required=True, help="the aggregator's TLS certificate (server.pem)")
    p.add_argument("--key", required=True, help="the aggregator's TLS private key (server.key)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0 = all interfaces)")
    p.add_argument("--port", type=int, default=9092, help="listen port (default 9092)")
    p.add_argument("--admin-host", action="append", dest="admin_hosts", metavar="IP",
                   help="client address allowed on the Control API (repeat; default 127.0.0.1 and ::1)")  # fmt: skip
    p.add_argument("--config", help="where to write the config (default: STATE_DIR/aggregator.toml)")
    p.add_argument("--force", action="store_true", help="replace an existing config")
    p.set_defaults(func=_agg_init)

    p = asub.add_parser("start", help="run the SuperLink in the foreground (TLS, node authentication)")
    p.add_argument("--config", required=True, help="the aggregator config (aggregator.toml)")
    p.set_defaults(func=_agg_start)

    p = asub.add_parser("register", help="allow a site's node key (the aggregator must be running)")
    p.add_argument("--config", required=True, help="the aggregator config (aggregator.toml)")
    p.add_argument("site", help="site name")
    p.add_argument("public_key", help="the site's public key file (node.key.pub)")
    p.set_defaults(func=_agg_register)

    p = asub.add_parser("unregister", help="revoke a site's node key(s)")
    p.add_argument("--config", required=True, help="the aggregator config (aggregator.toml)")
    p.add_argument("site", help="site name")
    p.add_argument("--node-id", help="revoke only this node id (e.g. the old key after a rotation)")
    p.set_defaults(func=_agg_unregister)

    p = asub.add_parser("nodes", help="registered site nodes and their status")
    p.add_argument("--config", required=True, help="the aggregator config (aggregator.toml)")
    p.set_defaults(func=_agg_nodes)


# ---------------------------------------------------------------- node


def _node_init(args: argparse.Namespace) -> int:
    from fedgen.node.ops import init_site

    res = init_site(
        site=args.site,
        vcf=args.vcf,
        samples=args.samples,
        state_dir=args.state_dir,
        aggregator=args.aggregator,
        ca_cert=args.ca_cert,
        config=args.config,
        private_key=args.private_key,
        runtime_port=args.runtime_port,
        poll_interval=args.poll_interval,
        force=args.force,
    )
    for item in res.created:
        print(f"created {item}")
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"node public key: {res.public_key} ({res.fingerprint})")
    print("next:")
    print(f"  1. send {res.public_key} to the aggregator operator (it is public; the private key stays here)")
    print(f"  2. fedgen node check --config {res.config}")
    print(f"  3. fedgen node start --config {res.config}")
    return 0


def _node_check(args: argparse.Namespace) -> int:
    import logging

    from fedgen.node.check import FAIL, run_checks

    logging.getLogger("fedgen").setLevel(logging.WARNING)  # one line per check, nothing between

    results = run_checks(
        args.config,
        build_cache=not args.no_build,
        network=not args.offline,
        min_days=args.min_days,
        timeout=args.timeout,
        emit=lambda c: print(c.line(), flush=True),
    )
    return 1 if any(c.status == FAIL for c in results) else 0


def _node_start(args: argparse.Namespace) -> int:
    from fedgen.node.ops import start_site

    sys.stdout.flush()
    start_site(args.config)  # does not return
    return 0


def _node_rotate(args: argparse.Namespace) -> int:
    from fedgen.node.ops import rotate_key

    pub, fp, old = rotate_key(args.config)
    print(f"new node public key: {pub} ({fp}); old key kept as {old}")
    print("next:")
    print(f"  1. the aggregator operator registers {pub}: fedgen aggregator register --config AGG.toml SITE {pub.name}")
    print(f"  2. restart the node (systemctl restart fedgen-node@SITE, or fedgen node start --config {args.config})")
    print("  3. the aggregator operator revokes the old key: fedgen aggregator nodes ... then unregister --node-id OLD_ID")
    return 0


# ---------------------------------------------------------------- aggregator


def _agg_init(args: argparse.Namespace) -> int:
    from fedgen.node.ops import init_aggregator

    path = init_aggregator(
        state_dir=args.state_dir,
        ca_cert=args.ca_cert,
        cert=args.cert,
        key=args.key,
        host=args.host,
        port=args.port,
        admin_hosts=args.admin_hosts,
        config=args.config,
        force=args.force,
    )
    print(f"created aggregator config {path}")
    print(f"next: fedgen aggregator start --config {path}")
    return 0


def _agg_start(args: argparse.Namespace) -> int:
    try:  # the aggregator runs studies (Hydra configs, plots, the report): it needs the study extra
        import hydra  # noqa: F401
        import matplotlib  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        from fedgen.cli import _need_study_extra

        raise _need_study_extra(exc, "aggregator start") from None
    from fedgen.node.ops import start_aggregator

    sys.stdout.flush()
    start_aggregator(args.config)  # does not return
    return 0


def _agg_register(args: argparse.Namespace) -> int:
    from fedgen.node.ops import register_site

    node_id, fp = register_site(args.config, args.site, args.public_key)
    print(f"registered site {args.site}: node id {node_id}, key {fp}")
    return 0


def _agg_unregister(args: argparse.Namespace) -> int:
    from fedgen.node.ops import unregister_site

    removed = unregister_site(args.config, args.site, args.node_id)
    print(f"revoked site {args.site}: node id(s) {', '.join(removed)} (a node using that key is disconnected)")
    return 0


def _agg_nodes(args: argparse.Namespace) -> int:
    from fedgen.node.ops import list_nodes

    rows = list_nodes(args.config)
    if not rows:
        print("no site nodes registered")
        return 0
    cols = ("site", "node_id", "status", "fingerprint", "since")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    return 0
