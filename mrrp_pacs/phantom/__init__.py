"""The phantom hospital: a seeded synthetic cohort in real DICOM and HL7 with a known hazard."""
