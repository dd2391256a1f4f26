-- Everything received: DICOM instances, HL7 messages, and what was parsed out of them.
-- Files live in the content-addressed object store; rows point at them by sha256.

CREATE TABLE instances (
    id                   INTEGER PRIMARY KEY,
    sop_instance_uid     TEXT NOT NULL,
    sop_class_uid        TEXT NOT NULL,
    study_instance_uid   TEXT NOT NULL,
    series_instance_uid  TEXT NOT NULL,
    modality             TEXT,
    patient_id           TEXT,
    issuer_of_patient_id TEXT,
    accession_number     TEXT,
    study_date           TEXT,
    transfer_syntax_uid  TEXT,
    sha256               TEXT NOT NULL UNIQUE,
    size_bytes           INTEGER NOT NULL,
    source               TEXT NOT NULL,          -- e.g. file:<path>, dicom:<calling AE>
    received_at          TEXT NOT NULL,          -- UTC, ISO 8601
    superseded_by        INTEGER REFERENCES instances(id)  -- a later object with the same SOP UID
);
CREATE INDEX instances_sop_uid ON instances(sop_instance_uid);
CREATE INDEX instances_patient ON instances(patient_id, issuer_of_patient_id);
CREATE INDEX instances_study ON instances(study_instance_uid);

CREATE TABLE hl7_messages (
    id                  INTEGER PRIMARY KEY,
    control_id          TEXT NOT NULL,           -- MSH-10
    sending_application TEXT NOT NULL,           -- MSH-3
    sending_facility    TEXT NOT NULL,           -- MSH-4
    message_type        TEXT NOT NULL,           -- MSH-9, e.g. ORU^R01
    message_datetime    TEXT,                    -- MSH-7 as sent
    version             TEXT,                    -- MSH-12
    processing_id       TEXT,                    -- MSH-11 (P, T, D)
    charset             TEXT NOT NULL,           -- codec used to decode the bytes
    patient_id          TEXT,                    -- chosen PID-3 repetition
    assigning_authority TEXT,
    sha256              TEXT NOT NULL UNIQUE,
    size_bytes          INTEGER NOT NULL,
    source              TEXT NOT NULL,
    received_at         TEXT NOT NULL,
    -- parsed: content extracted into the tables below;
    -- duplicate_control_id: same sender and MSH-10 as an earlier message, kept but not processed
    state               TEXT NOT NULL,
    note                TEXT
);
CREATE INDEX hl7_messages_control ON hl7_messages(sending_application, sending_facility, control_id);
CREATE INDEX hl7_messages_patient ON hl7_messages(patient_id, assigning_authority);

CREATE TABLE observations (                      -- every OBX, as sent (escapes decoded)
    id            INTEGER PRIMARY KEY,
    message_id    INTEGER NOT NULL REFERENCES hl7_messages(id),
    obr_index     INTEGER NOT NULL,              -- 1-based OBR this OBX follows; 0 = none
    set_id        TEXT,
    value_type    TEXT,
    code          TEXT,
    code_text     TEXT,
    coding_system TEXT,
    sub_id        TEXT,
    value         TEXT,
    units         TEXT,
    status        TEXT,                          -- OBX-11: F final, C corrected, P preliminary…
    observed_at   TEXT
);
CREATE INDEX observations_message ON observations(message_id);

CREATE TABLE reports (                           -- narrative results (TX/FT OBX lines of one OBR)
    id                  INTEGER PRIMARY KEY,
    message_id          INTEGER NOT NULL REFERENCES hl7_messages(id),
    patient_id          TEXT,
    assigning_authority TEXT,
    accession_number    TEXT,
    kind                TEXT NOT NULL,           -- ultrasound | pathology | other
    service_code        TEXT,                    -- OBR-4.1
    service_text        TEXT,                    -- OBR-4.2
    section             TEXT,                    -- OBR-24
    status              TEXT,                    -- OBR-25
    observed_at         TEXT,                    -- OBR-7
    text                TEXT NOT NULL,
    superseded_by       INTEGER REFERENCES reports(id)
);
CREATE INDEX reports_patient ON reports(patient_id, assigning_authority);
CREATE INDEX reports_accession ON reports(accession_number);

CREATE TABLE clinical_values (                   -- OBX (or PID) values mapped to model variables
    id                  INTEGER PRIMARY KEY,
    message_id          INTEGER NOT NULL REFERENCES hl7_messages(id),
    observation_id      INTEGER REFERENCES observations(id),
    patient_id          TEXT,
    assigning_authority TEXT,
    variable            TEXT NOT NULL,
    value_text          TEXT NOT NULL,
    value_num           REAL,
    unit                TEXT,
    status              TEXT,
    observed_at         TEXT,
    source              TEXT NOT NULL,           -- e.g. OBX LN:21889-1, PID-7
    superseded_by       INTEGER REFERENCES clinical_values(id)
);
CREATE INDEX clinical_values_patient ON clinical_values(patient_id, assigning_authority, variable);

CREATE TABLE rois (                              -- regions of interest found in SR / annotation objects
    id                           INTEGER PRIMARY KEY,
    instance_id                  INTEGER REFERENCES instances(id),
    kind                         TEXT NOT NULL,  -- sr_scoord | sr_scoord3d | annotation_group
    label                        TEXT,
    graphic_type                 TEXT NOT NULL,
    coordinate_space             TEXT NOT NULL,  -- image_px | frame_mm
    shape_count                  INTEGER NOT NULL,
    shapes                       TEXT,           -- JSON [[[x, y(, z)], …], …]; NULL when too many to index
    referenced_sop_instance_uid  TEXT,
    referenced_series_instance_uid TEXT
);
CREATE INDEX rois_instance ON rois(instance_id);
CREATE INDEX rois_referenced ON rois(referenced_sop_instance_uid);
