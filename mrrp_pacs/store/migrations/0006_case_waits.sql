-- When scoring first saw a case with one imaging modality (by the store's clock). The wait for
-- the other modality runs from the earlier of this and the first image's received_at, leaving
-- out a stamp that lies in the future (the clock was stepped back after it was written), so a
-- clock step neither scores a case early nor keeps it waiting for the length of the step.
CREATE TABLE case_waits (
    patient_key TEXT PRIMARY KEY,
    seen_at TEXT NOT NULL
);
