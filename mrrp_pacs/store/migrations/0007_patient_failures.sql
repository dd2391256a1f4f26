-- Patients whose extraction or scoring failed (a worker that raised, died or ran over its
-- memory or time limit). Retried at next_attempt_at (backoff doubling per failure), then
-- quarantined (quarantined_at) after [scoring] max_failures until something new arrives for
-- the patient (arrivals differs) or an operator releases it. The row goes when it scores.
-- last_error may quote a patient id: it is shown to operators, never logged.
CREATE TABLE patient_failures (
    patient_key TEXT PRIMARY KEY,
    arrivals TEXT,
    failures INTEGER NOT NULL,
    first_failed_at TEXT NOT NULL,
    last_failed_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    quarantined_at TEXT,
    last_error TEXT NOT NULL
);
