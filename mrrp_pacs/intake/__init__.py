"""Intake: recognise, validate and persist what arrives (DICOM objects, HL7 v2 messages)."""

from mrrp_pacs.intake.persist import Intake, IntakeResult, Outcome

__all__ = ["Intake", "IntakeResult", "Outcome"]
