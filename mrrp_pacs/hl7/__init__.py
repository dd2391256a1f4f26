"""HL7 v2, the wire protocol, in one place (as pynetdicom keeps its PDUs and DUL apart from its
apps): :mod:`~mrrp_pacs.hl7.message` splits, decodes, reads and escapes messages;
:mod:`~mrrp_pacs.hl7.mllp` frames them on a TCP stream; :mod:`~mrrp_pacs.hl7.ack` reads the MSH
header and builds and reads acknowledgements.

Thin users on top: the listener (:mod:`listeners.mllp`), the client
(:mod:`exporters.mllp_client`, also behind ``mrrp-pacs hl7 send``), the ORU builder
(:mod:`exporters.hl7_result`) and intake (:mod:`mrrp_pacs.intake`).
"""
