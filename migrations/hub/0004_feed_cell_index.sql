-- syncengine hub store, schema 4: pulls read the feed by cell.
--
-- An edge subscribes to a few cells of a region with thousands. Reading its page through
-- feed_tier_id scanned every entry of the tier since its cursor and kept the few under its
-- prefixes: at a thousand edges the hub spent its time discarding other edges' changes.
-- With this index a pull reads, for each cell under its prefixes (the `cells` table), only
-- that cell's entries after its cursor (syncengine/hub/feed.py).
--
-- On a partitioned table the index is built on every partition, holding a lock that blocks
-- pushes while it builds: on a hub with a large feed, run the upgrade in a quiet hour.

CREATE INDEX feed_cell_id ON feed (cell, id);
