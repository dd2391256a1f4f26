-- What the pipeline makes: features, scores, the export outbox, and a job log.

CREATE TABLE features (
    id                INTEGER PRIMARY KEY,
    patient_key       TEXT NOT NULL,
    family            TEXT NOT NULL,             -- wsi, nuclei, us, radiomics, text, clinical
    extractor         TEXT NOT NULL,
    extractor_version TEXT NOT NULL,
    input_hash        TEXT NOT NULL,             -- sha256 over the inputs that made it
    array_sha256      TEXT,                      -- object holding the arrays
    meta              TEXT,                      -- JSON: shapes, flags (e.g. automatic ROI)
    created_at        TEXT NOT NULL,
    superseded_by     INTEGER REFERENCES features(id),
    UNIQUE (patient_key, family, extractor, extractor_version, input_hash)
);

CREATE TABLE scores (
    id            INTEGER PRIMARY KEY,
    patient_key   TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inputs_hash   TEXT NOT NULL,
    outputs       TEXT NOT NULL,                 -- JSON: risk, percentile, group, absolute risk…
    created_at    TEXT NOT NULL,
    superseded_by INTEGER REFERENCES scores(id),
    UNIQUE (patient_key, model_version, inputs_hash)
);

CREATE TABLE exports (                           -- the outbox: a row before any network call
    id               INTEGER PRIMARY KEY,
    score_id         INTEGER REFERENCES scores(id),
    kind             TEXT NOT NULL,              -- sr | pdf | hl7
    destination      TEXT NOT NULL,
    object_sha256    TEXT,
    sop_instance_uid TEXT,
    state            TEXT NOT NULL,              -- pending | sent | dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX exports_state ON exports(state, next_attempt_at);

CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,                   -- ingest, extract, score, export, rescore…
    state       TEXT NOT NULL,                   -- running | done | failed | interrupted
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    detail      TEXT,                            -- JSON counts
    error       TEXT
);
