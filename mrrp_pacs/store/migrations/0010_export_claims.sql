-- Who claimed an outbox row for sending: "host:pid:process start time". A drain that finds a
-- row claimed by a process of this host that no longer runs (killed mid-send) releases it at
-- once instead of waiting out the claim (exporters/outbox.py).
ALTER TABLE exports ADD COLUMN claimed_by TEXT;
