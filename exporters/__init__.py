"""Everything that sends results out: the DICOM SR and PDF builders, the outbox and its
senders. Nothing is here yet: results export is the exporter issue's work."""
