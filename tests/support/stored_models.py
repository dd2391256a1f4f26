"""Stored model versions as other code would have saved them, for the checks that follow the
store's own (architecture, code version, extractors)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def rewrite_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace a version's ``manifest.json`` *and* its ``manifest.sha256``, as a save of
    ``manifest`` would have written them (an edit that only touches the manifest is refused
    by the store before any other check could see it)."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  "
                                            "manifest.json\n")
