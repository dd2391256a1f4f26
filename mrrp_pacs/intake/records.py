"""What an HL7 result message means for the store: observations, reports, clinical values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date

from mrrp_pacs.clinical_schema import ClinicalSchema, Variable
from mrrp_pacs.config import IdentityConfig, IngestConfig
from mrrp_pacs.hl7.message import Hl7Message, Segment

# OBX-11 result statuses that are final (F) or a correction of a final result (C)
FINAL_STATUSES = ("F", "C")

_FIELD_PATH = re.compile(r"^OBR-(\d+)$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
NARRATIVE_TYPES = {"TX", "FT"}
CODED_TYPES = {"CE", "CWE", "CNE", "CF"}


@dataclass
class Observation:
    obr_index: int
    set_id: str
    value_type: str
    code: str
    code_text: str
    coding_system: str
    sub_id: str
    value: str
    units: str
    status: str
    observed_at: str


@dataclass
class Order:
    index: int
    accession_number: str
    service_code: str
    service_text: str
    section: str
    status: str
    observed_at: str
    observations: list[Observation] = field(default_factory=list)


@dataclass
class ClinicalValue:
    variable: str
    value_text: str
    value_num: float | None
    unit: str
    status: str
    observed_at: str
    source: str
    observation: Observation | None


@dataclass
class ResultContent:
    """Everything the store keeps from one message, besides its raw bytes."""

    control_id: str
    sending_application: str
    sending_facility: str
    message_type: str
    message_datetime: str
    version: str
    processing_id: str
    patient_id: str
    assigning_authority: str
    orders: list[Order]
    clinical_values: list[ClinicalValue]

    def reports(self, config: IngestConfig) -> list[tuple[Order, str, str]]:
        """(order, kind, text) for every order that carries narrative OBX lines."""
        found = []
        for order in self.orders:
            lines = [o.value for o in order.observations if o.value_type in NARRATIVE_TYPES]
            if not any(line.strip() for line in lines):
                continue
            if order.section in config.ultrasound_sections:
                kind = "ultrasound"
            elif order.section in config.pathology_sections:
                kind = "pathology"
            else:
                kind = "other"
            found.append((order, kind, "\n".join(lines)))
        return found


def read_result(message: Hl7Message, ingest: IngestConfig, identity: IdentityConfig,
                schema: ClinicalSchema) -> ResultContent:
    msh = message.segments[0]
    patient_id, authority = _choose_patient_id(message, identity)
    accession_fields = [int(m[1]) for p in ingest.accession_fields if (m := _FIELD_PATH.match(p))]
    orders: list[Order] = []
    numbered = 0  # OBRs so far (order 0 holds OBX before any OBR)
    for segment in message.segments:
        if segment.name == "OBR":
            numbered += 1
            orders.append(Order(
                index=numbered,
                accession_number=next(
                    (v for n in accession_fields if (v := message.component(segment, n))), ""),
                service_code=message.component(segment, 4, 1),
                service_text=message.component(segment, 4, 2),
                section=message.component(segment, 24).upper(),
                status=message.component(segment, 25).upper(),
                observed_at=message.component(segment, 7),
            ))
        elif segment.name == "OBX":
            if not orders:  # OBX outside any OBR: kept under an empty order 0
                orders.append(Order(0, "", "", "", "", "", ""))
            orders[-1].observations.append(_observation(message, segment, orders[-1].index))
    values = _clinical_values(message, orders, schema)
    return ResultContent(
        control_id=message.component(msh, 10),
        sending_application=message.component(msh, 3),
        sending_facility=message.component(msh, 4),
        message_type="^".join(p for p in (message.component(msh, 9, 1),
                                          message.component(msh, 9, 2)) if p),
        message_datetime=message.component(msh, 7),
        version=message.component(msh, 12),
        processing_id=message.component(msh, 11),
        patient_id=patient_id,
        assigning_authority=authority,
        orders=orders,
        clinical_values=values,
    )


def _choose_patient_id(message: Hl7Message, identity: IdentityConfig) -> tuple[str, str]:
    """The PID-3 repetition that identifies the patient: (identifier, assigning authority)."""
    pid = message.segment("PID")
    candidates = []
    for repetition in message.repetitions(message.field(pid, 3)):
        parts = repetition.split(message.component_sep)
        ident = message.unescape(parts[0]).strip() if parts else ""
        authority = (message.unescape(parts[3].split(message.subcomponent_sep)[0]).strip()
                     if len(parts) > 3 else "")
        id_type = message.unescape(parts[4]).strip() if len(parts) > 4 else ""
        if ident:
            candidates.append((ident, authority, id_type))
    if not candidates:
        return "", ""
    wanted = identity.hl7_assigning_authority
    chosen = (
        next((c for c in candidates if c[1] == wanted), None) if wanted
        else next((c for c in candidates if c[2] == "MR"), candidates[0])
    )
    if chosen is None:
        return "", ""
    return chosen[0], chosen[1]


def _observation(message: Hl7Message, segment: Segment, obr_index: int) -> Observation:
    value_type = message.component(segment, 2).upper()
    repetitions = message.repetitions(message.field(segment, 5))
    if value_type in NARRATIVE_TYPES or value_type == "ST":
        # every repetition is a line; components are not meaningful in free text. Escape
        # codes hold no repetition separator or line break, so the joined field is unescaped
        # at once: the same text as line by line, in one pass however many lines are sent
        value = message.unescape("\n".join(repetitions))
    elif value_type in CODED_TYPES:
        parts = message.components(repetitions[0]) if repetitions else []
        value = (parts[0].strip() or (parts[1].strip() if len(parts) > 1 else "")) if parts else ""
    elif value_type == "SN":
        parts = message.components(repetitions[0]) if repetitions else []
        value = "".join(p.strip() for p in parts)
    else:
        value = message.unescape(repetitions[0]).strip() if repetitions else ""
    return Observation(
        obr_index=obr_index,
        set_id=message.component(segment, 1),
        value_type=value_type,
        code=message.component(segment, 3, 1),
        code_text=message.component(segment, 3, 2),
        coding_system=message.component(segment, 3, 3),
        sub_id=message.component(segment, 4),
        value=value,
        units=message.component(segment, 6, 1),
        status=message.component(segment, 11).upper(),
        observed_at=message.component(segment, 14),
    )


def _number(text: str) -> float | None:
    cleaned = text.strip().rstrip("%").strip()
    return float(cleaned) if _NUMBER.match(cleaned) else None


def _clinical_values(message: Hl7Message, orders: list[Order],
                     schema: ClinicalSchema) -> list[ClinicalValue]:
    values: list[ClinicalValue] = []
    for obx in [o for order in orders for o in order.observations]:
        variable = schema.variable_for_code(obx.coding_system, obx.code)
        if variable is None or not obx.value.strip():
            continue
        observed = obx.observed_at or _order_date(orders, obx.obr_index)
        values.append(ClinicalValue(
            variable=variable.name,
            value_text=obx.value.strip(),
            value_num=_number(obx.value) if variable.kind == "continuous" else None,
            unit=obx.units,
            status=obx.status,
            observed_at=observed,
            source=f"OBX {obx.coding_system}:{obx.code}",
            observation=obx,
        ))
    if values:
        present = {v.variable for v in values}
        for variable in schema.variables:
            if variable.derive_from == "PID-7" and variable.name not in present:
                derived = _age_from_birth_date(message, orders, variable, values[0].status)
                if derived is not None:
                    values.append(derived)
    return values


def _order_date(orders: list[Order], index: int) -> str:
    return next((o.observed_at for o in orders if o.index == index), "")


def _hl7_date(text: str) -> date | None:
    digits = text[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def _age_from_birth_date(message: Hl7Message, orders: list[Order], variable: Variable,
                         status: str) -> ClinicalValue | None:
    """Age in whole years at the first order's observation date (else the message date)."""
    birth = _hl7_date(message.component(message.segment("PID"), 7))
    when_text = next((o.observed_at for o in orders if o.observed_at), "") or message.component(
        message.segments[0], 7)
    when = _hl7_date(when_text)
    if birth is None or when is None or when < birth:
        return None
    years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    return ClinicalValue(
        variable=variable.name, value_text=str(years), value_num=float(years),
        unit=variable.unit or "a", status=status, observed_at=when_text, source="PID-7",
        observation=None,
    )
