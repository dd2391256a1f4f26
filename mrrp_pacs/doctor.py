"""``mrrp-pacs doctor``: every precondition of the daemon, each checked and explained.

Each :class:`Check` says ok, WARN (works, but should be changed) or FAIL, what was found,
and what to do about it. Nothing is changed: the database is opened without migrating, ports
are bound and released at once, and the PACS is sent a C-ECHO and an empty C-FIND only.

A port that cannot be bound because our own daemon listens on it is ok: the HTTP port when
its ``/healthz`` answers as mrrp-pacs, the DICOM port when our AE title answers a C-ECHO
there (called with ``[pacs] ae_title``, which the SCP always allows), the MLLP port when that
``/healthz`` reports the hl7 listener up (HL7 has no probe without side effects).
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrrp_pacs import quarantine, tls
from mrrp_pacs.config import Config, ExportConfig, local_address

MIN_FREE_BYTES = 2 * 1024**3  # one day of slides on a small site
PROBE_TIMEOUT_S = 3.0  # for asking a busy port whether our own daemon holds it


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool  # False fails the doctor (exit status 1)
    detail: str
    fix: str = ""
    warning: bool = False  # with ok: it works, but should be changed (fix says how)

    def line(self) -> str:
        mark = "FAIL" if not self.ok else "WARN" if self.warning else "ok  "
        text = f"{mark}  {self.name}: {self.detail}"
        return text if mark == "ok  " or not self.fix else f"{text}\n      -> {self.fix}"


def run_checks(config: Config, min_free_bytes: int = MIN_FREE_BYTES,
               check_ports: bool = True) -> list[Check]:
    """Every check, in the order an operator fixes them."""
    checks: list[Check] = [Check("configuration", True, f"valid ({config.source})")]
    for check in (_uid_secret, _tls, _disk, _database, _models, _encoders):
        checks.extend(check(config, min_free_bytes))
    if check_ports:
        checks.extend(_ports(config))
    checks.extend(_peers(config))
    return checks


def _uid_secret(config: Config, _: int) -> Iterator[Check]:
    if not config.export.enabled:
        return
    if config.export.uid_secret == ExportConfig().uid_secret:
        # with a destination, `serve` refuses to start: a failure; without one, a warning
        refused = config.exports_with_public_secret
        yield Check("uid secret", not refused, "[export] uid_secret is the public default "
                    f"{config.export.uid_secret!r}: anyone who knows a patient key can compute "
                    "that patient's Tracking UID and the UIDs of its SRs and PDFs"
                    + ("; `serve` refuses to export with it" if refused else ""),
                    "set [export] uid_secret to a long random string (e.g. `python3 -c "
                    "'import secrets; print(secrets.token_hex(32))'`) before results are "
                    "exported, and keep it with the backups: another secret gives every "
                    "patient new UIDs", warning=not refused)
    else:
        yield Check("uid secret", True, "[export] uid_secret set (not the public default)")


def _disk(config: Config, min_free_bytes: int) -> Iterator[Check]:
    folder = _existing_parent(config.paths.db_file.parent)
    free = shutil.disk_usage(folder).free
    yield Check("disk space", free >= min_free_bytes,
                f"{free / 1024**3:.1f} GiB free at {folder}",
                f"free space or move [paths] data_dir: at least "
                f"{min_free_bytes / 1024**3:.0f} GiB is advised")


def _database(config: Config, _: int) -> Iterator[Check]:
    from mrrp_pacs.store import Store
    from mrrp_pacs.store.migrations import available_migrations

    db = config.paths.db_file
    latest = available_migrations()[-1].version
    if not db.exists():
        yield Check("database", False, f"{db} does not exist",
                    f"run `mrrp-pacs --config FILE migrate` to create it (schema {latest})")
        return
    try:
        with Store(db, config.paths.objects_dir, migrate=False) as store:
            version = store.schema_version
            store.conn.execute("BEGIN IMMEDIATE")
            store.conn.execute("ROLLBACK")
    except (sqlite3.Error, OSError) as exc:
        yield Check("database", False, f"{db} cannot be written: {exc}",
                    "check permissions, free space and that no other program locks it")
        return
    if version != latest:
        fix = ("run `mrrp-pacs migrate`" if version < latest
               else "this mrrp-pacs is older than the database: upgrade mrrp-pacs")
        yield Check("database", False, f"{db} is at schema {version}, the code at {latest}",
                    fix)
        return
    yield Check("database", True, f"{db} writable, schema {version}")
    with Store(db, config.paths.objects_dir, migrate=False) as store:
        held = quarantine.counts(store)
    if held[quarantine.QUARANTINED] or held["failing"]:
        yield Check("failed patients", True,
                    f"{held[quarantine.QUARANTINED]} quarantined, {held['failing']} failing "
                    "(extraction or scoring failed; retried with backoff, then quarantined)",
                    "see `mrrp-pacs cases` for why; after fixing the cause, "
                    "`mrrp-pacs cases --release KEY`", warning=True)
    else:
        yield Check("failed patients", True, "none")
    objects = config.paths.objects_dir
    probe = objects / ".doctor-probe"
    try:
        objects.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        yield Check("object store", True, f"{objects} writable")
    except OSError as exc:
        yield Check("object store", False, f"{objects} cannot be written: {exc.strerror}",
                    "fix its permissions or set [paths] objects")


def _models(config: Config, _: int) -> Iterator[Check]:
    from model_store import ModelStore
    from mrrp_pacs.errors import ModelStoreError
    from mrrp_pacs.features.us_encoder import US_ENCODER_KIND
    from mrrp_pacs.model.train import MODEL_KIND

    store = ModelStore(config.paths.model_store_dir)
    for kind, name, how in ((MODEL_KIND, config.scoring.model, "mrrp-pacs train"),
                            (US_ENCODER_KIND, config.features.us_encoder,
                             "mrrp-pacs train-encoder us")):
        try:
            version = store.load(kind, name)
        except ModelStoreError as exc:
            yield Check(f"model {kind}/{name}", False, str(exc),
                        f"train one (`{how}`) or point [paths] model_store at the models")
            continue
        promoted = store.promoted(kind, name)
        yield Check(f"model {kind}/{name}", True,
                    f"{version.version} verified ({'promoted' if promoted else 'latest'})")


def _encoders(config: Config, _: int) -> Iterator[Check]:
    from mrrp_pacs.features.encoders import load_registry
    from mrrp_pacs.features.text import load_text_encoder_registry

    features = config.features
    tile = load_registry().get(features.wsi_encoder)
    if tile is None:
        yield Check("tile encoder", False, f"{features.wsi_encoder!r} is not in the registry",
                    "set [features] wsi_encoder to a name of mrrp_pacs/data/tile_encoders.toml")
    elif tile.backend != "hed-texture":
        yield _file_check("tile encoder weights",
                          features.encoder_checkpoints.get(features.wsi_encoder),
                          f"set [features] encoder_checkpoints.{features.wsi_encoder} to the "
                          "local checkpoint file")
    else:
        yield Check("tile encoder", True, f"{tile.name} (built in, no weights)")
    text = load_text_encoder_registry().get(features.text_encoder)
    if text is None:
        yield Check("text encoder", False, f"{features.text_encoder!r} is not in the registry",
                    "set [features] text_encoder to a name of mrrp_pacs/data/text_encoders.toml")
    elif text.kind == "directory":
        yield _file_check("text encoder weights",
                          features.text_encoder_paths.get(features.text_encoder),
                          f"set [features] text_encoder_paths.{features.text_encoder} to the "
                          "local model folder", folder=True)
    else:
        yield Check("text encoder", True, f"{text.name} (ships with package {text.package})")
    if features.nuclei_model is not None:
        yield _file_check("nucleus model", str(features.nuclei_model),
                          "set [features] nuclei_model to a local HoVer-Net checkpoint "
                          "(tiatoolbox layout), or leave it empty for the classical "
                          "segmenter")


def _tls(config: Config, _: int) -> Iterator[Check]:
    """What runs over TLS (the certificates themselves were loaded by the configuration check)."""
    dicom, hl7, export = config.dicom, config.hl7, config.export
    servers = [f"{name} port {section.tls_port}" + ("" if section.plain else " only")
               for name, section in (("DICOM", dicom), ("MLLP", hl7)) if section.tls]
    clients = [name for name, on in (("PACS", config.pacs.tls), ("export", export.tls),
                                     ("HL7 export", export.hl7_tls)) if on]
    if not servers and not clients:
        yield Check("TLS", True, "off (no listener or peer has tls = true)")
        return
    how = []
    if servers:
        how.append("client certificates " + ("required" if config.tls.require_client_cert
                                              else "not required"))
    if clients and not config.tls.check_hostname:
        how.append("server names not checked")
    yield Check("TLS", True, f"listening on {', '.join(servers) or 'no TLS port'}; to "
                f"{', '.join(clients) or 'no peer'} ({'; '.join(how) or 'server names checked'})")


def _file_check(name: str, path: str | None, fix: str, folder: bool = False) -> Check:
    if not path:
        return Check(name, False, "no local path configured", fix)
    found = Path(path).is_dir() if folder else Path(path).is_file()
    return Check(name, found, f"{path} {'present' if found else 'missing'}", fix)


def _ports(config: Config) -> Iterator[Check]:
    wanted = []
    for name, section, key in (("DICOM", config.dicom, "dicom"), ("MLLP", config.hl7, "hl7")):
        if section.plain:
            wanted.append((f"{name} port", section.bind, section.port, f"[{key}] port"))
        if section.tls:
            wanted.append((f"{name} TLS port", section.bind, section.tls_port,
                           f"[{key}] tls_port"))
    if config.http.port:
        wanted.append(("HTTP port", config.http.bind, config.http.port, "[http] port"))
    health: list[dict[str, Any] | None] = []  # asked once, when a port is busy
    for name, host, port, key in wanted:
        with socket.socket() as probe:
            # as our listeners do: connections closed a moment ago (TIME_WAIT) do not matter
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if not health:
                    health.append(our_healthz(config))
                ours = _held_by_our_daemon(name, config, health[0])
                if ours is not None:
                    yield Check(name, True, f"{host}:{port} in use by the running mrrp-pacs "
                                f"daemon ({ours})")
                    continue
                yield Check(name, False, f"{host}:{port} cannot be bound ({exc.strerror}) "
                            "and no mrrp-pacs daemon of this configuration answers there",
                            f"stop what uses it or change {key}")
                continue
        yield Check(name, True, f"{host}:{port} free")


def our_healthz(config: Config) -> dict[str, Any] | None:
    """The ``/healthz`` body of an mrrp-pacs daemon on the configured HTTP port, or None when
    nothing there answers as mrrp-pacs (its Server header)."""
    if not config.http.port:
        return None
    url = f"http://{local_address(config.http.bind)}:{config.http.port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never http_proxy
    try:
        with direct.open(url, timeout=PROBE_TIMEOUT_S) as answer:
            server, body = answer.headers.get("Server", ""), answer.read()
    except urllib.error.HTTPError as error:  # 503: ours, but a component is down
        server, body = error.headers.get("Server", ""), error.read()
    except (OSError, ValueError):
        return None
    if not server.startswith("mrrp-pacs"):
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _held_by_our_daemon(name: str, config: Config, health: dict[str, Any] | None) -> str | None:
    """Why port ``name`` is taken by our own daemon, or None when that cannot be shown."""
    components = (health or {}).get("components", {})
    if name == "HTTP port":
        return f"its /healthz answers {health.get('status')!r}" if health else None
    if name in ("DICOM port", "DICOM TLS port"):
        dicom = config.dicom
        context = None
        if name == "DICOM TLS port":
            # only "is it our AE?": our own listener need not be signed by the peers' CA
            context = tls.client_context(config.tls)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        port = dicom.tls_port if context is not None else dicom.port
        error = c_echo(local_address(dicom.bind), port, dicom.ae_title,
                       config.pacs.ae_title, timeout_s=PROBE_TIMEOUT_S, ssl_context=context)
        return f"our AE {dicom.ae_title} answers C-ECHO there" if error is None else None
    if components.get("hl7") is True:
        return "its /healthz reports the hl7 listener up"
    return None


def _peers(config: Config) -> Iterator[Check]:
    pacs, export = config.pacs, config.export
    if not pacs.host and not export.host:
        if export.enabled:
            yield Check("PACS", True, "none configured ([pacs] host and [export] host empty), "
                        "but [export] enabled = true: SRs and PDFs are queued in the outbox "
                        "and never sent",
                        "set [export] host, port and ae_title (or [pacs] host) to the PACS "
                        "that receives the results, or set [export] enabled = false",
                        warning=True)
        else:
            yield Check("PACS", True, "none configured ([pacs] host empty, [export] enabled = "
                        "false): push-only, results not exported")
        return
    targets = []
    if pacs.host:
        targets.append(("PACS", pacs.host, pacs.port, pacs.ae_title, pacs.tls))
    if export.enabled and export.host and (export.host, export.port, export.tls) != (
            pacs.host, pacs.port, pacs.tls):
        targets.append(("export destination", export.host, export.port or pacs.port,
                        export.ae_title or pacs.ae_title, export.tls))
    contexts = {True: tls.client_context(config.tls)} if pacs.tls or export.tls else {}
    for name, host, port, called, over_tls in targets:
        error = c_echo(host, port, called, export.calling_ae_title or config.dicom.ae_title,
                       timeout_s=min(pacs.timeout_s, 10), ssl_context=contexts.get(over_tls))
        yield Check(f"{name} (C-ECHO{' over TLS' if over_tls else ''})", error is None,
                    f"{called}@{host}:{port} " + ("answered" if error is None else error),
                    "check host, port and AE title" + (
                        "; over TLS also [tls] ca_file (their CA), check_hostname, and our "
                        "certificate if they require one" if over_tls else ""))
    if pacs.host:
        # Orthanc answers C-ECHO from anyone but aborts queries from AEs it does not know:
        # the commonest set-up failure, seen only by a query
        error = c_find_probe(pacs.host, pacs.port, pacs.ae_title, config.dicom.ae_title,
                             timeout_s=min(pacs.timeout_s, 10),
                             ssl_context=contexts.get(pacs.tls))
        yield Check("PACS (C-FIND)", error is None,
                    "accepts our queries" if error is None else error,
                    f"add our AE {config.dicom.ae_title} (host and port "
                    f"{config.dicom.port}) to the PACS's modalities (Orthanc: DicomModalities)")


def c_echo(host: str, port: int, called_ae: str, calling_ae: str,
           timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> str | None:
    """None when the peer answers a C-ECHO with success, else why not (over TLS with
    ``ssl_context``)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    with _association(host, port, called_ae, calling_ae, timeout_s, Verification,
                      ssl_context) as assoc:
        if assoc is None:
            return ("did not accept an association (refused, rejected or unreachable" +
                    (", or the TLS handshake failed)" if ssl_context is not None else ")"))
        status = assoc.send_c_echo()
    if not status or status.Status != 0x0000:
        return f"answered C-ECHO with status {getattr(status, 'Status', 'none')}"
    return None


