"""Clinical variables → one value per variable of the clinical schema, missing made explicit.

Continuous values are converted to the schema's unit (e.g. tumour size given in cm → mm;
a fraction 0–1 given with unit "1" for a percentage → %); categorical values are mapped to
the index of their level after normalising spelling ("Grade 2", "G2", "2" → level "2";
"Luminal A" → "luminal_a"). A value that cannot be read is treated as missing, and listed in
``meta["unreadable"]`` so the operator can see why.

Arrays: ``values`` (n_vars,) float32 — the continuous value, or the level index for a
categorical variable, 0 when missing; ``missing`` (n_vars,) bool. The model encodes each
variable as its own token (nn.Linear for continuous, nn.Embedding for categorical).
"""

from __future__ import annotations

import re

import numpy as np

from mrrp_pacs.cases import ClinicalValue
from mrrp_pacs.clinical_schema import ClinicalSchema, Variable
from mrrp_pacs.features.cache import FeatureSet

CLINICAL_VERSION = "1"

# (from unit, to unit) -> factor; units compared case-insensitively
_UNIT_FACTORS = {
    ("cm", "mm"): 10.0, ("mm", "mm"): 1.0, ("m", "mm"): 1000.0,
    ("a", "a"): 1.0, ("yr", "a"): 1.0, ("y", "a"): 1.0, ("years", "a"): 1.0, ("ann", "a"): 1.0,
    ("mo", "a"): 1 / 12,
    ("%", "%"): 1.0, ("1", "%"): 100.0,
    ("{count}", "{count}"): 1.0, ("", "{count}"): 1.0, ("#", "{count}"): 1.0,
}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _continuous(variable: Variable, value: ClinicalValue) -> float | None:
    number = value.value_num
    if number is None:
        match = _NUMBER.search(value.value_text)
        number = float(match.group()) if match else None
    if number is None:
        return None
    unit = (value.unit or "").strip()
    target = variable.unit or ""
    if not unit or unit.lower() == target.lower():
        return float(number)
    factor = _UNIT_FACTORS.get((unit.lower(), target.lower()))
    return None if factor is None else float(number) * factor


def _level(variable: Variable, value: ClinicalValue) -> int | None:
    text = value.value_text.strip().lower()
    normalised = re.sub(r"[\s-]+", "_", text)
    for index, level in enumerate(variable.levels):
        wanted = level.lower()
        if normalised == wanted or text == wanted:
            return index
    digits = re.sub(r"^(grade|g)_?", "", normalised)  # "Grade 2", "G2" → "2"
    if digits in [lv.lower() for lv in variable.levels]:
        return [lv.lower() for lv in variable.levels].index(digits)
    return None


def encode_clinical(values: dict[str, ClinicalValue], schema: ClinicalSchema) -> FeatureSet:
    """Encode a patient's current final clinical values in schema order."""
    n = len(schema.variables)
    encoded = np.zeros(n, dtype=np.float32)
    missing = np.ones(n, dtype=bool)
    unreadable = []
    for i, variable in enumerate(schema.variables):
        value = values.get(variable.name)
        if value is None:
            continue
        result = (_continuous(variable, value) if variable.kind == "continuous"
                  else _level(variable, value))
        if result is None:
            unreadable.append(f"{variable.name}={value.value_text!r} {value.unit or ''}".strip())
            continue
        encoded[i] = result
        missing[i] = False
    meta = {
        "names": [v.name for v in schema.variables],
        "kinds": [v.kind for v in schema.variables],
        "levels": {v.name: list(v.levels) for v in schema.variables if v.kind == "categorical"},
        "units": {v.name: v.unit for v in schema.variables if v.kind == "continuous"},
        "unreadable": unreadable,
        "flags": ["clinical_incomplete"] if missing.any() else [],
    }
    return FeatureSet("clinical", "clinical-schema", CLINICAL_VERSION,
                      {"values": encoded, "missing": missing}, meta)
