import numpy as np

from mrrp_pacs.cases import ClinicalValue
from mrrp_pacs.clinical_schema import load_schema
from mrrp_pacs.features.clinical import encode_clinical

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
    assert encoded.meta["unreadable"] == ["er_percent='strong'"]
    assert encoded.flags == ["clinical_incomplete"]
    assert encoded.arrays["values"].dtype == np.float32


def test_unknown_unit_is_not_guessed():
    encoded = encode_clinical({"tumour_size_mm": _value("2", 2.0, "inch")}, SCHEMA)
    index = encoded.meta["names"].index("tumour_size_mm")
    assert encoded.arrays["missing"][index]
    assert "tumour_size_mm='2' inch" in encoded.meta["unreadable"]
