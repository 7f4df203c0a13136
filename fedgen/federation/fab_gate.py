"""Which study apps (FABs) a site accepts, and the FAB fedgen submits for a study.

In Flower's deployment engine the submitter of a run ships a FAB (a zip: ``pyproject.toml``,
``.info/CONTENT`` and whatever code the submitter put in it) and every SuperNode normally
imports the ClientApp from it. A fedgen site never does: its SuperExec
(:mod:`fedgen.federation.superexec`) runs ``fedgen.federation.client_app:app`` from the
site's installed fedgen for every run it accepts, and refuses the others before any site data
is opened. This module decides which runs those are.

:func:`check_fab` accepts a FAB iff

* its SHA-256 (of the FAB bytes, as Flower computes ``fab_hash``) is listed in the policy's
  ``accepted_fab_hashes``; or
* it is a **fedgen study manifest**: the archive holds only ``pyproject.toml`` and Flower's
  metadata (``.info/CONTENT``; no code of any kind), its components are fedgen's
  (``fedgen.federation.server_app:app`` / ``fedgen.federation.client_app:app``), and it
  declares (``[tool.fedgen] version``) a fedgen version that is in the policy's
  ``accepted_fedgen_versions`` and equals the installed fedgen version (a site speaks only
  its own version's protocol).

Either way the site runs its own installed ClientApp; accepting a FAB only means agreeing to
answer that run's messages with it.

The FAB fedgen submits (:func:`write_study_app`) is ``app/pyproject.toml`` with the installed
fedgen version written in at submit time. Flower builds FABs deterministically (fixed zip
timestamps, sorted entries, ``pyproject.toml`` re-serialised), so the same fedgen version and
the same flwr version give the same bytes and hash for every study: the study plan travels in
the run config (``flwr run --run-config``), not in the FAB.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

SERVERAPP_REF = "fedgen.federation.server_app:app"
CLIENTAPP_REF = "fedgen.federation.client_app:app"
MANIFEST_FILE = "pyproject.toml"
FLOWER_METADATA_DIR = ".info/"
#: File kinds allowed under ``.info/`` (Flower's CONTENT list, signatures): data, never code.
_METADATA_SUFFIXES = frozenset({"", ".json", ".txt", ".sig", ".asc", ".pem"})
TEMPLATE = Path(__file__).resolve().parent / "app" / MANIFEST_FILE
STUDY_APP_NAME = "fedgen-study"
_MAX_FAB_BYTES = 10 * 1024 * 1024  # Flower's FAB_MAX_SIZE


@dataclass(frozen=True)
class FabDecision:
    """The outcome of :func:`check_fab`; unpacks as ``(accepted, reason, fab_hash, declared_version)``."""

    accepted: bool
    reason: str
    fab_hash: str
    declared_version: str | None
    fab_id: str | None = None  # "publisher/name" from the FAB's pyproject, when readable

    def __iter__(self) -> Iterator[Any]:
        return iter((self.accepted, self.reason, self.fab_hash, self.declared_version))


def installed_version() -> str:
    import fedgen

    return str(fedgen.__version__)


def _content(fab: Any) -> bytes:
    """FAB bytes from bytes or a Flower ``Fab`` (its ``hash_str`` is never trusted)."""
    if isinstance(fab, (bytes, bytearray, memoryview)):
        return bytes(fab)
    content = getattr(fab, "content", None)
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    raise TypeError(f"expected FAB bytes or a flwr Fab, got {type(fab).__name__}")


def fab_sha256(fab: Any) -> str:
    """Hex SHA-256 of the FAB bytes (Flower's ``fab_hash``)."""
    return hashlib.sha256(_content(fab)).hexdigest()


def _is_metadata(name: str) -> bool:
    if not name.startswith(FLOWER_METADATA_DIR):
        return False
    rest = name[len(FLOWER_METADATA_DIR) :]
    if not rest or "/" in rest or rest.startswith("."):
        return False
    return Path(rest).suffix.lower() in _METADATA_SUFFIXES


def _read_manifest(content: bytes) -> tuple[dict[str, Any] | None, list[str], str | None]:
    """(parsed pyproject or None, entries that are not manifest/metadata, problem or None)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            extras = [n for n in names if n != MANIFEST_FILE and not _is_metadata(n)]
            if names.count(MANIFEST_FILE) != 1:
                return None, extras, f"it has {names.count(MANIFEST_FILE)} pyproject.toml entries (a FAB has one)"
            info = next(i for i in infos if i.filename == MANIFEST_FILE)
            if info.file_size > 1024 * 1024:
                return None, extras, "its pyproject.toml is implausibly large"
            raw = zf.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        return None, [], f"it is not a readable FAB archive ({exc})"
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, extras, f"its pyproject.toml is not valid TOML ({exc})"
    return data, extras, None


def _get(data: Mapping[str, Any] | None, *keys: str) -> Any:
    cur: Any = data
    for k in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


def _fab_id(data: Mapping[str, Any] | None) -> str | None:
    publisher, name = _get(data, "tool", "flwr", "app", "publisher"), _get(data, "project", "name")
    if isinstance(publisher, str) and isinstance(name, str):
        return f"{publisher}/{name}"
    return None


def _accepted_lists(policy: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    versions = policy.get("accepted_fedgen_versions")
    if versions is None:  # the policy default: the installed version
        versions = [installed_version()]
    hashes = policy.get("accepted_fab_hashes") or []
    return [str(v) for v in versions], [str(h).strip().lower() for h in hashes]


def describe_accepted(policy: Mapping[str, Any]) -> str:
    """``accepted fedgen versions: 0.1.0; accepted FAB hashes: none`` (for messages and checks)."""
    versions, hashes = _accepted_lists(policy)
    h = ", ".join(x[:12] + "…" for x in hashes) if hashes else "none"
    return f"accepted fedgen versions: {', '.join(versions) or 'none'}; accepted FAB hashes: {h}"


def check_fab(fab: Any, policy: Mapping[str, Any]) -> FabDecision:
    """Does the site's ``policy`` (an effective policy mapping) accept this FAB? See the module doc."""
    content = _content(fab)
    digest = hashlib.sha256(content).hexdigest()
    versions, hashes = _accepted_lists(policy)
    data, extras, problem = _read_manifest(content) if len(content) <= _MAX_FAB_BYTES else (None, [], "it is too large")
    declared = _get(data, "tool", "fedgen", "version")
    declared = str(declared) if isinstance(declared, (str, int, float)) and str(declared) else None
    fab_id = _fab_id(data)

    if digest in hashes:
        return FabDecision(True, f"FAB sha256 {digest} is listed in the site policy's accepted_fab_hashes", digest, declared, fab_id)

    installed = installed_version()
    why: str | None = problem
    if why is None and extras:
        shown = ", ".join(extras[:4]) + (f" and {len(extras) - 4} more" if len(extras) > 4 else "")
        why = f"it carries files besides {MANIFEST_FILE} ({shown}), so it is not a fedgen study manifest"
    if why is None:
        components = _get(data, "tool", "flwr", "app", "components") or {}
        for role, ref in (("clientapp", CLIENTAPP_REF), ("serverapp", SERVERAPP_REF)):
            got = components.get(role) if isinstance(components, Mapping) else None
            if got != ref:
                why = f"its {role} is {got!r}, not fedgen's ({ref})"
                break
    if why is None:
        if declared is None:
            why = "it declares no fedgen version ([tool.fedgen] version; `fedgen run` writes it)"
        elif declared != installed:
            why = f"it is a study manifest for fedgen {declared}, but this site runs fedgen {installed}"
        elif declared not in versions:
            why = f"it is a study manifest for fedgen {declared}, which is not in accepted_fedgen_versions"
    if why is None:
        return FabDecision(
            True, f"fedgen {declared} study manifest (no code), accepted by the site's policy", digest, declared, fab_id
        )
    reason = f"FAB sha256 {digest} is not accepted by the site's policy: {why} ({describe_accepted(policy)})"
    return FabDecision(False, reason, digest, declared, fab_id)


def site_policy(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The site's effective policy from ``node_config["policy"]``: a path to policy.toml, an
    inline mapping or its JSON text, or absent (defaults). Raises ValueError on problems."""
    from fedgen.node.policy import load_policy

    source = node_config.get("policy")
    if isinstance(source, str) and source.lstrip().startswith("{"):
        try:
            source = json.loads(source)
        except ValueError as exc:
            raise ValueError(f"inline policy is not valid JSON ({exc})") from None
    return load_policy(source if source else None)


def check_run(fab: Any, node_config: Mapping[str, Any]) -> FabDecision:
    """:func:`check_fab` against the site's own policy; a policy that cannot be used refuses all."""
    try:
        policy = site_policy(node_config)
    except (ValueError, OSError, TypeError) as exc:
        digest = fab_sha256(fab)
        return FabDecision(
            False,
            f"FAB sha256 {digest} not checked: the site's policy cannot be used ({exc}); "
            "every run is refused until the site fixes it",
            digest,
            None,
        )
    return check_fab(fab, policy)


# ---------------------------------------------------------------- fedgen's own study FAB


def study_pyproject(version: str | None = None) -> dict[str, Any]:
    """The study app's pyproject (the template with ``version`` or the installed fedgen version)."""
    version = version or installed_version()
    data = tomllib.loads(TEMPLATE.read_text(encoding="utf-8"))
    data["project"]["version"] = version
    data.setdefault("tool", {}).setdefault("fedgen", {})["version"] = version
    return data


def write_study_app(dest: str | Path, version: str | None = None) -> Path:
    """Write the study app folder (``pyproject.toml`` only) that ``flwr run`` turns into the FAB."""
    import tomli_w

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST_FILE).write_text(tomli_w.dumps(study_pyproject(version)), encoding="utf-8")
    return dest


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB bytes ``flwr run APP_DIR`` submits (Flower's own deterministic builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def study_fab(version: str | None = None) -> tuple[bytes, str]:
    """(bytes, sha256) of the FAB fedgen submits for studies with this fedgen (and flwr) version."""
    with tempfile.TemporaryDirectory(prefix="fedgen-fab-") as tmp:
        content = build_fab(write_study_app(Path(tmp) / STUDY_APP_NAME, version))
    return content, hashlib.sha256(content).hexdigest()
