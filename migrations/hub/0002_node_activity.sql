-- syncengine hub store, schema 2: what `syncengine status` tells of each node's syncing.
-- Written by the hub processes at most every few seconds per node (and at once when an
-- error code changes), never on the push path's critical section.

-- The last error the hub answered this node, and when.
ALTER TABLE nodes ADD COLUMN last_error_code TEXT;
ALTER TABLE nodes ADD COLUMN last_error      TEXT;
ALTER TABLE nodes ADD COLUMN last_error_at   TIMESTAMPTZ;

-- How far each node has pulled each tier's feed: the hub's view of its lag.
CREATE TABLE node_pulls (
    node_id   TEXT COLLATE "C" NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    tier      SMALLINT    NOT NULL CHECK (tier BETWEEN 0 AND 3),
    cursor    BIGINT      NOT NULL CHECK (cursor >= 0),
    pulled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, tier)
);
