-- Who did what, when, to which patient: one row per received object or message, per refused
-- input, per score and per export outcome (mrrp_pacs/audit.py, `mrrp-pacs audit`). Each row is
-- written in the transaction of the fact it records, so there is never one without the other.
-- Rows are only ever deleted by the retention setting [audit] keep_days (0 = kept forever).
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,      -- UTC, ISO 8601, from the store's clock
    event       TEXT NOT NULL,      -- received | refused | scored | exported | export-failed
    who         TEXT NOT NULL,      -- dicom:<calling AE>@<address> | file-drop:<folder> |
                                    -- mllp:<address> | quarantine:<id> | model:<version> |
                                    -- the export destination (<AE>@<host>:<port>)
    what        TEXT NOT NULL,      -- SOP Instance UID | HL7 control id digest (c:+10 hex) |
                                    -- score:<id> | export:<id> | sha256:<12 hex>
    patient_key TEXT,               -- as cases and scores key patients; NULL when unknown
    detail      TEXT                -- a short note without patient data
);
CREATE INDEX audit_at ON audit(at);
CREATE INDEX audit_patient ON audit(patient_key, at);
