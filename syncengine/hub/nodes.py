"""Edge nodes as the hub knows them: identity by token, grants, and the access rules.

A token is 32 random bytes, shown once when the node is added (or its token rotated). The
hub keeps only its SHA-256: tokens are high-entropy, so a fast hash is enough and a stolen
database does not reveal them. A node's identity comes from its token alone; a request that
claims another node id is refused.

Access (invariant 7): a node reads and writes only cells under its grants, and the hub
stores only cells whose home region is its own, whatever the grants say.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from syncengine.cells import covers, home_region, parse_prefix
from syncengine.errors import AuthenticationError, ConfigError, ForbiddenError
from syncengine.hub.db import translated
from syncengine.protocol import validate_node_id

__all__ = [
    "TOKEN_PREFIX",
    "Node",
    "add_node",
    "authenticate",
    "check_readable",
    "check_writable",
    "list_nodes",
    "revoke_node",
    "rotate_token",
]

TOKEN_PREFIX = "se1_"


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    node_id: str
    region: str
    grants: tuple[str, ...]
    last_seen: datetime | None = None
    revoked: bool = False


def _new_token() -> tuple[str, bytes]:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, _hash(token)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_grants(region: str, grants: Sequence[str]) -> tuple[str, ...]:
    if not grants:
        raise ConfigError("a node needs at least one --grant PREFIX", code="no_grants")
    for g in grants:
        parse_prefix(g)
        if home_region(g) != region:
            raise ConfigError(
                f"grant {g!r} is outside this hub's region {region!r}",
                hint="A hub stores only cells of its own region; register the node at the hub of "
                f"region {home_region(g)!r}.",
                code="foreign_grant",
            )
    return tuple(dict.fromkeys(grants))


async def add_node(pool: asyncpg.Pool, region: str, node_id: str, grants: Sequence[str]) -> str:
    """Register a node; return its token (shown once, never stored)."""
    validate_node_id(node_id)
    checked = _check_grants(region, grants)
    token, digest = _new_token()
    async with translated("add-node"):
        try:
            await pool.execute(
                "INSERT INTO nodes (node_id, region, token_hash, grants) VALUES ($1, $2, $3, $4)",
                node_id,
                region,
                digest,
                list(checked),
            )
        except asyncpg.UniqueViolationError:
            raise ConfigError(
                f"node {node_id!r} is already registered",
                hint="Use `syncengine hub rotate-token` for a new token, or choose another id.",
                code="node_exists",
            ) from None
    return token


async def rotate_token(pool: asyncpg.Pool, node_id: str) -> str:
    """Issue a new token for ``node_id``; the old one stops working at once."""
    token, digest = _new_token()
    async with translated("rotate-token"):
        done = await pool.execute(
            "UPDATE nodes SET token_hash = $2, rotated_at = now(), revoked_at = NULL "
            "WHERE node_id = $1",
            node_id,
            digest,
        )
    if done.endswith(" 0"):
        raise ConfigError(f"no node {node_id!r} is registered", code="unknown_node")
    return token


async def revoke_node(pool: asyncpg.Pool, node_id: str) -> None:
    """Revoke ``node_id``'s token: its next request gets 401."""
    async with translated("revoke"):
        done = await pool.execute("UPDATE nodes SET revoked_at = now() WHERE node_id = $1", node_id)
    if done.endswith(" 0"):
        raise ConfigError(f"no node {node_id!r} is registered", code="unknown_node")


class TokenCache:
    """The nodes of tokens looked up lately, each trusted for ``ttl_s`` seconds after its
    look-up (``token_cache_s``): a large fleet's requests skip a database round trip each,
    and a revoked token or narrowed grants apply to this process that much later. Only
    tokens that authenticated are kept; unknown and revoked ones are looked up every time.
    Holds at most ``max_entries`` (a fleet's nodes), emptied when full."""

    def __init__(self, ttl_s: float, *, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._nodes: dict[bytes, tuple[float, Node]] = {}

    def get(self, token_hash: bytes) -> Node | None:
        found = self._nodes.get(token_hash)
        if found is None:
            return None
        if time.monotonic() >= found[0]:
            del self._nodes[token_hash]
            return None
        return found[1]

    def put(self, token_hash: bytes, node: Node) -> None:
        if len(self._nodes) >= self.max_entries:
            self._nodes.clear()
        self._nodes[token_hash] = (time.monotonic() + self.ttl_s, node)


async def authenticate(
    pool: asyncpg.Pool, token: str | None, cache: TokenCache | None = None
) -> Node:
    """The node a bearer token belongs to (from ``cache`` while it trusts the token).
    Raises :class:`AuthenticationError` (401)."""
    if not token:
        raise AuthenticationError(
            "missing bearer token", hint="Send `Authorization: Bearer <token>`."
        )
    token_hash = _hash(token)
    if cache is not None and (node := cache.get(token_hash)) is not None:
        return node
    async with translated("authenticate"):
        row = await pool.fetchrow(
            "SELECT node_id, region, grants, last_seen, revoked_at FROM nodes WHERE token_hash = $1",
            token_hash,
        )
    if row is None:
        raise AuthenticationError("unknown token", code="invalid_token")
    if row["revoked_at"] is not None:
        raise AuthenticationError(
            f"the token of node {row['node_id']!r} was revoked",
            hint="Ask the hub operator for a new token (`syncengine hub rotate-token`).",
            code="revoked_token",
        )
    node = Node(
        node_id=row["node_id"],
        region=row["region"],
        grants=tuple(row["grants"]),
        last_seen=row["last_seen"],
    )
    if cache is not None:
        cache.put(token_hash, node)
    return node


async def list_nodes(pool: asyncpg.Pool) -> list[Node]:
    async with translated("list nodes"):
        rows = await pool.fetch(
            "SELECT node_id, region, grants, last_seen, revoked_at FROM nodes ORDER BY node_id"
        )
    return [
        Node(
            node_id=r["node_id"],
            region=r["region"],
            grants=tuple(r["grants"]),
            last_seen=r["last_seen"],
            revoked=r["revoked_at"] is not None,
        )
        for r in rows
    ]


def check_writable(node: Node, hub_region: str, cells: Iterable[str]) -> None:
    """Refuse (403) a cell of another region or outside the node's grants."""
    for cell in cells:
        if home_region(cell) != hub_region:
            raise ForbiddenError(
                f"cell {cell!r} belongs to region {home_region(cell)!r}; this hub stores only "
                f"region {hub_region!r}",
                hint="Data stays in its home region: sync this cell with that region's hub.",
                code="foreign_region",
                detail={"cell": cell, "rule": "home_region", "hub_region": hub_region},
            )
        if not any(covers(g, cell) for g in node.grants):
            raise ForbiddenError(
                f"node {node.node_id!r} has no grant covering cell {cell!r}",
                hint="Ask the hub operator to add a grant (`syncengine hub add-node … --grant`).",
                code="not_granted",
                detail={"cell": cell, "rule": "grant", "grants": list(node.grants)},
            )


def check_readable(node: Node, hub_region: str, prefixes: Iterable[str]) -> list[str]:
    """Validate subscription prefixes: each must be of this region and under a grant."""
    out = [parse_prefix(p) for p in prefixes]
    check_writable(node, hub_region, out)
    return out
