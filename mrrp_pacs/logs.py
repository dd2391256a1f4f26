"""Logging set-up: plain text or JSON lines. Messages never carry patient identifiers:
modules log row ids, counts and UIDs of our own making, never PatientID, names or report text."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

QUIET_LIBRARIES = ("highdicom", "pydicom", "pynetdicom", "wsidicom")


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # libraries that narrate routine work (and name UIDs of what they copy) at INFO
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    # one scheduler worker means a job due while another runs waits its turn: APScheduler
    # calls that a skipped execution and warns each time, which is the design, not a fault
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, root.level))
    logging.getLogger("apscheduler.executors").setLevel(max(logging.WARNING, root.level))
