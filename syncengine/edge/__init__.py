"""The edge: the local SQLite store, its outbox, and (later) the sync link and daemon."""
