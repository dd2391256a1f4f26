"""``/healthz`` and ``/metrics`` (Prometheus text format) for whoever watches the daemon.

Figures come from the database on each request, so they survive restarts and agree with
``mrrp-pacs cases`` and ``outbox list``. No patient identifier appears in either answer.

``/metrics`` tells a stranger how busy the hospital is and whether results are failing: it is
answered only to peers on this machine (a loopback address) unless ``[http] metrics_token`` is
set, and then only to requests carrying ``Authorization: Bearer <token>`` (Prometheus'
``authorization`` / ``bearer_token`` setting), from anywhere. ``/healthz`` says nothing but
up or down and stays open, for the container's and the load balancer's checks.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mrrp_pacs import quarantine
from mrrp_pacs.store import Store

LOGGER = logging.getLogger(__name__)

COUNTS = (
    ("mrrp_hl7_messages_received_total", "HL7 messages stored",
     "SELECT COUNT(*) FROM hl7_messages"),
    ("mrrp_dicom_instances_stored_total", "DICOM instances stored",
     "SELECT COUNT(*) FROM instances"),
    ("mrrp_patients_scored", "Patients with a current score",
     "SELECT COUNT(DISTINCT patient_key) FROM scores WHERE superseded_by IS NULL"),
    ("mrrp_scores_total", "Scores written (every model and input version)",
     "SELECT COUNT(*) FROM scores"),
)


def metrics_text(store: Store) -> str:
    """Every metric, in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]],
              kind: str = "gauge") -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    conn = store.conn
    for name, help_text, sql in COUNTS:
        gauge(name, help_text, [("", float(conn.execute(sql).fetchone()[0]))],
              "counter" if name.endswith("_total") else "gauge")
    exports = dict(conn.execute("SELECT state, COUNT(*) FROM exports GROUP BY state").fetchall())
    gauge("mrrp_exports", "Outbox rows by state",
          [(f'{{state="{state}"}}', float(exports.get(state, 0)))
           for state in ("pending", "sent", "dead")])
    # the last run that counted cases: a finished one, or one failed for want of a model
    # (which counts every ready case as due)
    last = conn.execute(
        "SELECT detail FROM jobs WHERE kind IN ('process', 'rescore') AND state IN ('done', "
        "'failed') AND json_extract(detail, '$.due') IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    detail = json.loads(last[0]) if last and last[0] else {}
    gauge("mrrp_cases", "Cases by readiness at the last scoring run (due = ready to score; "
          "without a model every ready case is due)",
          [('{state="due"}', float(detail.get("due", 0))),
           ('{state="waiting"}', float(detail.get("waiting", 0))),
           ('{state="incomplete"}', float(detail.get("incomplete", 0)))])
    failing = quarantine.counts(store)
    gauge("mrrp_patients_failing", "Patients whose extraction or scoring failed: retried "
          "later (failing) or held until an operator or new data releases them (quarantined)",
          [(f'{{state="{state}"}}', float(n)) for state, n in failing.items()])
    durations: list[tuple[str, float]] = []
    runs: list[tuple[str, float]] = []
    for kind, state, count in conn.execute(
            "SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state ORDER BY kind, state"):
        runs.append((f'{{kind="{kind}",state="{state}"}}', float(count)))
    for kind, detail_text in conn.execute(
            "SELECT kind, detail FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs "
            "WHERE state IN ('done', 'interrupted', 'failed') GROUP BY kind) ORDER BY kind"):
        seconds = json.loads(detail_text or "{}").get("seconds")
        if seconds is not None:
            durations.append((f'{{kind="{kind}"}}', float(seconds)))
    gauge("mrrp_jobs_total", "Jobs run, by kind and final state", runs, "counter")
    gauge("mrrp_job_last_duration_seconds", "Duration of the last finished job of each kind",
          durations)
    return "\n".join(lines) + "\n"


def metrics_allowed(peer: str, authorization: str | None, token: str) -> int:
    """Whether ``/metrics`` is answered: 200, or the refusal's status (401 wrong or missing
    token, 403 not a loopback peer and no token configured)."""
    if token:
        given = (authorization or "").removeprefix("Bearer ").strip()
        return 200 if hmac.compare_digest(given.encode(), token.encode()) else 401
    try:
        local = ipaddress.ip_address(peer.removeprefix("::ffff:")).is_loopback
    except ValueError:
        local = False
    return 200 if local else 403


class HealthServer:
    """An HTTP server for ``/healthz`` and ``/metrics`` on ``host`` (``[http] bind``, loopback by
    default); runs in its own thread.

    ``checks`` maps a component name to a function returning whether it is alive; ``/healthz``
    answers 200 when all are, else 503, with a JSON body naming each. ``metrics_token``: see
    :func:`metrics_allowed`.
    """

    def __init__(self, db_path: Path, objects_dir: Path, host: str, port: int,
                 checks: dict[str, Callable[[], bool]], metrics_token: str = "") -> None:
        self.metrics_token = metrics_token
        self.db_path = db_path
        self.objects_dir = objects_dir
        self.checks = checks
        self.host = host
        self._port = port
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self._port

    def start(self) -> None:
        """Bind and serve from a thread of its own (binding here, not at construction, lets
        batch commands build the daemon's parts while a daemon runs)."""
        self.server = ThreadingHTTPServer((self.host, self._port), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="health",
                                        daemon=True)
        self._thread.start()
        LOGGER.info("health endpoint on port %d", self.port)

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.server = None

    def health(self) -> tuple[int, dict[str, Any]]:
        components = {}
        for name, check in self.checks.items():
            try:
                components[name] = bool(check())
            except Exception:  # a failing check is an unhealthy component, not a crash
                components[name] = False
        try:
            with Store(self.db_path, self.objects_dir, migrate=False) as store:
                store.conn.execute("SELECT 1").fetchone()
            components["database"] = True
        except Exception:
            components["database"] = False
        healthy = all(components.values())
        return (200 if healthy else 503), {"status": "ok" if healthy else "unhealthy",
                                           "components": components}

    def metrics(self) -> str:
        with Store(self.db_path, self.objects_dir, migrate=False) as store:
            return metrics_text(store)


def _handler(owner: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mrrp-pacs"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                status, body = owner.health()
                self._reply(status, "application/json", json.dumps(body).encode())
            elif self.path == "/metrics":
                allowed = metrics_allowed(self.client_address[0],
                                          self.headers.get("Authorization"), owner.metrics_token)
                if allowed == 401:
                    self._reply(401, "text/plain", b"a bearer token is needed\n",
                                {"WWW-Authenticate": 'Bearer realm="mrrp-pacs metrics"'})
                    return
                if allowed != 200:
                    LOGGER.info("metrics refused to %s (not this machine; set [http] "
                                "metrics_token to serve them elsewhere)", self.client_address[0])
                    self._reply(403, "text/plain", b"metrics are served on this machine only\n")
                    return
                try:
                    text = owner.metrics()
                except Exception as exc:
                    LOGGER.warning("metrics failed: %s", type(exc).__name__)
                    self._reply(503, "text/plain", b"metrics unavailable\n")
                    return
                self._reply(200, "text/plain; version=0.0.4", text.encode())
            else:
                self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")

        def _reply(self, status: int, content_type: str, body: bytes,
                   extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            LOGGER.debug("http %s", format % args)

    return Handler
