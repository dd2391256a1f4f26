"""Clinical variables → one value per variable of the clinical schema, missing made explicit.

Continuous values are converted to the schema's unit (e.g. tumour size given in cm → mm;
a fraction 0–1 given with unit "1" for a percentage → %); categorical values are mapped to
the index of their level after normalising spelling ("Grade 2", "G2", "2" → level "2";
"Luminal A" → "luminal_a"). A value that cannot be read is treated as missing, and listed in
``meta["unreadable"]`` with the reason so the operator can see why.

Continuous text is read whole (:func:`parse_quantity`), never as "its first number": a plain
number, a one-sided bound (``<1 %``, ``≤ 5``, ``>90%``, HL7 SN ``<^1``) or a range
(``10–20 %``, ``10-20``, ``10 to 20``, SN ``^10^-^20``), optionally followed by a unit that is
used when the OBX gives none. The encoding (recorded per variable in ``meta["censored"]``):

- a range ``a–b`` → its midpoint ``(a + b) / 2``;
- an upper bound ``<b`` or ``≤b`` → the midpoint of ``[0, b]``, ``b / 2`` (every variable is a
  non-negative quantity);
- a lower bound ``>a`` or ``≥a`` → the midpoint of ``[a, 100]`` for a percentage, else ``a``
  itself (no upper limit is known for sizes, counts or ages).

Anything else (words, several numbers, an empty bound, a reversed range, a negative value) is
unreadable, with the reason.

Arrays: ``values`` (n_vars,) float32 — the continuous value, or the level index for a
categorical variable, 0 when missing; ``missing`` (n_vars,) bool. The model encodes each
variable as its own token (nn.Linear for continuous, nn.Embedding for categorical).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from mrrp_pacs.cases import ClinicalValue
from mrrp_pacs.clinical_schema import ClinicalSchema, Variable
from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.cache import FeatureSet

CLINICAL_VERSION = "2"

# (from unit, to unit) -> factor; units compared case-insensitively
_UNIT_FACTORS = {
    ("cm", "mm"): 10.0, ("mm", "mm"): 1.0, ("m", "mm"): 1000.0,
    ("a", "a"): 1.0, ("yr", "a"): 1.0, ("y", "a"): 1.0, ("years", "a"): 1.0, ("ann", "a"): 1.0,
    ("mo", "a"): 1 / 12,
    ("%", "%"): 1.0, ("1", "%"): 100.0,
    ("{count}", "{count}"): 1.0, ("", "{count}"): 1.0, ("#", "{count}"): 1.0,
}
_NUM = r"\+?(?:\d+(?:[.,]\d*)?|[.,]\d+)"
_UNIT_TEXT = r"(?P<unit>%|[a-zA-Z{}#]+)?"
_COMPARATORS = {"<": "<", "<=": "≤", "≤": "≤", "=<": "≤", "⩽": "≤",
                ">": ">", ">=": "≥", "≥": "≥", "=>": "≥", "⩾": "≥"}
_BOUND = re.compile(rf"(?P<op><=|=<|>=|=>|[<>≤≥⩽⩾])\s*(?P<a>{_NUM})\s*{_UNIT_TEXT}")
_RANGE = re.compile(rf"(?P<a>{_NUM})\s*(?P<u1>%|[a-zA-Z]+)?\s*(?:[-–—‒]|to)\s*"
                    rf"(?P<b>{_NUM})\s*{_UNIT_TEXT}", re.IGNORECASE)
_PLAIN = re.compile(rf"(?P<a>{_NUM})\s*{_UNIT_TEXT}")
# HL7 v2 SN (structured numeric): comparator ^ num1 [^ separator ^ num2]
_SN = re.compile(rf"(?P<op><=|>=|<>|[<>=]?)\^(?P<a>{_NUM})(?:\^(?P<sep>[-:/+])\^(?P<b>{_NUM}))?")


@dataclass(frozen=True)
class Quantity:
    """A clinical number as written: ``low``–``high`` with how it was bounded.

    Attributes
    ----------
    kind : str
        ``exact``, ``range``, ``upper`` (``<``/``≤`` b: ``high`` = b, ``low`` = None) or
        ``lower`` (``>``/``≥`` a: ``low`` = a, ``high`` = None).
    low, high : float | None
    comparator : str
        ``<``, ``≤``, ``>``, ``≥`` for a bound, ``–`` for a range, ``=`` for an exact value.
    unit : str
        The unit written after the number ("" when none).
    """

    kind: str
    low: float | None
    high: float | None
    comparator: str = "="
    unit: str = ""

    def encoded(self, upper_limit: float | None) -> float:
        """The single number the model gets (rule in the module docstring)."""
        if self.kind == "exact" and self.low is not None:
            return self.low
        if self.kind == "range" and self.low is not None and self.high is not None:
            return (self.low + self.high) / 2
        if self.kind == "upper" and self.high is not None:
            return self.high / 2
        if self.kind == "lower" and self.low is not None:
            if upper_limit is not None and self.low < upper_limit:
                return (self.low + upper_limit) / 2
            return self.low
        raise FeatureError(f"quantity {self} is incomplete")


def _float(text: str) -> float:
    return float(text.replace(",", "."))


def parse_quantity(text: str) -> Quantity:
    """Read a clinical number written as a value, a bound or a range (see the module docstring).

    Raises
    ------
    FeatureError
        The text is not one of those forms; the message says what was found.
    """
    cleaned = " ".join(text.replace("\u00a0", " ").split())
    if not cleaned:
        raise FeatureError("empty value")
    sn = _SN.fullmatch(cleaned.replace(" ", ""))
    if sn:
        op, a, sep, b = sn.group("op"), _float(sn.group("a")), sn.group("sep"), sn.group("b")
        if b is not None:
            if sep != "-":
                raise FeatureError(f"{text!r}: SN separator {sep!r} (a ratio or sum) is not a "
                                   "single quantity")
            return _range(text, a, _float(b), "")
        if op in ("", "="):
            return Quantity("exact", a, a)
        if op == "<>":
            raise FeatureError(f"{text!r}: comparator '<>' (not equal) gives no value")
        return _bounded(op, a, "")
    match = _BOUND.fullmatch(cleaned)
    if match:
        return _bounded(match.group("op"), _float(match.group("a")), match.group("unit") or "")
    match = _RANGE.fullmatch(cleaned)
    if match:
        first, second = match.group("u1") or "", match.group("unit") or ""
        if first and second and first.lower() != second.lower():
            raise FeatureError(f"{text!r}: the range has two different units")
        return _range(text, _float(match.group("a")), _float(match.group("b")),
                      second or first)
    match = _PLAIN.fullmatch(cleaned)
    if match:
        a = _float(match.group("a"))
        return Quantity("exact", a, a, "=", match.group("unit") or "")
    if re.search(r"\d", cleaned):
        if re.fullmatch(r"\s*[-−]\s*" + _NUM + r".*", cleaned):
            raise FeatureError(f"{text!r}: negative, and no clinical quantity here is below 0")
        raise FeatureError(f"{text!r}: not a number, a bound (<1, ≥ 5) or a range (10–20)")
    raise FeatureError(f"{text!r}: no number")


def _bounded(op: str, value: float, unit: str) -> Quantity:
    comparator = _COMPARATORS[op]
    if comparator in ("<", "≤"):
        return Quantity("upper", None, value, comparator, unit)
    return Quantity("lower", value, None, comparator, unit)


def _range(text: str, low: float, high: float, unit: str) -> Quantity:
    if high < low:
        raise FeatureError(f"{text!r}: the range runs backwards ({low:g} > {high:g})")
    if high == low:
        return Quantity("exact", low, low, "=", unit)
    return Quantity("range", low, high, "–", unit)


def _continuous(variable: Variable, value: ClinicalValue) -> tuple[float, Quantity | None]:
    """(value in the schema's unit, the parsed quantity when it was not a plain number).

    Raises
    ------
    FeatureError
        Unreadable text or a unit with no conversion to the schema's.
    """
    quantity: Quantity | None = None
    unit = (value.unit or "").strip()
    if value.value_num is not None:
        number = float(value.value_num)
    else:
        quantity = parse_quantity(value.value_text)
        if quantity.unit and unit and quantity.unit.lower() != unit.lower():
            raise FeatureError(f"{value.value_text!r}: written in {quantity.unit!r} but the "
                               f"unit given is {unit!r}")
        unit = unit or quantity.unit
        number = math.nan  # encoded below, once the bounds are in the schema's unit
    target = variable.unit or ""
    if not unit or unit.lower() == target.lower():
        factor = 1.0
    else:
        found = _UNIT_FACTORS.get((unit.lower(), target.lower()))
        if found is None:
            raise FeatureError(f"unit {unit!r} cannot be converted to {target!r}")
        factor = found
    if quantity is not None:
        limit = 100.0 if target == "%" else None
        scaled = Quantity(quantity.kind,
                          None if quantity.low is None else quantity.low * factor,
                          None if quantity.high is None else quantity.high * factor,
                          quantity.comparator, target)
        return scaled.encoded(limit), (None if quantity.kind == "exact" else scaled)
    return number * factor, None


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
    censored: dict[str, dict[str, object]] = {}
    for i, variable in enumerate(schema.variables):
        value = values.get(variable.name)
        if value is None:
            continue
        written = f"{variable.name}={value.value_text!r} {value.unit or ''}".strip()
        result: float | int | None
        if variable.kind == "continuous":
            try:
                result, quantity = _continuous(variable, value)
            except FeatureError as exc:
                unreadable.append(f"{written}: {exc}")
                continue
            if quantity is not None:
                censored[variable.name] = {"kind": quantity.kind, "low": quantity.low,
                                           "high": quantity.high,
                                           "comparator": quantity.comparator,
                                           "encoded": result}
        else:
            result = _level(variable, value)
        if result is None:
            unreadable.append(written)
            continue
        encoded[i] = result
        missing[i] = False
    meta = {
        "names": [v.name for v in schema.variables],
        "kinds": [v.kind for v in schema.variables],
        "levels": {v.name: list(v.levels) for v in schema.variables if v.kind == "categorical"},
        "units": {v.name: v.unit for v in schema.variables if v.kind == "continuous"},
        "unreadable": unreadable,
        "censored": censored,
        "flags": ["clinical_incomplete"] if missing.any() else [],
    }
    return FeatureSet("clinical", "clinical-schema", CLINICAL_VERSION,
                      {"values": encoded, "missing": missing}, meta)
