"""Store-and-forward bundles: sync carried by hand (a USB stick, a phone) instead of a link.

A bundle is one file: a msgpack map ``{format, v, manifest, payload, mac}``.

- ``manifest`` (msgpack bytes) says what it is: ``kind`` (``outbox`` from an edge, ``reply``
  from the hub), ``node``, ``region``, ``created_at``, counts and seq or cursor ranges.
  It can be read without the key, so a hub knows whose key to check with.
- ``payload`` is zstd-compressed msgpack: push batches (exactly as ``POST /v1/push`` carries
  them) for an outbox bundle; pull pages (as ``GET /v1/pull`` returns them) and the node's
  acknowledged seqs for a reply.
- ``mac`` is HMAC-SHA256 over the manifest and the payload, keyed by SHA-256 of the node's
  token: the edge knows the token, the hub keeps exactly that hash. A changed byte, a cut
  file or another node's bundle fails before anything is applied.

Applying one is idempotent by the same rules as the network: pushes dedup by seq (and a
seq carrying another change is refused), pulls skip entries at or below the cursor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import zstandard

from syncengine.errors import InvalidInputError, StorageError

__all__ = ["Bundle", "bundle_key", "open_bundle", "peek_manifest", "write_bundle"]

FORMAT: Final = "syncengine-bundle"
VERSION: Final = 1
#: Largest payload once decompressed: a bundle is read whole, so it is bounded.
MAX_PAYLOAD_BYTES: Final = 1 << 30


class BundleError(InvalidInputError):
    code = "invalid_bundle"
    default_hint = "Use a bundle written by `syncengine edge export-bundle` or `hub export-bundle`."


@dataclass(frozen=True, slots=True)
class Bundle:
    manifest: dict[str, Any]
    payload: dict[str, Any]


def bundle_key(token: str) -> bytes:
    """The HMAC key of a node's bundles: SHA-256 of its token (what the hub stores)."""
    return hashlib.sha256(token.encode()).digest()


def write_bundle(path: Path, manifest: dict[str, Any], payload: dict[str, Any], key: bytes) -> int:
    """Write a bundle atomically (a temporary file renamed into place); return its size.
    Never overwrites: raises :class:`StorageError` when ``path`` exists."""
    if path.exists():
        raise StorageError(
            f"{path} exists already; a bundle never overwrites a file",
            hint="Name a new file.",
            code="bundle_exists",
        )
    head = msgpack.packb({**manifest, "format_version": VERSION}, use_bin_type=True)
    body = zstandard.ZstdCompressor(level=10).compress(msgpack.packb(payload, use_bin_type=True))
    mac = hmac.new(key, _signed(head, body), hashlib.sha256).digest()
    data = msgpack.packb(
        {"format": FORMAT, "v": VERSION, "manifest": head, "payload": body, "mac": mac},
        use_bin_type=True,
    )
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"cannot write the bundle {path}: {exc.strerror or exc}",
            hint="Check that the folder exists, is writable and has space.",
            code="bundle_unwritable",
        ) from None
    return len(data)


def peek_manifest(path: Path) -> dict[str, Any]:
    """The manifest, unverified: to find out whose key verifies the bundle."""
    outer = _outer(path)
    return _unpack_map(outer["manifest"], path, "manifest")


def open_bundle(path: Path, key: bytes) -> Bundle:
    """Verify the bundle's MAC with ``key`` and return its manifest and payload. Raises
    :class:`BundleError` for a file that is not a bundle, is cut short, was changed, or was
    made with another key."""
    outer = _outer(path)
    head, body, mac = outer["manifest"], outer["payload"], outer["mac"]
    expected = hmac.new(key, _signed(head, body), hashlib.sha256).digest()
    if not isinstance(mac, bytes) or not hmac.compare_digest(mac, expected):
        raise BundleError(
            f"{path}: the bundle's signature does not match: it was changed after it was "
            "written, or made for another node (or with a token since rotated)",
            hint="Ask for a new bundle; nothing was applied.",
            code="bundle_tampered",
        )
    manifest = _unpack_map(head, path, "manifest")
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_PAYLOAD_BYTES)
    except zstandard.ZstdError as exc:
        raise BundleError(f"{path}: the payload does not decompress: {exc}") from None
    return Bundle(manifest, _unpack_map(raw, path, "payload"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _signed(head: bytes, body: bytes) -> bytes:
    return FORMAT.encode() + b"\0" + len(head).to_bytes(8, "big") + head + body


def _outer(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StorageError(
            f"cannot read the bundle {path}: {exc.strerror or exc}",
            hint="Check the path.",
            code="no_bundle",
        ) from None
    outer = _unpack_map(data, path, "file")
    if outer.get("format") != FORMAT:
        raise BundleError(f"{path} is not a syncengine bundle")
    if outer.get("v") != VERSION:
        raise BundleError(
            f"{path}: bundle format version {outer.get('v')!r}, this syncengine reads {VERSION}",
            hint="Use the same syncengine version on both sides.",
            code="unsupported_version",
        )
    for name in ("manifest", "payload", "mac"):
        if not isinstance(outer.get(name), bytes):
            raise BundleError(f"{path}: the bundle has no valid {name!r}")
    return outer


def _unpack_map(data: bytes, path: Path, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BundleError(
            f"{path}: the bundle's {what} is cut short or garbled ({type(exc).__name__})",
            hint="Copy the bundle again from its source; nothing was applied.",
            code="bundle_truncated",
        ) from None
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: the bundle's {what} is not a map")
    return obj
