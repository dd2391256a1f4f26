"""Configuration: one TOML file, environment overrides, eager validation.

Precedence (highest first): command-line flags (applied by the CLI through
:meth:`Config.replace`), environment variables ``MRRP__<SECTION>__<KEY>``, the TOML file,
built-in defaults. Every key is documented in ``deploy/mrrp.example.toml``; a test keeps
that file and the dataclasses below in step.

Errors name the key, the offending value and the source (file or environment variable), so
an operator can fix them without reading code.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from mrrp_pacs.errors import ConfigError
from mrrp_pacs.features.families import FAMILY_NAMES

ENV_PREFIX = "MRRP__"
CONFIG_ENV = "MRRP_CONFIG"


@dataclass(frozen=True)
class PathsConfig:
    """Where state lives: one state folder, the database's folder.

    The state folder holds the database (``mrrp.sqlite3``), the object store (``objects/``),
    the model store (``models/``) and the scheduler's job store (``scheduler.sqlite3``). It is
    ``data_dir``, or the folder of ``db`` when a database file is named (``[paths] db`` or
    ``--db FILE``, see :meth:`Config.with_db`); ``objects`` and ``model_store`` move only those
    two elsewhere. :func:`load_config` makes every path absolute (a file's relative paths
    against its folder, the environment's and the defaults against the current directory), so
    no child process or change of directory changes what they name.
    """

    data_dir: Path = Path("mrrp-data")
    db: Path | None = None  # default: <data_dir>/mrrp.sqlite3
    objects: Path | None = None  # default: <state folder>/objects
    model_store: Path | None = None  # default: <state folder>/models

    @property
    def db_file(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "mrrp.sqlite3"

    @property
    def state_dir(self) -> Path:
        """The folder of the database, where the other state is found unless configured."""
        return self.db_file.parent

    @property
    def objects_dir(self) -> Path:
        return self.objects if self.objects is not None else self.state_dir / "objects"

    @property
    def model_store_dir(self) -> Path:
        return self.model_store if self.model_store is not None else self.state_dir / "models"

    @property
    def scheduler_db(self) -> Path:
        """The scheduler's persistent job store (not configurable: it follows the database)."""
        return self.state_dir / "scheduler.sqlite3"

    @property
    def lock_file(self) -> Path:
        """Held by the one process that runs jobs on this database (:mod:`mrrp_pacs.statelock`)."""
        return self.state_dir / "mrrp.lock"

    def absolute(self, base_dir: Path) -> PathsConfig:
        """Every path made absolute, relative ones taken against ``base_dir``."""
        base = base_dir.expanduser().absolute()

        def under(path: Path) -> Path:
            path = path.expanduser()
            return path if path.is_absolute() else base / path

        return PathsConfig(
            data_dir=under(self.data_dir), db=None if self.db is None else under(self.db),
            objects=None if self.objects is None else under(self.objects),
            model_store=None if self.model_store is None else under(self.model_store))


@dataclass(frozen=True)
class IdentityConfig:
    """How a DICOM patient and an HL7 patient are recognised as the same person."""

    match: Literal["id+issuer", "id"] = "id+issuer"
    # Issuer names as one system spells them -> the canonical name (both sides are mapped).
    issuer_aliases: dict[str, str] = field(default_factory=dict)
    # Which PID-3 repetition identifies the patient: the one with this assigning authority;
    # empty = the first repetition of identifier type MR, else the first one.
    hl7_assigning_authority: str = ""
    # Issuer assumed when a message or object names none (DICOM IssuerOfPatientID is often empty).
    default_issuer: str = ""


@dataclass(frozen=True)
class IngestConfig:
    """Limits and field choices for everything that enters the store."""

    # Largest HL7 file or MLLP message accepted; larger ones are rejected, not truncated.
    max_hl7_bytes: int = 4 * 1024 * 1024
    # Bytes kept of input refused for its content (`mrrp-pacs quarantine`); oldest dropped beyond.
    refused_keep_bytes: int = 256 * 1024 * 1024
    # Largest DICOM object accepted (file drop, storage SCP, pulls); larger ones are refused
    # (C-STORE status 0xC000: not to be sent again). 8 GiB: a whole slide's base level can
    # reach several GiB (40x, 100k x 100k pixels JPEG at ~1 bit/pixel is ~1.3 GB, larger when
    # lossless); received to disk, so the cap is about disk use, not memory.
    max_dicom_bytes: int = 8 * 1024 * 1024 * 1024
    # Where an ORU's OBR carries the accession number linking a report to its imaging study,
    # tried in order; the first non-empty wins.
    accession_fields: list[str] = field(default_factory=lambda: ["OBR-3", "OBR-18"])
    # OBR-24 (diagnostic service section) values that mark an ultrasound report.
    ultrasound_sections: list[str] = field(default_factory=lambda: ["US", "RUS"])
    # OBR-24 values that mark a pathology result.
    pathology_sections: list[str] = field(default_factory=lambda: ["SP", "PAT", "AP", "CP"])


@dataclass(frozen=True)
class ClinicalConfig:
    """The clinical schema: the model's variables and the OBX codes that carry them."""

    # TOML file with [variables.<name>] tables; empty = the built-in schema
    # (mrrp_pacs/data/clinical_schema.toml), which documents the format.
    schema_file: Path | None = None


@dataclass(frozen=True)
class FeaturesConfig:
    """Feature extraction: which families, tiling, and the encoders (local weights only)."""

    families: list[str] = field(default_factory=lambda: list(FAMILY_NAMES))
    target_mpp: float = 0.5  # µm/px of the slide tiles
    tile_px: int = 224
    max_tiles: int = 64  # per slide, chosen evenly over the tumour region
    wsi_encoder: str = "hed-texture"  # a name in mrrp_pacs/data/tile_encoders.toml
    # local checkpoint per tile encoder name, e.g. { uni = "/models/uni/pytorch_model.bin" }
    encoder_checkpoints: dict[str, str] = field(default_factory=dict)
    bf16: bool = False  # bfloat16 autocast for transformer tile encoders
    # HoVer-Net checkpoint (tiatoolbox's layout, e.g. hovernet_fast-pannuke.pth); empty = the
    # classical segmenter. docs/features.md "Learned nucleus segmenter".
    nuclei_model: Path | None = None
    nuclei_model_mpp: float = 0.25  # µm/px the checkpoint was trained at (every HoVer-Net: 0.25)
    nuclei_model_device: str = "cpu"  # torch device for it: "cpu", "cuda", "cuda:1"
    # nuclei and topology over the region (mrrp_pacs/features/region.py): blocks of this many
    # tiles a side, read with this context margin, at most this much block area per patient
    nuclei_block_tiles: int = 4
    nuclei_margin_um: float = 16.0
    nuclei_region_mm2: float = 1.0
    text_encoder: str = "minilm"  # a name in mrrp_pacs/data/text_encoders.toml
    # local Hugging Face folder per text encoder name, e.g. { bert-large = "/models/bert" }
    text_encoder_paths: dict[str, str] = field(default_factory=dict)
    findings_patterns: list[str] = field(default_factory=list)  # empty = built-in patterns
    us_encoder: str = "usresnet-small"  # name in the model store (train-encoder us)
    us_roi_margin_px: int = 6
    us_default_mm_per_px: float = 0.1  # when an image has no ultrasound region calibration
    workers: int = 1  # processes for `extract`; each loads its own encoders


@dataclass(frozen=True)
class DicomConfig:
    """Our DICOM storage SCP (what the PACS sends to, by C-STORE or as a C-MOVE destination)."""

    ae_title: str = "MRRP"
    port: int = 11112
    bind: str = "127.0.0.1"  # listen address; wider binding is explicit config (example TOML)
    # calling AE titles allowed to associate besides [pacs] ae_title, which is always allowed
    # (studies we C-MOVE arrive with it); see mrrp_pacs.daemon.allowed_calling_aes
    allowed_aes: list[str] = field(default_factory=list)
    # associations served at once (C-STORE senders, C-MOVE sub-operations); more are refused
    # (A-ASSOCIATE-RJ, local limit exceeded). Each one holds the object it is receiving in
    # memory until it is stored (docs/daemon.md "Load").
    max_associations: int = 10
    # seconds a new connection has to send its whole A-ASSOCIATE-RQ; before that it does not
    # count against max_associations (port probes cannot lock senders out)
    association_request_timeout_s: float = 5.0
    # connections from one address that have not associated yet; more are closed at once
    max_unassociated_per_address: int = 8
    # seconds a PDU has, from its first byte, to arrive whole (a trickling peer is cut off)
    pdu_timeout_s: float = 60.0
    # DICOM over TLS ([tls] certificate) on tls_port (2762: the registered DICOM-TLS port)
    tls: bool = False
    tls_port: int = 2762
    # the unencrypted listener on `port`; false (with tls = true) leaves TLS the only way in
    plain: bool = True
    # calling AE title -> source addresses/CIDR networks it may associate from; an AE listed
    # here associating from elsewhere is rejected (calling AE title not recognised)
    ae_addresses: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PacsConfig:
    """The PACS we query (C-FIND) and retrieve from (C-MOVE or C-GET), and send results to."""

    host: str = ""  # empty = do not pull
    port: int = 4242
    ae_title: str = "ORTHANC"
    method: Literal["move", "get"] = "move"
    interval_s: int = 300
    window_days: int = 7  # study dates queried: today and the days before
    modalities: list[str] = field(default_factory=lambda: ["US", "SM", "SR", "ANN"])
    timeout_s: int = 60  # seconds for a C-FIND answer
    retrieve_timeout_s: int = 600  # seconds for one C-MOVE/C-GET answer (a slide level is big)
    # look-back: a patient we hold without a slide or without an ultrasound image is asked for
    # by PatientID, any study date, for this many days after its first arrival (0 = never)
    lookback_days: int = 90
    lookback_patients: int = 20  # patients looked back per poll, the longest unasked first
    lookback_interval_h: float = 6.0  # hours before the same patient is asked again
    # a study whose retrieval failed waits retry_backoff_s, doubling per failure up to
    # retry_max_backoff_s; failing for retry_budget_h it is given up (until the PACS holds more)
    retry_backoff_s: int = 300
    retry_max_backoff_s: int = 21600
    retry_budget_h: float = 72.0
    # associate over TLS ([tls]); `port` is then the PACS's DICOM-TLS port
    tls: bool = False


@dataclass(frozen=True)
class Hl7Config:
    """The MLLP listener (HL7 v2 results and reports)."""

    port: int = 2575
    bind: str = "127.0.0.1"
    max_connections: int = 32
    idle_timeout_s: int = 600  # a connection silent this long is closed
    # a frame not complete this long after its first byte closes the connection (slow senders)
    frame_timeout_s: int = 60
    max_connections_per_address: int = 8  # more from one address are closed at once
    # threads parsing and persisting messages; messages they hand over at once are committed
    # together (group commit), so one per sending connection keeps a slow disk write from
    # holding up the messages queued behind it (docs/daemon.md "Load")
    workers: int = 8
    # MLLP over TLS ([tls] certificate) on tls_port (no registered port exists)
    tls: bool = False
    tls_port: int = 2576
    # the unencrypted listener on `port`; false (with tls = true) leaves TLS the only way in
    plain: bool = True
    # source addresses/CIDR networks allowed to connect; empty = any. Others are closed at once
    allowed_addresses: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScoringConfig:
    """When cases are scored, and with which model."""

    model: str = "mrrp"  # model name in the store; its promoted version scores
    interval_s: int = 300  # assemble ready cases, extract, score
    # hours to wait for a missing slide or ultrasound after the first image arrived, before
    # scoring with the missing modality compensated
    wait_hours: float = 72.0
    rescore_time: str = "02:00"  # nightly rescoring, HH:MM in `timezone`
    # IANA time zone of rescore_time, e.g. "Europe/Berlin" (follows daylight saving time);
    # empty = this machine's zone (/etc/localtime or $TZ)
    timezone: str = ""
    # extraction runs in a worker process (mrrp_pacs/workers.py) so that a patient that crashes
    # it, or goes over its memory or time limit, costs that patient only; "inline" runs it in
    # the daemon's process (debugging only)
    isolation: Literal["process", "inline"] = "process"
    worker_memory_mb: int = 8192  # resident memory of the worker; 0 = no limit
    worker_threads: int = 0  # torch/BLAS threads of the worker; 0 = cores less one (≥ 1)
    worker_timeout_s: int = 3600  # one patient's extraction; 0 = no limit
    # a patient whose extraction or scoring fails is retried after retry_backoff_s, doubling
    # per failure up to 24 h, and quarantined after max_failures failures (until something new
    # arrives for it, or `mrrp-pacs cases --release KEY`)
    max_failures: int = 3
    retry_backoff_s: int = 900


@dataclass(frozen=True)
class ExportConfig:
    """Results back to the PACS: where the SR and PDF go, and how the outbox retries."""

    enabled: bool = True
    # destination: empty host = the [pacs] PACS
    host: str = ""
    port: int = 0  # 0 = [pacs] port
    ae_title: str = ""  # empty = [pacs] ae_title
    calling_ae_title: str = ""  # our AE title towards it; empty = [dicom] ae_title
    timeout_s: int = 30
    sr_study: Literal["pathology", "ultrasound"] = "pathology"  # study the SR is stored in
    pdf: bool = True  # also store the human-readable Encapsulated PDF
    # site secret of the name-based UIDs (Tracking UID per patient, SR/PDF instance UIDs);
    # "secret" keeps it out of `mrrp-pacs config` (config_toml)
    uid_secret: str = field(default="mrrp-pacs", metadata={"secret": True})
    manufacturer: str = "mrrp-pacs"
    institution_name: str = ""
    # optional ORU^R01 result message to the HIS over MLLP; empty host = none
    hl7_host: str = ""
    hl7_port: int = 2575
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""
    tls: bool = False  # the DICOM destination over TLS ([tls]); port is then its TLS port
    hl7_tls: bool = False  # the ORU destination over TLS ([tls]); hl7_port is its TLS port
    interval_s: int = 60
    # a failing object is retried for retry_hours from its first failure, then "dead"
    retry_hours: float = 72.0
    max_attempts: int = 0  # an extra cap on tries; 0 = none (retry_hours decides)
    backoff_s: int = 60  # first retry delay; doubles up to max_backoff_s (jittered -50 %)
    max_backoff_s: int = 3600


@dataclass(frozen=True)
class TlsConfig:
    """Certificates of every TLS listener and client (mrrp_pacs/tls.py); each listener and
    peer turns TLS on for itself ([dicom] tls, [hl7] tls, [pacs] tls, [export] tls/hl7_tls)."""

    cert_file: Path | None = None  # our certificate (PEM, chain after it)
    key_file: Path | None = None  # its private key (PEM, not encrypted)
    # CA certificates (PEM) our peers' certificates are verified against: servers by our
    # clients (empty = the system's CAs), clients by our listeners (asked for one when set)
    ca_file: Path | None = None
    # our listeners refuse a client without a certificate signed by ca_file (mutual TLS)
    require_client_cert: bool = False
    # our clients check that the server's certificate names the host connected to
    check_hostname: bool = True


@dataclass(frozen=True)
class HttpConfig:
    """/healthz and /metrics (Prometheus text) for monitoring."""

    port: int = 8080  # 0 = off
    bind: str = "127.0.0.1"
    # /metrics: answered to loopback peers only, or, when set, to a Bearer token from anywhere
    metrics_token: str = field(default="", metadata={"secret": True})


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (`mrrp-pacs audit`): who sent, scored and exported what, when."""

    # Days audit rows are kept (older ones are deleted at each processing run); 0 = forever.
    keep_days: int = 0


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json: bool = False  # one JSON object per line instead of plain text


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    clinical: ClinicalConfig = field(default_factory=ClinicalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "built-in defaults"

    @property
    def exports_with_public_secret(self) -> bool:
        """Whether results would be exported (enabled, with a destination) under the public
        default ``uid_secret``, from which anyone can compute a patient's Tracking UID.
        ``serve`` refuses to start so; ``doctor`` fails the check."""
        return (self.export.enabled and bool(self.export.host or self.pacs.host)
                and self.export.uid_secret == ExportConfig().uid_secret)

    def replace(self, section: str, **values: Any) -> Config:
        """Return a copy with keys of one section replaced (how CLI flags are applied)."""
        current = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **values)})

    def check(self) -> Config:
        """Values each key's type cannot express: ports, AE titles, times of day.

        Raises
        ------
        ConfigError
            Naming the key, the value and this configuration's source.
        """
        def fail(key: str, value: object, expected: str) -> None:
            raise ConfigError(f"{self.source}: {key} = {value!r} is invalid; expected {expected}",
                              key=key, source=self.source)

        for key, port, lowest in (("dicom.port", self.dicom.port, 1),
                                  ("dicom.tls_port", self.dicom.tls_port, 1),
                                  ("hl7.port", self.hl7.port, 1),
                                  ("hl7.tls_port", self.hl7.tls_port, 1),
                                  ("pacs.port", self.pacs.port, 1),
                                  ("export.port", self.export.port, 0),
                                  ("export.hl7_port", self.export.hl7_port, 1),
                                  ("http.port", self.http.port, 0)):
            if not lowest <= port <= 65535:
                fail(key, port, f"a TCP port number {lowest}-65535")
        for key, titles in (("dicom.ae_title", [self.dicom.ae_title]),
                            ("pacs.ae_title", [self.pacs.ae_title]),
                            ("dicom.allowed_aes", self.dicom.allowed_aes),
                            ("export.ae_title", [self.export.ae_title] if self.export.ae_title
                             else []),
                            ("export.calling_ae_title", [self.export.calling_ae_title]
                             if self.export.calling_ae_title else [])):
            for title in titles:
                if not 0 < len(title.strip()) <= 16 or not title.isascii() or "\\" in title:
                    fail(key, title, "an AE title of 1-16 ASCII characters without backslash")
        self._check_transport(fail)
        hour, _, minute = self.scoring.rescore_time.partition(":")
        if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
            fail("scoring.rescore_time", self.scoring.rescore_time, "a time of day HH:MM")
        if self.scoring.timezone:
            try:
                zoneinfo.ZoneInfo(self.scoring.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                fail("scoring.timezone", self.scoring.timezone,
                     "an IANA time zone name such as Europe/Berlin (empty = this machine's)")
        for key, number in (("pacs.interval_s", self.pacs.interval_s),
                            ("scoring.interval_s", self.scoring.interval_s),
                            ("export.interval_s", self.export.interval_s),
                            ("pacs.window_days", self.pacs.window_days),
                            ("pacs.timeout_s", self.pacs.timeout_s),
                            ("pacs.lookback_patients", self.pacs.lookback_patients),
                            ("pacs.retry_backoff_s", self.pacs.retry_backoff_s),
                            ("hl7.max_connections", self.hl7.max_connections),
                            ("dicom.max_associations", self.dicom.max_associations),
                            ("dicom.max_unassociated_per_address",
                             self.dicom.max_unassociated_per_address),
                            ("ingest.max_dicom_bytes", self.ingest.max_dicom_bytes),
                            ("hl7.idle_timeout_s", self.hl7.idle_timeout_s),
                            ("hl7.frame_timeout_s", self.hl7.frame_timeout_s),
                            ("hl7.max_connections_per_address",
                             self.hl7.max_connections_per_address),
                            ("ingest.refused_keep_bytes", self.ingest.refused_keep_bytes),
                            ("ingest.max_hl7_bytes", self.ingest.max_hl7_bytes),
                            ("features.tile_px", self.features.tile_px),
                            ("features.max_tiles", self.features.max_tiles),
                            ("features.nuclei_block_tiles", self.features.nuclei_block_tiles),
                            ("features.workers", self.features.workers)):
            if number < 1:
                fail(key, number, "a number of at least 1")
        if (self.pacs.retry_max_backoff_s < self.pacs.retry_backoff_s
                or not self.pacs.retry_budget_h > 0):
            fail("pacs.retry_max_backoff_s / pacs.retry_budget_h",
                 (self.pacs.retry_max_backoff_s, self.pacs.retry_budget_h),
                 "a maximum backoff of at least retry_backoff_s and a budget above 0 hours")
        if not (self.dicom.association_request_timeout_s > 0 and self.dicom.pdu_timeout_s > 0):
            fail("dicom.association_request_timeout_s / pdu_timeout_s",
                 (self.dicom.association_request_timeout_s, self.dicom.pdu_timeout_s),
                 "seconds above 0")
        if self.audit.keep_days < 0:
            fail("audit.keep_days", self.audit.keep_days, "days of at least 0 (0 = forever)")
        if not self.export.retry_hours > 0:
            fail("export.retry_hours", self.export.retry_hours, "hours above 0")
        if not 0 < self.export.backoff_s <= self.export.max_backoff_s:
            fail("export.backoff_s / max_backoff_s",
                 (self.export.backoff_s, self.export.max_backoff_s),
                 "a first delay above 0 s, at most max_backoff_s")
        if self.features.target_mpp <= 0 or self.features.us_default_mm_per_px <= 0:
            fail("features.target_mpp / us_default_mm_per_px",
                 (self.features.target_mpp, self.features.us_default_mm_per_px),
                 "sizes above 0")
        if not self.features.nuclei_model_mpp > 0:
            fail("features.nuclei_model_mpp", self.features.nuclei_model_mpp,
                 "a resolution above 0 µm/px")
        if not (self.features.nuclei_region_mm2 > 0 and self.features.nuclei_margin_um >= 0):
            fail("features.nuclei_region_mm2 / nuclei_margin_um",
                 (self.features.nuclei_region_mm2, self.features.nuclei_margin_um),
                 "an area above 0 mm² and a margin of at least 0 µm")
        return self

    def _check_transport(self, fail: Callable[[str, object, str], None]) -> None:
        """Listeners on, TLS contexts that load, address lists that parse."""
        from mrrp_pacs import tls

        for name, section in (("dicom", self.dicom), ("hl7", self.hl7)):
            if not (section.plain or section.tls):
                fail(f"{name}.plain", section.plain, f"true, or {name}.tls = true: one listener")
            if section.plain and section.tls and section.port == section.tls_port:
                fail(f"{name}.tls_port", section.tls_port, f"a port other than {name}.port")
        for title, addresses in self.dicom.ae_addresses.items():
            if not 0 < len(title.strip()) <= 16 or not title.isascii() or "\\" in title:
                fail("dicom.ae_addresses", title,
                     "AE titles of 1-16 ASCII characters without backslash as keys")
            if not addresses:
                fail(f"dicom.ae_addresses.{title}", addresses,
                     "at least one address or CIDR network (remove the AE to leave it unpinned)")
        try:
            for title, addresses in self.dicom.ae_addresses.items():
                tls.parse_networks(addresses, f"dicom.ae_addresses.{title}")
            tls.parse_networks(self.hl7.allowed_addresses, "hl7.allowed_addresses")
            if self.dicom.tls or self.hl7.tls:
                tls.server_context(self.tls)
            if self.pacs.tls or self.export.tls or self.export.hl7_tls:
                tls.client_context(self.tls)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}", key=exc.key, source=self.source) from None

    def with_db(self, db: Path) -> Config:
        """Use ``db`` as the database (``--db``): its folder becomes the state folder.

        Objects, models and the scheduler's job store are then found beside it, as with
        ``[paths] data_dir``, unless ``[paths] objects`` or ``model_store`` name other
        folders. A relative ``db`` is taken against the current directory.
        """
        db = db.expanduser().absolute()
        return self.replace("paths", db=db, data_dir=db.parent)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read ``path`` (or ``$MRRP_CONFIG``; none = defaults), then apply environment overrides.

    Raises
    ------
    ConfigError
        Unreadable or invalid TOML, an unknown section or key, or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "built-in defaults"
    if path is not None:
        path = path.expanduser()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", source=str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}",
                              source=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}",
                              source=str(path)) from None
        base_dir = path.absolute().parent
        source = str(path)

    sections: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{name}]; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{name}' must be a [section], got {value!r}")
        sections[name] = {
            key: _coerce(f"{name}.{key}", _field_type(name, key, source), val, source, base_dir)
            for key, val in value.items()
        }

    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(
                f"environment variable {var}: expected {ENV_PREFIX}<SECTION>__<KEY> with a "
                f"section among {', '.join(SECTIONS)}"
            )
        name, key = parts
        kind = _field_type(name, key, f"environment variable {var}")
        value = _coerce(f"{name}.{key}", kind, _parse_env(text, kind), f"${var}", Path.cwd())
        sections.setdefault(name, {})[key] = value

    built = {name: SECTIONS[name](**values) for name, values in sections.items()}
    config = Config(**built, source=source)
    # the defaults are the only relative paths left: they name folders of the current directory
    config = dataclasses.replace(config, paths=config.paths.absolute(Path.cwd()))
    return config.check()


def read_data_toml(path: Path | None, resource: str, what: str) -> tuple[dict[str, Any], str]:
    """A TOML table file: ``path``, or the package's ``mrrp_pacs/data/<resource>`` when None.

    Returns the parsed table and how to name its source in messages.

    Raises
    ------
    ConfigError
        The file cannot be read or is not valid TOML.
    """
    if path is None:
        text = resources.files("mrrp_pacs").joinpath(f"data/{resource}").read_text(
            encoding="utf-8")
        source = f"built-in {what}"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
        source = f"{what} {path}"
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


def _field_type(section: str, key: str, source: str) -> Any:
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key '{section}.{key}'; known keys in [{section}]: "
            f"{', '.join(hints)}"
        )
    return hints[key]


def _parse_env(text: str, kind: Any) -> Any:
    """Turn an environment string into the value a TOML file would have given."""
    origin = typing.get_origin(kind)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        return text
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            return text
    if origin is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if origin is dict:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return text


def _coerce(key: str, kind: Any, value: Any, source: str, base_dir: Path) -> Any:
    """Check ``value`` against the declared type; resolve relative paths."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {key} = {value!r} is invalid: expected {expected}, "
            f"got {type(value).__name__}", key=key, source=source)

    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if value == "":
            return None
        return _coerce(key, inner, value, source, base_dir)
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty path string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base_dir / path
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("an integer of 0 or more")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise bad("a number of 0 or more")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: {key} = {value!r} is invalid: expected one of "
                f"{', '.join(repr(a) for a in args)}"
            )
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        if key == "features.families" and not set(value) <= set(FAMILY_NAMES):
            raise ConfigError(f"{source}: {key} = {value!r}: unknown families "
                              f"{sorted(set(value) - set(FAMILY_NAMES))}; known: "
                              f"{', '.join(FAMILY_NAMES)}")
        return list(value)
    if origin is dict and args and typing.get_origin(args[1]) is list:
        if not isinstance(value, dict) or not all(
                isinstance(v, list) and all(isinstance(item, str) for item in v)
                for v in value.values()):
            raise bad("a table of lists of strings")
        return {k: list(v) for k, v in value.items()}
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported type {kind!r}")  # pragma: no cover


