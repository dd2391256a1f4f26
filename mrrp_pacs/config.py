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
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "MRRP__"
CONFIG_ENV = "MRRP_CONFIG"


class ConfigError(ValueError):
    """A configuration file, key or value that cannot be used; the message says which."""


@dataclass(frozen=True)
class PathsConfig:
    """Where state lives. Relative paths are resolved against the config file's folder."""

    data_dir: Path = Path("mrrp-data")
    db: Path | None = None  # default: <data_dir>/mrrp.sqlite3
    objects: Path | None = None  # default: "objects" beside the database file
    model_store: Path | None = None  # default: <data_dir>/models

    @property
    def db_file(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "mrrp.sqlite3"

    @property
    def objects_dir(self) -> Path:
        return self.objects if self.objects is not None else self.db_file.parent / "objects"

    @property
    def model_store_dir(self) -> Path:
        return self.model_store if self.model_store is not None else self.data_dir / "models"


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


FEATURE_FAMILIES = ["wsi", "nuclei", "us", "radiomics", "text", "clinical"]


@dataclass(frozen=True)
class FeaturesConfig:
    """Feature extraction: which families, tiling, and the encoders (local weights only)."""

    families: list[str] = field(default_factory=lambda: list(FEATURE_FAMILIES))
    target_mpp: float = 0.5  # µm/px of the slide tiles
    tile_px: int = 224
    max_tiles: int = 64  # per slide, chosen evenly over the tumour region
    wsi_encoder: str = "hed-texture"  # a name in mrrp_pacs/data/tile_encoders.toml
    # local checkpoint per tile encoder name, e.g. { uni = "/models/uni/pytorch_model.bin" }
    encoder_checkpoints: dict[str, str] = field(default_factory=dict)
    bf16: bool = False  # bfloat16 autocast for transformer tile encoders
    nuclei_model: Path | None = None  # TorchScript nucleus model; empty = classical pipeline
    text_encoder: str = "minilm"  # a name in mrrp_pacs/data/text_encoders.toml
    # local Hugging Face folder per text encoder name, e.g. { bert-large = "/models/bert" }
    text_encoder_paths: dict[str, str] = field(default_factory=dict)
    findings_patterns: list[str] = field(default_factory=list)  # empty = built-in patterns
    us_encoder: str = "usresnet-small"  # name in the model store (train-encoder us)
    us_roi_margin_px: int = 6
    us_default_mm_per_px: float = 0.1  # when an image has no ultrasound region calibration
    workers: int = 1  # processes for `extract`; each loads its own encoders


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "built-in defaults"

    def replace(self, section: str, **values: Any) -> Config:
        """Return a copy with keys of one section replaced (how CLI flags are applied)."""
        current = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **values)})

    def with_db(self, db: Path) -> Config:
        """Use ``db`` as the database; objects go beside it unless configured elsewhere."""
        return self.replace("paths", db=db.expanduser().absolute())


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
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
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
    return Config(**built, source=source)


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
            f"got {type(value).__name__}"
        )

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
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad("a positive integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad("a positive number")
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
        if key == "features.families" and not set(value) <= set(FEATURE_FAMILIES):
            raise ConfigError(f"{source}: {key} = {value!r}: unknown families "
                              f"{sorted(set(value) - set(FEATURE_FAMILIES))}; known: "
                              f"{', '.join(FEATURE_FAMILIES)}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported type {kind!r}")  # pragma: no cover
