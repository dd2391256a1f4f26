"""Patient identity: one key for a DICOM PatientID+issuer and an HL7 PID-3+authority.

The key is written like an HL7 CX value, ``<id>^^^<issuer>``, so an operator can read it;
with ``[identity] match = "id"`` it is the bare identifier.
"""

from __future__ import annotations

from mrrp_pacs.config import IdentityConfig


def canonical_issuer(issuer: str | None, config: IdentityConfig) -> str:
    name = (issuer or "").strip() or config.default_issuer
    return config.issuer_aliases.get(name, name)


def patient_key(patient_id: str | None, issuer: str | None, config: IdentityConfig) -> str | None:
    """The matching key, or None when there is no patient identifier at all."""
    pid = (patient_id or "").strip()
    if not pid:
        return None
    if config.match == "id":
        return pid
    return f"{pid}^^^{canonical_issuer(issuer, config)}"
