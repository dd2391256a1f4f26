"""Everything that sends results out: the DICOM SR and PDF builders (``sr``, ``pdf``, ``codes``),
``publish`` (score → objects → outbox), the ``outbox`` and its senders (``dicom_sender``,
``hl7_result``); see docs/exporters.md."""
