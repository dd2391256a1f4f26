"""File-drop import: walk folders and persist every DICOM object and HL7 message found.

Files are recognised by content, never by name. Hidden files and folders (``.name``) are
skipped, links to folders are not followed, and a file that cannot be used is
reported with its reason; nothing stops the walk except a store that cannot be written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mrrp_pacs.intake import Intake, Outcome

LOGGER = logging.getLogger(__name__)


@dataclass
class Rejection:
    path: str
    reason: str


@dataclass
class IngestSummary:
    new: int = 0
    duplicate: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    new_by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"new": self.new, "duplicate": self.duplicate,
                "rejected": [{"path": r.path, "reason": r.reason} for r in self.rejected]}


def find_files(paths: list[Path]) -> Iterator[Path]:
    """Regular files under ``paths`` in a stable (sorted) order."""
    for root in paths:
        if root.is_file():
            yield root
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    candidate = Path(folder) / name
                    if candidate.is_file():
                        yield candidate


def ingest_paths(intake: Intake, paths: list[Path],
                 progress: Callable[[int], None] | None = None) -> IngestSummary:
    """Persist every file under ``paths``; ``progress`` is called once per file."""
    summary = IngestSummary()
    for path in find_files(paths):
        for result in intake.receive_path(path):
            if result.outcome is Outcome.NEW:
                summary.new += 1
                summary.new_by_kind[result.kind] = summary.new_by_kind.get(result.kind, 0) + 1
            elif result.outcome is Outcome.DUPLICATE:
                summary.duplicate += 1
            else:
                summary.rejected.append(Rejection(str(path), result.reason or "rejected"))
        if progress is not None:
            progress(1)
    if summary.rejected:
        # reasons go to the operator's summary, not the log: they may quote content
        LOGGER.warning("%d files rejected; the ingest summary lists them with reasons",
                       len(summary.rejected))
    return summary
