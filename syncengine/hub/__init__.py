"""The region hub: PostgreSQL store, Redis cache, HTTP service. Never imports syncengine.edge."""
