-- syncengine edge store, schema 1.
-- `records` and `outbox` are part of the operator contract: keep their names and columns.

-- One row per record. `doc` is the visible document as JSON text (query it with json_extract);
-- `state` is the canonical msgpack merge state (values, per-field stamps, tombstone) that
-- replicas compare byte for byte. A deleted record keeps its row (doc NULL) as a tombstone.
CREATE TABLE records (
    cell          TEXT    NOT NULL,
    collection    TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    doc           TEXT,
    state         BLOB    NOT NULL,
    hlc           INTEGER NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (cell, collection, key),
    CHECK ((deleted = 1) = (doc IS NULL))
);

-- Changes not yet acknowledged by the hub. One lane per tier (0 critical .. 3 archive), each
-- with its own contiguous seq, so the hub can tell a replay from a gap per lane.
-- `payload` is msgpack {"f": fields or nil for a delete, "b": base stamps}.
CREATE TABLE outbox (
    lane          INTEGER NOT NULL CHECK (lane BETWEEN 0 AND 3),
    seq           INTEGER NOT NULL CHECK (seq > 0),
    cell          TEXT    NOT NULL,
    collection    TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    hlc           INTEGER NOT NULL,
    payload       BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (lane, seq)
) WITHOUT ROWID;

-- Per lane: the next seq to hand out, the highest seq the hub has acknowledged (everything
-- at or below it is applied at the hub or dead-lettered here), and the first seq this store
-- file issued (own changes below it come back from the hub and must be applied).
CREATE TABLE lanes (
    lane       INTEGER PRIMARY KEY CHECK (lane BETWEEN 0 AND 3),
    next_seq   INTEGER NOT NULL CHECK (next_seq > 0),
    acked_seq  INTEGER NOT NULL CHECK (acked_seq >= 0 AND acked_seq < next_seq),
    first_seq  INTEGER NOT NULL CHECK (first_seq > 0)
);
INSERT INTO lanes (lane, next_seq, acked_seq, first_seq) VALUES (0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 0, 1), (3, 1, 0, 1);

-- Changes the hub refused for good. They never block the changes behind them.
CREATE TABLE dead_letters (
    lane          INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    cell          TEXT    NOT NULL,
    collection    TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    hlc           INTEGER NOT NULL,
    payload       BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    code          TEXT    NOT NULL,
    message       TEXT    NOT NULL,
    detail        TEXT    NOT NULL DEFAULT '{}',
    dead_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (lane, seq)
) WITHOUT ROWID;

-- Pull cursors into the hub's change feed, by name (one per tier pulled).
CREATE TABLE cursors (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL CHECK (value >= 0)
) WITHOUT ROWID;

-- Small key/value facts: node identity, the clock's high-water mark, rules learnt from the hub.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
