-- syncengine hub store, schema 3: a change feed that stays small.
--
-- The feed is partitioned by day of `applied_at` (PostgreSQL declarative partitioning).
-- Whole partitions older than the retention horizon, once every subscriber has pulled past
-- them, are dropped by the hub's feed maintenance (see syncengine/hub/retention.py); the
-- highest id dropped becomes `feed_head.horizon`. A pull from a cursor below the horizon is
-- answered `cursor_behind_horizon` and the edge re-bootstraps from a snapshot. `records`
-- keeps every record, tombstones too, so a re-bootstrap resurrects nothing.
--
-- Ids are still handed out from feed_head under the append lock: contiguous, in commit order.
-- Uniqueness of a node's (lane, seq) in the feed rests on that same lock and
-- node_lanes.acked_seq (a partitioned table cannot hold a unique index without its
-- partition key); `syncengine hub verify` checks it.

ALTER TABLE feed_head ADD COLUMN horizon BIGINT NOT NULL DEFAULT 0 CHECK (horizon >= 0);

ALTER TABLE feed RENAME TO feed_unpartitioned;
ALTER TABLE feed_unpartitioned RENAME CONSTRAINT feed_pkey TO feed_unpartitioned_pkey;
ALTER TABLE feed_unpartitioned RENAME CONSTRAINT feed_node_id_lane_seq_key
    TO feed_unpartitioned_node_id_lane_seq_key;
ALTER INDEX feed_tier_id RENAME TO feed_unpartitioned_tier_id;

CREATE TABLE feed (
    id         BIGINT      NOT NULL CHECK (id > 0),
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
    PRIMARY KEY (id, applied_at)
) PARTITION BY RANGE (applied_at);
CREATE INDEX feed_tier_id ON feed (tier, id);
CREATE INDEX feed_node_lane_seq ON feed (node_id, lane, seq);

-- The partitions the maintenance made, with their bounds (operators read this table).
CREATE TABLE feed_partitions (
    name      TEXT COLLATE "C" PRIMARY KEY,
    starts_at TIMESTAMPTZ,
    ends_at   TIMESTAMPTZ NOT NULL,
    CHECK (starts_at IS NULL OR starts_at < ends_at)
);

-- Everything up to the end of today (UTC) in one partition; the maintenance adds the days
-- after it before they begin. The default partition only catches a clock far ahead.
CREATE TABLE feed_p_initial PARTITION OF feed
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now(), 'UTC') + interval '1 day');
INSERT INTO feed_partitions (name, starts_at, ends_at)
    VALUES ('feed_p_initial', NULL, date_trunc('day', now(), 'UTC') + interval '1 day');
CREATE TABLE feed_p_default PARTITION OF feed DEFAULT;

INSERT INTO feed SELECT * FROM feed_unpartitioned;
DROP TABLE feed_unpartitioned;
