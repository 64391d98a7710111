-- syncengine edge store, schema 3: what `syncengine status` tells of the last syncs.
-- One row per step and tier, written by the daemon and `edge sync` (a success at most every
-- few seconds per step, so a busy critical lane does not write here on every push).
CREATE TABLE sync_steps (
    step            TEXT    NOT NULL CHECK (step IN ('push', 'pull')),
    tier            TEXT    NOT NULL,
    last_ok_ms      INTEGER,           -- the last success
    last_error_ms   INTEGER,           -- the last failure, and what it was
    last_error_code TEXT,
    last_error      TEXT,
    hub_head        INTEGER,           -- pull: the hub's feed head at the last success
    PRIMARY KEY (step, tier)
) WITHOUT ROWID;
