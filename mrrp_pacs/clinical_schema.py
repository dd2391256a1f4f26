"""The clinical schema: which variables the model reads and which OBX codes carry them.

Loaded from ``mrrp_pacs/data/clinical_schema.toml`` or the file named by
``[clinical] schema_file``; that file documents the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mrrp_pacs.config import read_data_toml
from mrrp_pacs.errors import ConfigError

_SYSTEM_ALIASES = {"LOINC": "LN", "HTTP://LOINC.ORG": "LN", "LNC": "LN"}


def canonical_system(system: str) -> str:
    upper = system.strip().upper()
    return _SYSTEM_ALIASES.get(upper, upper)


@dataclass(frozen=True)
class Variable:
    name: str
    kind: Literal["continuous", "categorical"]
    codes: tuple[tuple[str, str], ...]  # (canonical coding system, code)
    unit: str | None = None
    levels: tuple[str, ...] = ()
    derive_from: str | None = None


@dataclass(frozen=True)
class ClinicalSchema:
    variables: tuple[Variable, ...]

    def variable_for_code(self, system: str, code: str) -> Variable | None:
        key = (canonical_system(system), code.strip())
        return next((v for v in self.variables if key in v.codes), None)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variables]


def load_schema(path: Path | None = None) -> ClinicalSchema:
    """Read a schema file (default: the built-in one).

    Raises
    ------
    ConfigError
        The file is unreadable or a variable is malformed; the message names it.
    """
    raw, source = read_data_toml(path, "clinical_schema.toml", "clinical schema")
    variables = []
    for name, spec in raw.get("variables", {}).items():
        where = f"{source}: variables.{name}"
        kind = spec.get("kind")
        if kind not in ("continuous", "categorical"):
            raise ConfigError(f"{where}.kind = {kind!r}: expected 'continuous' or 'categorical'")
        codes = []
        for entry in spec.get("codes", []):
            system, sep, code = str(entry).partition(":")
            if not sep or not system or not code:
                raise ConfigError(f"{where}.codes: {entry!r} is not '<system>:<code>'")
            codes.append((canonical_system(system), code.strip()))
        levels = tuple(str(level) for level in spec.get("levels", []))
        if kind == "categorical" and not levels:
            raise ConfigError(f"{where}: a categorical variable needs its levels")
        derive_from = spec.get("derive_from")
        if derive_from not in (None, "PID-7"):
            raise ConfigError(f"{where}.derive_from = {derive_from!r}: only 'PID-7' is known")
        unknown = set(spec) - {"kind", "codes", "unit", "levels", "derive_from"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        variables.append(Variable(name, kind, tuple(codes), spec.get("unit"), levels,
                                  derive_from))
    if not variables:
        raise ConfigError(f"{source} defines no [variables.*]")
    seen: dict[tuple[str, str], str] = {}
    for variable in variables:
        for key in variable.codes:
            if key in seen:
                raise ConfigError(
                    f"{source}: code {key[0]}:{key[1]} is claimed by both {seen[key]} and "
                    f"{variable.name}"
                )
            seen[key] = variable.name
    return ClinicalSchema(tuple(variables))