def local_address(bind: str) -> str:
    """Where this machine reaches a listener bound to ``bind``: the address itself, or the
    loopback address for a wildcard (which is something to bind, not to connect to)."""
    return "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind  # noqa: S104


def config_toml(config: Config) -> str:
    """``config`` as TOML that :func:`load_config` reads back to the same values.

    Paths are written absolute (as the program resolves them: against the file's folder, else
    the working folder), so the text loads the same from any folder. A key declared secret
    (field metadata ``secret``) is written only while it still has its public default;
    otherwise it is a comment, so the text loads with the default and ``mrrp-pacs doctor``
    flags it.
    """
    lines: list[str] = []
    for name in SECTIONS:
        section = getattr(config, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("secret") and value != f.default:
                lines.append(f"# {f.name} = (set, not shown: secrets are redacted)")
            elif f.metadata.get("secret"):
                lines.append(f"{f.name} = {_toml_value(value)}  # the public default: set your own")
            elif value is None:
                lines.append(f'{f.name} = ""  # default')
            else:  # a relative path (no file, or from the environment) is the cwd's
                shown = value.absolute() if isinstance(value, Path) else value
                lines.append(f"{f.name} = {_toml_value(shown)}")
        lines.append("")
    return "\n".join(lines)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    """A TOML literal of a configuration value (the types :func:`_coerce` accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # a float keeps its point (0.5, 72.0): TOML reads it as a float
    if isinstance(value, str | Path):
        return '"' + "".join(
            _TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F
                                     else c) for c in str(value)) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")  # pragma: no cover
