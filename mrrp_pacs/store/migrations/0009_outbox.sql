-- Publication and the outbox (issue 17).
--
-- scores.revision: how many times the row was made current again after being superseded
-- (model v2 -> v1, inputs A -> B -> A); each revision is published anew, as new objects.
-- scores.published_revision: the revision whose objects were all queued, in the one
-- transaction that queued them (NULL: none yet). A current score whose published_revision is
-- not its revision is published (again) by the next scoring run.
ALTER TABLE scores ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE scores ADD COLUMN published_revision INTEGER;
-- scores published before this version: published when they have any export row (the rule
-- the daemon used until now)
UPDATE scores SET published_revision = 0
    WHERE id IN (SELECT score_id FROM exports WHERE score_id IS NOT NULL);

-- exports.revision: the score revision the object reports.
-- exports.object_key: what the object is, whatever its bytes: the SOP Instance UID (DICOM)
-- or 'hl7:' + MSH-10 (HL7). One row per (object_key, destination): queuing it again with the
-- same bytes is a no-op, with other bytes it is refused. Rows queued before this version were
-- keyed by their bytes; should two of them share a SOP Instance UID and destination, the
-- first keeps the key and the others keep a NULL key (NULLs do not collide): no row is lost.
-- exports.failing_since: when the current run of failed attempts began (the retry budget,
-- [export] retry_hours, counts from it); NULL while the row has not failed.
ALTER TABLE exports ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE exports ADD COLUMN object_key TEXT;
ALTER TABLE exports ADD COLUMN failing_since TEXT;
UPDATE exports SET object_key = sop_instance_uid
    WHERE sop_instance_uid IS NOT NULL AND id = (
        SELECT min(e.id) FROM exports e
        WHERE e.sop_instance_uid = exports.sop_instance_uid
          AND e.destination = exports.destination);
-- HL7 results were built with MSH-10 = MRRP<score id>
UPDATE exports SET object_key = 'hl7:MRRP' || score_id
    WHERE kind = 'hl7' AND score_id IS NOT NULL AND id = (
        SELECT min(e.id) FROM exports e
        WHERE e.kind = 'hl7' AND e.score_id = exports.score_id
          AND e.destination = exports.destination);
-- a pending row that already failed: its budget counts from its last failure
UPDATE exports SET failing_since = updated_at WHERE state = 'pending' AND attempts > 0;
CREATE UNIQUE INDEX exports_object ON exports(object_key, destination);
