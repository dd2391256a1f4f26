-- The PACS puller's retry schedule and its per-patient look-back.
--
-- A study whose retrieval failed is not tried again before next_attempt_at (exponential
-- backoff, capped); once it has failed for longer than the retry budget its state becomes
-- 'gave_up' and it is skipped until the PACS counts more instances in it.

ALTER TABLE retrievals ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;  -- consecutive failed attempts
ALTER TABLE retrievals ADD COLUMN failing_since TEXT;    -- first attempt of the current failures (UTC)
ALTER TABLE retrievals ADD COLUMN next_attempt_at TEXT;  -- not tried again before (UTC); NULL = any poll
CREATE INDEX retrievals_next_attempt ON retrievals(next_attempt_at);

-- Patients we hold with a wanted imaging modality missing are looked up on the PACS by
-- PatientID, whatever the study date: one row per PACS and PatientID, when last asked.
CREATE TABLE pull_lookbacks (
    remote_ae   TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    checked_at  TEXT NOT NULL,  -- UTC, ISO 8601
    studies     INTEGER NOT NULL,  -- studies the PACS answered for the patient then
    PRIMARY KEY (remote_ae, patient_id)
);
