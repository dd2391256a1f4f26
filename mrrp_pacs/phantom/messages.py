"""HL7 v2.5 messages of the phantom: the breast ultrasound report and the pathology result.

The report's words carry the US traits (BI-RADS lexicon: shape, orientation, margin, echo
pattern, posterior features, calcifications, vascularity, assessment category), read through
noise as a radiologist would; vascularity exists only here. The pathology result has one OBX
per clinical variable, coded as in ``mrrp_pacs/data/clinical_schema.toml`` (LOINC where a code
exists, the project's local codes otherwise), units in OBX-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODING = "^~\\&"
CLOCK_POSITIONS = ("12", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11")


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters (the escape character first)."""
    return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\"))


@dataclass(frozen=True)
class MessageContext:
    patient_id: str
    issuer: str
    patient_name: str  # HL7 XPN: family^given
    birth_date: str
    sex: str
    laterality: str  # R | L


def _msh(control_id: str, sender: str, when: str) -> str:
    return (f"MSH|{ENCODING}|{sender}|PHANTOM_HOSPITAL|MRRP|PHANTOM_HOSPITAL|{when}||"
            f"ORU^R01^ORU_R01|{control_id}|P|2.5||||||UNICODE UTF-8")


def _pid(ctx: MessageContext) -> str:
    return (f"PID|1||{ctx.patient_id}^^^{ctx.issuer}^MR||{ctx.patient_name}||{ctx.birth_date}|"
            f"{ctx.sex}")


def _obr(set_id: int, placer: str, accession: str, service: str, when: str, section: str
         ) -> str:
    fields = ["OBR", str(set_id), placer, accession, service, "", "", when] + [""] * 17
    fields[24] = section  # OBR-24 diagnostic service section
    fields.append("F")    # OBR-25 result status
    return "|".join(fields)


def report_text(rng: np.random.Generator, traits: dict[str, float], size_mm: float,
                laterality: str) -> list[str]:
    """Lines of a breast ultrasound report whose descriptors follow the US traits."""
    def noisy(name: str) -> float:
        return traits[name] + rng.normal(0, 0.35)

    margin_score = noisy("us_margin")
    margin = ("circumscribed" if margin_score < -0.8 else "indistinct" if margin_score < 0.0
              else "angular" if margin_score < 0.6 else "microlobulated" if margin_score < 1.2
              else "spiculated")
    shape = "oval" if margin_score < -0.3 else "round" if margin_score < 0.2 else "irregular"
    orientation = "not parallel" if noisy("us_orientation") > 0.55 else "parallel"
    heterogeneity = noisy("us_heterogeneity")
    echo = ("heterogeneous" if heterogeneity > 0.8 else "complex cystic and solid"
            if heterogeneity > 0.4 else "hypoechoic")
    shadow = noisy("us_shadowing")
    posterior = ("posterior acoustic shadowing" if shadow > 0.7 else "posterior acoustic "
                 "enhancement" if shadow < -0.7 else "no posterior features")
    vascular = noisy("vascularity")
    vascularity = ("internal vascularity" if vascular > 0.6 else "vessels in rim"
                   if vascular > -0.5 else "vascularity absent")
    calcified = rng.random() < 0.25
    suspicion = margin_score + 0.5 * noisy("us_orientation") + 0.3 * shadow + 0.3 * vascular
    category = ("4A" if suspicion < -0.6 else "4B" if suspicion < 0.3 else "4C"
                if suspicion < 1.2 else "5")
    side = "RIGHT" if laterality == "R" else "LEFT"
    clock = CLOCK_POSITIONS[int(rng.integers(0, 12))]
    distance = int(rng.integers(1, 7))
    depth_mm = max(3, round(size_mm * rng.uniform(0.6, 0.9)))
    height_mm = max(3, round(size_mm * rng.uniform(0.5, 0.9)))
    return [
        f"BILATERAL BREAST ULTRASOUND, {side} BREAST LESION",
        "CLINICAL INDICATION: palpable lump.",
        "FINDINGS:",
        f"At the {clock} o'clock position of the {side.lower()} breast, {distance} cm from the "
        f"nipple, there is an {shape} {echo} mass with {margin} margins, {orientation} "
        f"orientation, measuring {round(size_mm)} x {height_mm} x {depth_mm} mm.",
        f"Posterior features: {posterior}.",
        "Calcifications: calcifications in mass." if calcified else
        "Calcifications: none seen.",
        f"Colour Doppler: {vascularity}.",
        "No other focal lesion in either breast.",
        "IMPRESSION:",
        f"{side.capitalize()} breast mass, BI-RADS {category}. Ultrasound-guided core biopsy "
        "recommended.",
    ]


