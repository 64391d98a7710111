"""The private PostgreSQL and Redis servers live in the package (``syncengine demo`` needs
them too); tests import them from here."""

from syncengine.devservers import (
    RESERVED_PORTS,
    PostgresServer,
    RedisServer,
    ServerError,
    find_pg_bindir,
    find_redis_server,
    free_port,
)

__all__ = [
    "RESERVED_PORTS",
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
]