def c_find_probe(host: str, port: int, called_ae: str, calling_ae: str,
                 timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None
                 ) -> str | None:
    """None when the peer answers a study-level C-FIND (for a date no study has) with
    success, else why not."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as Find,
    )

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDate = "29991231"
    query.StudyInstanceUID = ""
    final = None
    with _association(host, port, called_ae, calling_ae, timeout_s, Find,
                      ssl_context) as assoc:
        if assoc is None:
            return "did not accept a query association"
        for status, _ in assoc.send_c_find(query, Find):
            final = getattr(status, "Status", None)
    if final != 0x0000:
        return ("aborted our query without a status (it does not know our AE)" if final is None
                else f"answered C-FIND with status 0x{final:04X}")
    return None


@contextmanager
def _association(host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float,
                 sop_class: str, ssl_context: ssl.SSLContext | None = None) -> Iterator[Any]:
    """An association offering ``sop_class`` (None when refused), released on exit."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    ae.connection_timeout = timeout_s  # also bounds a TLS handshake
    ae.add_requested_context(sop_class)
    assoc = ae.associate(host, port, ae_title=called_ae,
                         tls_args=None if ssl_context is None else (ssl_context, host))
    try:
        yield assoc if assoc.is_established else None
    finally:
        if assoc.is_established:
            assoc.release()


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
