-- What had arrived for a patient when it was scored (a digest of its stored row ids), so the
-- scheduler rescores exactly the cases that received something new.
ALTER TABLE scores ADD COLUMN arrivals TEXT;
