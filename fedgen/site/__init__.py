"""Site-side enforcement: the request pipeline, its disclosure registers, the audit log and the state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def state_dir_for(node_config: Mapping[str, Any]) -> Path:
    """The site's state folder: ``node_config["state_dir"]``, else ``<vcf dir>/fedgen-state``."""
    state = node_config.get("state_dir")
    if state:
        return Path(str(state)).expanduser()
    from fedgen.cohort.cohort import default_state_dir, genotype_input

    source = genotype_input(node_config)
    if source is None:
        raise ValueError("site configuration names neither state_dir nor a genotype input (vcf, pgen, bed)")
    return default_state_dir(source)