def ultrasound_report(ctx: MessageContext, control_id: str, accession: str, when: str,
                      lines: list[str]) -> bytes:
    """ORU^R01 with the report as TX OBX lines; OBR-3 = the US study's accession number."""
    segments = [
        _msh(control_id, "PHANTOM_RIS", when + "0000"),
        _pid(ctx),
        _obr(1, f"ORD-{control_id}", accession, "US-BREAST^Ultrasound breast^L", when, "US"),
        *[f"OBX|{i}|TX|18748-4^Diagnostic imaging study^LN|1|{escape(line)}||||||F"
          for i, line in enumerate(lines, start=1)],
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


# (variable, value type, OBX-3 code^text^system, unit)
PATHOLOGY_OBSERVATIONS: tuple[tuple[str, str, str, str], ...] = (
    ("age_years", "NM", "30525-0^Age^LN", "a"),
    ("tumour_size_mm", "NM", "21889-1^Size Tumor^LN", "mm"),
    ("grade", "CWE", "MRRP-GRADE^Histological grade (Nottingham)^L", ""),
    ("positive_nodes", "NM", "21893-3^Regional lymph nodes positive^LN", "{count}"),
    ("er_percent", "NM", "MRRP-ER-PCT^Estrogen receptor positive tumour cells^L", "%"),
    ("pr_percent", "NM", "MRRP-PR-PCT^Progesterone receptor positive tumour cells^L", "%"),
    ("her2_ihc", "CWE", "MRRP-HER2-IHC^HER2 immunohistochemistry score^L", ""),
    ("ki67_percent", "NM", "85330-9^Ki-67 positive tumour cells^LN", "%"),
    ("subtype", "CWE", "MRRP-SUBTYPE^Molecular subtype (surrogate)^L", ""),
)
_CODED_TEXT = {"grade": "Grade {}", "her2_ihc": "HER2 {}", "subtype": "{}"}


def value_text(value: object) -> str:
    """A clinical value as the pathology result writes it (OBX-5): numbers as whole numbers
    (the phantom draws them rounded), codes as they are."""
    return str(int(value)) if isinstance(value, (int, float, np.integer, np.floating)) \
        else str(value)


def pathology_result(ctx: MessageContext, control_id: str, accession: str, when: str,
                     clinical: dict[str, object]) -> bytes:
    """ORU^R01 with one OBX per clinical variable and a short diagnosis line."""
    observations = []
    for i, (name, value_type, code, unit) in enumerate(PATHOLOGY_OBSERVATIONS, start=1):
        text = value_text(clinical[name])
        if value_type == "CWE":
            text = f"{escape(text)}^{escape(_CODED_TEXT[name].format(text))}^L"
        observations.append(f"OBX|{i}|{value_type}|{code}||{text}|{unit}|||||F|||{when}")
    side = "right" if ctx.laterality == "R" else "left"
    diagnosis = (f"Invasive breast carcinoma of no special type, {side} breast; "
                 "hormone receptor positive, HER2 negative.")
    observations.append(f"OBX|{len(observations) + 1}|TX|22637-3^Pathology report final "
                        f"diagnosis^LN||{escape(diagnosis)}||||||F|||{when}")
    segments = [
        _msh(control_id, "PHANTOM_LIS", when + "0000"),
        _pid(ctx),
        _obr(1, f"ORD-{control_id}", accession, "PATH-BREAST^Breast surgical pathology^L",
             when, "SP"),
        *observations,
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")
