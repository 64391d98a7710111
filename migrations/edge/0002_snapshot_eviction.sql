-- syncengine edge store, schema 2: bootstrap from the hub's snapshot, archive eviction.
-- Adds columns and a table; the operator contract (`records`, `outbox`) keeps its columns.

-- The hub feed id a snapshot (or a read-back) gave this record's state: every feed entry
-- of the record at or below it is already in `state`, so a pull skips those (counters stay
-- exact). NULL for records built from pulls and local writes alone.
ALTER TABLE records ADD COLUMN hub_feed_id INTEGER CHECK (hub_feed_id >= 0);

-- When the hub last held everything of this record (its newest local change acknowledged,
-- or its state received from the hub); NULL while a local change of it is queued. Archive
-- eviction counts from here.
ALTER TABLE records ADD COLUMN synced_at_ms INTEGER;

-- Records dropped locally by archive eviction: the hub has them. Reading one fetches it
-- back (online) or says it is not available offline; pulls do not rebuild it piecemeal.
CREATE TABLE evicted (
    cell          TEXT    NOT NULL,
    collection    TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    evicted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (cell, collection, key)
) WITHOUT ROWID;
