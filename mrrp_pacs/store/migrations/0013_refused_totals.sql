-- Running totals of refused_input (rows and kept bytes), kept by triggers, so that keeping one
-- more refused input costs the same beside ten rows or a hundred thousand: the SUM over every
-- row it replaces took 168 ms a refusal at 100,000 rows, and a peer sending junk fast made
-- each refusal slower than the last (found by make soak). mrrp_pacs/intake/refused.py.
CREATE TABLE refused_totals (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    row_count   INTEGER NOT NULL,
    kept_bytes  INTEGER NOT NULL
);
INSERT INTO refused_totals (id, row_count, kept_bytes)
    SELECT 1, count(*), COALESCE(SUM(kept_bytes), 0) FROM refused_input;
CREATE TRIGGER refused_totals_insert AFTER INSERT ON refused_input BEGIN
    UPDATE refused_totals SET row_count = row_count + 1,
                              kept_bytes = kept_bytes + NEW.kept_bytes WHERE id = 1;
END;
CREATE TRIGGER refused_totals_delete AFTER DELETE ON refused_input BEGIN
    UPDATE refused_totals SET row_count = row_count - 1,
                              kept_bytes = kept_bytes - OLD.kept_bytes WHERE id = 1;
END;
CREATE TRIGGER refused_totals_update AFTER UPDATE OF kept_bytes ON refused_input BEGIN
    UPDATE refused_totals SET kept_bytes = kept_bytes - OLD.kept_bytes + NEW.kept_bytes
        WHERE id = 1;
END;
