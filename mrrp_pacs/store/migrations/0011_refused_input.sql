-- Input refused for its content (an HL7 message answered AE, later a DICOM object refused by
-- the SCP): kept so that an operator can see why and, once the configuration is fixed, run
-- it through intake again (`mrrp-pacs quarantine list|show|reprocess`). The bytes live in a
-- content-addressed area of their own, <objects>/refused/, from which the oldest are dropped
-- beyond [ingest] refused_keep_bytes (mrrp_pacs/intake/refused.py).
CREATE TABLE refused_input (
    id                INTEGER PRIMARY KEY,
    kind              TEXT NOT NULL,             -- hl7 | dicom
    listener          TEXT NOT NULL,             -- mllp | dicom | file
    peer              TEXT,                      -- the sender's address, when there is one
    received_at       TEXT NOT NULL,             -- UTC, ISO 8601
    reason            TEXT NOT NULL,             -- as answered to the sender, no patient data
    size_bytes        INTEGER NOT NULL,          -- the input's size as received
    kept_bytes        INTEGER NOT NULL,          -- bytes kept: < size_bytes when it was too large
    sha256            TEXT NOT NULL,             -- of the kept bytes, in <objects>/refused/
    reprocessed_at    TEXT,                      -- set once; a row is never reprocessed twice
    reprocess_outcome TEXT,                      -- new | duplicate | rejected
    reprocess_note    TEXT
);
CREATE INDEX refused_input_received ON refused_input(received_at);
CREATE INDEX refused_input_sha ON refused_input(sha256);
