-- What the PACS puller retrieved: one row per remote PACS and study, updated at each attempt.
-- A study is retrieved again when it is not complete or its instance count on the PACS grew
-- (intake deduplicates what was already stored).

CREATE TABLE retrievals (
    id                 INTEGER PRIMARY KEY,
    remote_ae          TEXT NOT NULL,            -- the PACS's AE title
    study_instance_uid TEXT NOT NULL,
    study_date         TEXT,                     -- DA as the PACS answered
    modalities         TEXT,                     -- ModalitiesInStudy as answered, e.g. SM\SR
    method             TEXT NOT NULL,            -- move | get
    state              TEXT NOT NULL,            -- complete | failed
    remote_instances   INTEGER,                  -- NumberOfStudyRelatedInstances when last seen
    wanted_instances   INTEGER,                  -- of those, in series of the wanted modalities
    completed          INTEGER NOT NULL,         -- sub-operations completed (warnings included)
    failed             INTEGER NOT NULL,         -- sub-operations failed at the last attempt
    attempts           INTEGER NOT NULL,
    first_attempt_at   TEXT NOT NULL,            -- UTC, ISO 8601
    last_attempt_at    TEXT NOT NULL,
    completed_at       TEXT,                     -- last attempt that ended complete
    error              TEXT,                     -- why the last attempt failed; NULL when complete
    UNIQUE (remote_ae, study_instance_uid)
);
CREATE INDEX retrievals_state ON retrievals(state);
