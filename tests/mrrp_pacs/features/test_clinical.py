import numpy as np
import pytest

from mrrp_pacs.cases import ClinicalValue
from mrrp_pacs.clinical_schema import load_schema
from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.clinical import Quantity, encode_clinical, parse_quantity

SCHEMA = load_schema()


def _value(text: str, number: float | None = None, unit: str = "") -> ClinicalValue:
    return ClinicalValue(0, text, number, unit)


def test_units_levels_and_missing_are_explicit():
    encoded = encode_clinical({
        "age_years": _value("52", 52.0, "a"),
        "tumour_size_mm": _value("2.1", 2.1, "cm"),       # converted to mm
        "grade": _value("Grade 3"),
        "her2_ihc": _value("1+"),
        "subtype": _value("Luminal B"),
        "ki67_percent": _value("0.25", 0.25, "1"),          # a fraction, to %
        "er_percent": _value("strong"),                     # unreadable
    }, SCHEMA)
    names = encoded.meta["names"]
    values = dict(zip(names, encoded.arrays["values"].tolist(), strict=True))
    missing = dict(zip(names, encoded.arrays["missing"].tolist(), strict=True))
    assert values["age_years"] == 52.0
    assert np.isclose(values["tumour_size_mm"], 21.0)
    assert values["grade"] == 2  # index of level "3"
    assert values["her2_ihc"] == 1 and values["subtype"] == 1
    assert np.isclose(values["ki67_percent"], 25.0)
    assert missing["er_percent"] and values["er_percent"] == 0.0
    assert missing["positive_nodes"] and missing["pr_percent"]
    assert encoded.meta["unreadable"] == ["er_percent='strong': 'strong': no number"]
    assert encoded.flags == ["clinical_incomplete"]
    assert encoded.arrays["values"].dtype == np.float32


def test_unknown_unit_is_not_guessed():
    encoded = encode_clinical({"tumour_size_mm": _value("2", 2.0, "inch")}, SCHEMA)
    index = encoded.meta["names"].index("tumour_size_mm")
    assert encoded.arrays["missing"][index]
    assert encoded.meta["unreadable"] == ["tumour_size_mm='2' inch: unit 'inch' cannot be "
                                          "converted to 'mm'"]


def _encoded(name: str, value: ClinicalValue) -> tuple[float, bool, dict]:
    encoded = encode_clinical({name: value}, SCHEMA)
    index = encoded.meta["names"].index(name)
    return (float(encoded.arrays["values"][index]), bool(encoded.arrays["missing"][index]),
            encoded.meta)


@pytest.mark.parametrize(("name", "text", "unit", "expected", "kind"), [
    ("ki67_percent", "<1 %", "", 0.5, "upper"),          # half the bound: midpoint of [0, 1]
    ("ki67_percent", "<1%", "%", 0.5, "upper"),
    ("er_percent", ">90%", "", 95.0, "lower"),           # midpoint of [90, 100]
    ("er_percent", "≥ 90", "%", 95.0, "lower"),
    ("pr_percent", "10–20 %", "", 15.0, "range"),        # en dash
    ("pr_percent", "10-20", "%", 15.0, "range"),
    ("pr_percent", "10 to 20 %", "", 15.0, "range"),
    ("ki67_percent", "≤ 5", "%", 2.5, "upper"),
    ("ki67_percent", "<= 5", "%", 2.5, "upper"),
    ("ki67_percent", "<^1", "%", 0.5, "upper"),          # HL7 SN
    ("ki67_percent", "^10^-^20", "%", 15.0, "range"),    # HL7 SN range
    ("tumour_size_mm", ">5 cm", "", 50.0, "lower"),      # no upper limit: the bound itself
    ("tumour_size_mm", "1.5-2 cm", "", 17.5, "range"),   # converted, then the midpoint
    ("positive_nodes", "<3", "", 1.5, "upper"),
])
def test_comparators_and_ranges_are_read_as_such(name, text, unit, expected, kind):
    value, missing, meta = _encoded(name, _value(text, None, unit))
    assert not missing and value == pytest.approx(expected)
    assert meta["censored"][name]["kind"] == kind
    assert meta["unreadable"] == []


def test_plain_text_number_with_its_unit_is_not_censored():
    value, missing, meta = _encoded("tumour_size_mm", _value("2,1 cm"))
    assert not missing and value == pytest.approx(21.0)
    assert meta["censored"] == {}


@pytest.mark.parametrize(("text", "unit", "reason"), [
    ("approx. 5", "%", "not a number, a bound"),
    ("5 10", "%", "not a number, a bound"),
    ("20-10", "%", "runs backwards"),
    ("<", "%", "no number"),
    ("-5", "%", "negative"),
    ("10 mm - 2 cm", "", "two different units"),
    ("<5 cm", "%", "written in 'cm' but the unit given is '%'"),
    ("^1^/^2", "%", "ratio or sum"),
    ("strong", "%", "no number"),
])
def test_garbage_is_unreadable_with_the_reason(text, unit, reason):
    value, missing, meta = _encoded("ki67_percent", _value(text, None, unit))
    assert missing and value == 0.0
    assert len(meta["unreadable"]) == 1 and reason in meta["unreadable"][0]


def test_parse_quantity_keeps_bound_and_comparator():
    assert parse_quantity("≤ 5") == Quantity("upper", None, 5.0, "≤", "")
    assert parse_quantity(">90%") == Quantity("lower", 90.0, None, ">", "%")
    assert parse_quantity("10–20 %") == Quantity("range", 10.0, 20.0, "–", "%")
    assert parse_quantity("12") == Quantity("exact", 12.0, 12.0, "=", "")
    with pytest.raises(FeatureError, match="empty value"):
        parse_quantity("  ")
