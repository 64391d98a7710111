-- syncengine hub store, schema 1 (PostgreSQL 13+).
-- `records` (cell, collection, key, doc JSONB) is part of the operator contract.
-- Text keys use the "C" collation so cell-prefix ranges are plain index range scans.

-- Edge nodes and what they may touch. Only a hash of the token is kept.
CREATE TABLE nodes (
    node_id     TEXT COLLATE "C" PRIMARY KEY CHECK (node_id ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    region      TEXT        NOT NULL,
    token_hash  BYTEA       NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    grants      TEXT[]      NOT NULL CHECK (cardinality(grants) > 0),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ,
    last_seen   TIMESTAMPTZ
);

-- Per node and lane (tier priority at write time), the highest seq applied: a push at or
-- below it is a replay (a no-op), a push starting above it + 1 is a gap (refused).
CREATE TABLE node_lanes (
    node_id    TEXT COLLATE "C" NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    lane       SMALLINT    NOT NULL CHECK (lane BETWEEN 0 AND 3),
    acked_seq  BIGINT      NOT NULL DEFAULT 0 CHECK (acked_seq >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, lane)
);

-- Cells the hub has seen, with the tier its rules gave them.
CREATE TABLE cells (
    cell       TEXT COLLATE "C" PRIMARY KEY,
    tier       SMALLINT    NOT NULL CHECK (tier BETWEEN 0 AND 3),
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per record: the visible document (NULL once deleted) and the canonical merge state.
-- `feed_id` is the last feed entry folded into it: a snapshot carries it so that the pull
-- that follows a bootstrap skips what the snapshot already holds (counters stay exact).
CREATE TABLE records (
    cell       TEXT COLLATE "C" NOT NULL,
    collection TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    doc        JSONB,
    state      BYTEA       NOT NULL,
    hlc        BIGINT      NOT NULL CHECK (hlc >= 0),
    deleted    BOOLEAN     NOT NULL,
    feed_id    BIGINT      NOT NULL CHECK (feed_id >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (cell, collection, key),
    CHECK (deleted = (doc IS NULL))
);

-- The change feed. Ids are handed out from feed_head while holding the region's append
-- lock, so ids are in commit order and contiguous: a cursor can never skip a change that
-- commits late (the BIGSERIAL trap). Fields are kept as msgpack, as they travel.
CREATE TABLE feed_head (
    one   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    id    BIGINT  NOT NULL DEFAULT 0 CHECK (id >= 0),
    epoch TEXT    NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text)
);
INSERT INTO feed_head DEFAULT VALUES;

CREATE TABLE feed (
    id         BIGINT PRIMARY KEY CHECK (id > 0),
    tier       SMALLINT    NOT NULL CHECK (tier BETWEEN 0 AND 3),
    cell       TEXT COLLATE "C" NOT NULL,
    collection TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    node_id    TEXT COLLATE "C" NOT NULL,
    lane       SMALLINT    NOT NULL CHECK (lane BETWEEN 0 AND 3),
    seq        BIGINT      NOT NULL CHECK (seq > 0),
    hlc        BIGINT      NOT NULL CHECK (hlc > 0),
    fields     BYTEA,
    base       BYTEA,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- exactly once: a node's change can enter the feed only once
    UNIQUE (node_id, lane, seq)
);
CREATE INDEX feed_tier_id ON feed (tier, id);

-- The losing side of every concurrent write (invariant 5).
CREATE TABLE conflicts (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cell           TEXT COLLATE "C" NOT NULL,
    collection     TEXT COLLATE "C" NOT NULL,
    key            TEXT COLLATE "C" NOT NULL,
    field          TEXT        NOT NULL,
    winner_value   JSONB,
    winner_hlc     BIGINT      NOT NULL,
    winner_node    TEXT        NOT NULL,
    winner_deleted BOOLEAN     NOT NULL,
    loser_value    JSONB,
    loser_hlc      BIGINT      NOT NULL,
    loser_node     TEXT        NOT NULL,
    logged_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX conflicts_cell ON conflicts (cell, logged_at);
CREATE INDEX conflicts_logged ON conflicts (logged_at);
