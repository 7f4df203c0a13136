"""Site-side enforcement: the request pipeline, its disclosure registers, the audit log and the state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def state_dir_for(node_config: Mapping[str, Any]) -> Path:
    """The site's state folder: ``node_config["state_dir"]``, else ``<vcf dir>/fedgen-state``."""
    state = node_config.get("state_dir")
    if state:
        return Path(str(state)).expanduser()
    vcf = node_config.get("vcf")
    if not vcf:
        raise ValueError("site configuration names neither state_dir nor vcf")
    from fedgen.cohort.cohort import default_state_dir

    return default_state_dir(Path(str(vcf)).expanduser())
