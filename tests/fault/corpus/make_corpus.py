"""Write the T14 bad-input corpus: ``python tests/fault/corpus/make_corpus.py [--check]``.

Every case is one request to a west hub: a body (``NAME.bin``, or ``NAME.bin.zst`` when the
body is large: the file holds the body zstd-compressed for storage only; what is sent is the
decompressed body) and an entry in ``expected.toml`` saying where it goes (method, path,
query, which identity's token, extra headers) and what the hub must answer (status and error
code). The files are committed, so the corpus is fixed; this script rebuilds them
byte for byte (``--check`` compares instead of writing).

The cases assume the hub state that ``tests/fault/test_t14_bad_input.py`` sets up, and run in
file order:

- ``node-a`` and ``node-b`` granted ``west/ng/lagos``; ``node-a`` has pushed seqs 1..2 of
  lane 2 (the corpus' first case, ``setup-000``); ``node-c`` is revoked; ``node-t`` (granted
  ``west/ng/lagos/text``) pushes the accepted text cases, seq after seq; ``node-r`` reads them
  back; the hub resolves collection ``stock`` with ``counter``.
- Rejected cases are built on the push that would be next for ``node-a`` (seq 3), broken in
  one way, so a build that fails to refuse them applies them and is caught.
- Stamps are fixed: :data:`T0` (2026-01-01) is in the past for any run, :data:`FUTURE`
  (2100-01-01) is beyond any clock drift.

This script uses plain msgpack, zstandard and struct, never syncengine: the corpus is the
protocol as documented (``syncengine/protocol.py``), not as the code under test builds it.
"""

from __future__ import annotations

import math
import random
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import zstandard

HERE = Path(__file__).resolve().parent

T0 = 1_767_225_600_000 << 16  # 2026-01-01T00:00:00Z as an HLC (ms << 16)
FUTURE = 4_102_444_800_000 << 16  # 2100-01-01: ahead of any hub clock by far more than drift
MAX_HLC = (1 << 63) - 1
CELL = "west/ng/lagos/clinic-12"
TEXT_CELL = "west/ng/lagos/text/notes-1"
MAX_BODY = 8 * 1_048_576  # the hub's default max_body_bytes
MAX_STR = 4 * 1_048_576  # the codec's max_str_bytes / max_bin_bytes
MAX_ITEMS = 200_000  # the codec's max_items
STORE_ZSTD_OVER = 64 * 1024  # bodies larger than this are stored zstd-compressed

#: HTTP status of every error code the corpus expects.
STATUS = {
    **dict.fromkeys(
        [
            "malformed_body",
            "invalid_utf8",
            "invalid_value",
            "invalid_seq",
            "unknown_field",
            "missing_field",
            "unsupported_version",
            "invalid_node_id",
            "invalid_cell",
            "invalid_collection",
            "invalid_key",
            "key_too_long",
            "invalid_hlc",
            "empty_put",
            "invalid_field_name",
            "unencodable_value",
            "unsupported_encoding",
            "invalid_tier",
            "invalid_param",
            "missing_prefix",
        ],
        400,
    ),
    **dict.fromkeys(
        [
            "body_too_large",
            "decompressed_too_large",
            "item_limit_exceeded",
            "too_deep",
            "batch_too_large",
        ],
        413,
    ),
    **dict.fromkeys(["unauthenticated", "invalid_token", "revoked_token"], 401),
    **dict.fromkeys(["node_mismatch", "foreign_region", "not_granted"], 403),
    **dict.fromkeys(["seq_gap", "seq_reused"], 409),
    "clock_drift": 422,
}


@dataclass
class Case:
    category: str
    slug: str
    what: str
    body: bytes
    status: int
    error: str
    method: str = "POST"
    path: str = "/v1/push"
    query: str = ""
    auth: str = "node-a"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    acked: int | None = None
    mutates: bool = False
    roundtrip: bool = False


CASES: list[Case] = []


def add(
    category: str,
    slug: str,
    what: str,
    body: bytes,
    error: str,
    *,
    status: int | None = None,
    **kw: Any,
) -> None:
    """A rejected case (the status follows from the code unless given)."""
    CASES.append(Case(category, slug, what, body, status or STATUS[error], error, **kw))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=True).compress(data)


# -- bodies ------------------------------------------------------------------------------------


def row(
    seq: int,
    *,
    key: Any = None,
    hlc: int | None = None,
    fields: Any = None,
    cell_i: Any = 0,
    coll_i: Any = 0,
    base: Any = None,
) -> list[Any]:
    """One push change as the protocol lists it; ``hlc`` is the absolute stamp (the first row
    of a batch carries it as its delta)."""
    return [
        cell_i,
        coll_i,
        key or f"k{seq}",
        T0 + seq if hlc is None else hlc,
        {"v": seq} if fields is None else fields,
        base,
    ]


def push(
    *,
    node: Any = "node-a",
    lane: int = 2,
    first: int = 3,
    rows: list[list[Any]] | None = None,
    skipped: list[int] | None = None,
    cells: list[Any] | None = None,
    colls: list[Any] | None = None,
    last: int | None = None,
) -> dict[Any, Any]:
    """The push ``node`` would send next (one change at seq ``first`` unless ``rows``)."""
    rows = [row(first)] if rows is None else rows
    skipped = skipped or []
    # Stamps are delta-coded against the previous row of the batch.
    coded, prev = [], 0
    for r in rows:
        hlc = r[3]
        coded.append(
            [
                *r[:3],
                hlc - prev
                if isinstance(hlc, int) and not isinstance(hlc, bool) and isinstance(prev, int)
                else hlc,
                *r[4:],
            ]
        )
        prev = hlc if isinstance(hlc, int) else prev
    return {
        "v": 1,
        "node": node,
        "lane": lane,
        "first": first,
        "last": first + len(rows) + len(skipped) - 1 if last is None else last,
        "skipped": skipped,
        "cells": [CELL] if cells is None else cells,
        "colls": ["visits"] if colls is None else colls,
        "changes": coded,
    }


def raw_push(rows: list[Any], **kw: Any) -> dict[Any, Any]:
    """Like :func:`push`, but ``rows`` are sent as given (their stamp slot is the delta)."""
    msg = push(**kw)
    msg["changes"] = rows
    msg["last"] = kw.get("last", msg["first"] + len(rows) + len(kw.get("skipped") or []) - 1)
    return msg


class Splice:
    """Raw msgpack bytes to put where a placeholder string sits in a packed message: for
    bytes no well-behaved packer writes (ext types, 0xc1, lying length headers, bad UTF-8)."""

    _n = 0

    def __init__(self, raw: bytes) -> None:
        Splice._n += 1
        self.raw = raw
        self.mark = f"\x00splice-{Splice._n}\x00"


def packed(obj: Any) -> bytes:
    """``obj`` packed, with every :class:`Splice` in it replaced by its raw bytes."""
    splices: list[Splice] = []

    def walk(o: Any) -> Any:
        if isinstance(o, Splice):
            splices.append(o)
            return o.mark
        if isinstance(o, dict):
            return {walk(k): walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    data = pack(walk(obj))
    for s in splices:
        mark = pack(s.mark)
        assert data.count(mark) == 1, s.mark
        data = data.replace(mark, s.raw)
    return data


def deep(depth: int, kind: str = "array") -> Splice:
    """``depth`` nested one-element arrays (or maps ``{"a": …}``) around a 0."""
    head = b"\x91" if kind == "array" else b"\x81\xa1a"
    return Splice(head * depth + b"\x00")


def rle_bomb(total: int, byte: int = 0, *, content_size: bool = True) -> bytes:
    """A zstd frame of RLE blocks regenerating ``total`` bytes of ``byte``: 4 bytes per
    128 KiB, so 1 GiB costs 32 KiB on the wire."""
    block = 128 * 1024
    assert total % block == 0
    out = bytearray(b"\x28\xb5\x2f\xfd")  # magic
    if content_size:
        out += bytes([0x80, 0x38]) + struct.pack("<I", total)  # 4-byte size, 128 KiB window
    else:
        out += bytes([0x00, 0x38])
    n = total // block
    for i in range(n):
        header = (block << 3) | (1 << 1) | (i == n - 1)  # size, type RLE, last block
        out += struct.pack("<I", header)[:3] + bytes([byte])
    return bytes(out)


SEED_PUSH = pack(push(first=1, rows=[row(1), row(2)]))
NEXT_PUSH = pack(push())  # valid (seq 3): what the rejected cases break

# -- setup --------------------------------------------------------------------------------------


def setup_cases() -> None:
    CASES.append(
        Case(
            "setup",
            "seed-push",
            "node-a pushes seqs 1..2 of lane 2 (state for every case after it)",
            SEED_PUSH,
            200,
            "",
            acked=2,
            mutates=True,
        )
    )


# -- msgpack ------------------------------------------------------------------------------------


def msgpack_cases() -> None:
    c = "msgpack"
    n = len(NEXT_PUSH)
    for cut in sorted({*range(12), *range(12, n, max(1, n // 18))}):
        add(
            c,
            f"truncated-at-{cut:03d}",
            f"a valid push cut after {cut} of {n} bytes",
            NEXT_PUSH[:cut],
            "malformed_body",
        )
    z = zstd(NEXT_PUSH + b"\x00" * 400)  # long enough to compress
    for cut in (4, 8, len(z) // 2, len(z) - 1):
        add(
            c,
            f"truncated-zstd-at-{cut:03d}",
            f"a zstd frame cut after {cut} of {len(z)} bytes",
            z[:cut],
            "malformed_body",
            headers={"Content-Encoding": "zstd"},
        )
    # 0xc1: the one byte msgpack never uses.
    add(c, "c1-alone", "the body is the reserved byte 0xc1", b"\xc1", "malformed_body")
    add(c, "c1-run", "1,000 reserved bytes", b"\xc1" * 1000, "malformed_body")
    add(c, "c1-first", "0xc1 in place of the map header", b"\xc1" + NEXT_PUSH[1:], "malformed_body")
    for name in ("v", "node", "lane", "first", "last", "skipped", "cells", "colls", "changes"):
        msg = push()
        msg[name] = Splice(b"\xc1")
        add(c, f"c1-as-{name}", f"0xc1 as the value of {name!r}", packed(msg), "malformed_body")
    for i, what in enumerate(("cell index", "collection index", "key", "stamp", "fields", "base")):
        msg = push()
        msg["changes"][0][i] = Splice(b"\xc1")
        add(
            c, f"c1-in-change-{i}", f"0xc1 as the {what} of a change", packed(msg), "malformed_body"
        )
    msg = push(rows=[row(3, fields={"v": Splice(b"\xc1")})])
    add(c, "c1-in-value", "0xc1 as a field value", packed(msg), "malformed_body")
    # Trailing bytes.
    for slug, tail in [
        ("nul", b"\x00"),
        ("c1", b"\xc1"),
        ("empty-array", b"\x90"),
        ("newline", b"\n"),
        ("second-message", NEXT_PUSH),
        ("random-kib", random.Random(14).randbytes(1024)),
    ]:
        add(
            c,
            f"trailing-{slug}",
            f"a valid push followed by {slug} bytes",
            NEXT_PUSH + tail,
            "malformed_body",
        )
    # Nesting.
    for kind in ("array", "map"):
        add(
            c, f"nested-10000-{kind}s", f"10,000 nested {kind}s", deep(10_000, kind).raw, "too_deep"
        )
    msg = push(rows=[row(3, fields={"v": deep(10_000)})])
    add(c, "nested-10000-in-value", "a field value nested 10,000 deep", packed(msg), "too_deep")
    add(
        c,
        "nested-1023-arrays",
        "1,023 nested arrays (within msgpack's stack, not a map)",
        deep(1023).raw,
        "malformed_body",
    )
    deep_at = {
        "v": "unsupported_version",
        "node": "invalid_node_id",
        "lane": "invalid_value",
        "first": "invalid_value",
        "last": "invalid_value",
        "skipped": "invalid_seq",
        "changes": "invalid_value",
    }
    for name, code in deep_at.items():
        msg = push()
        msg[name] = deep(1000)
        add(
            c,
            f"nested-1000-as-{name}",
            f"{name!r} is an array nested 1,000 deep",
            packed(msg),
            code,
        )
    for slug, target, code in [
        ("cell", "cells", "invalid_value"),
        ("collection", "colls", "invalid_collection"),
    ]:
        msg = push()
        msg[target] = [deep(1000)]
        add(
            c,
            f"nested-1000-as-{slug}",
            f"the {slug} table entry is nested 1,000 deep",
            packed(msg),
            code,
        )
    for i, (what, code) in enumerate(
        [
            ("cell index", "invalid_value"),
            ("collection index", "invalid_value"),
            ("key", "invalid_key"),
            ("stamp", "invalid_hlc"),
            ("fields", "invalid_value"),
            ("base", "invalid_value"),
        ]
    ):
        msg = push()
        msg["changes"][0][i] = deep(1000)
        add(
            c,
            f"nested-1000-as-change-{i}",
            f"the {what} of a change is nested 1,000 deep",
            packed(msg),
            code,
        )
    msg = push(colls=["stock"], rows=[row(3, fields={"n": deep(1000)})])
    add(
        c,
        "nested-1000-counter-value",
        "a counter increment nested 1,000 deep",
        packed(msg),
        "invalid_value",
    )
    for depth in (17, 100):
        msg = push(rows=[row(3, fields={"v": deep(depth)})])
        add(
            c,
            f"nested-{depth}-value",
            f"a field value nested {depth} deep (limit 16)",
            packed(msg),
            "invalid_value",
        )
    # Declared lengths far beyond the data (and beyond the limits). Arrays and maps are
    # judged by their header; msgpack judges a string or binary only once its bytes are all
    # there, so one declaring 4 GiB in a short body is a truncated body (never an allocation:
    # the size-limit refusal of a string whose bytes did arrive is in "size").
    declared = [
        ("array32-4g", b"\xdd\xff\xff\xff\xff", "item_limit_exceeded", "array32 of 2^32-1 items"),
        ("map32-4g", b"\xdf\xff\xff\xff\xff", "item_limit_exceeded", "map32 of 2^32-1 pairs"),
        (
            "array32-over-limit",
            b"\xdd" + struct.pack(">I", MAX_ITEMS + 1),
            "item_limit_exceeded",
            "array32 one item over the limit",
        ),
        (
            "map32-over-limit",
            b"\xdf" + struct.pack(">I", MAX_ITEMS + 1),
            "item_limit_exceeded",
            "map32 one pair over the limit",
        ),
        ("str32-4g", b"\xdb\xff\xff\xff\xff", "malformed_body", "str32 of 4 GiB"),
        (
            "str32-over-limit",
            b"\xdb" + struct.pack(">I", MAX_STR + 1),
            "malformed_body",
            "str32 one byte over the limit",
        ),
        ("bin32-4g", b"\xc6\xff\xff\xff\xff", "malformed_body", "bin32 of 4 GiB"),
        ("ext32-4g", b"\xc9\xff\xff\xff\xff\x01", "malformed_body", "ext32 of 4 GiB"),
        (
            "array32-at-limit-empty",
            b"\xdd" + struct.pack(">I", MAX_ITEMS),
            "malformed_body",
            "array32 at the item limit with no items",
        ),
        (
            "str32-at-limit-empty",
            b"\xdb" + struct.pack(">I", MAX_STR),
            "malformed_body",
            "str32 at the size limit with no bytes",
        ),
        ("array16-empty", b"\xdc\xff\xff", "malformed_body", "array16 of 65,535 with no items"),
        ("map16-empty", b"\xde\xff\xff", "malformed_body", "map16 of 65,535 with no pairs"),
    ]
    for slug, raw, code, what in declared:
        add(c, f"declared-{slug}-top", f"the body is {what}", raw, code)
        msg = push()
        msg["changes"] = Splice(raw)
        add(c, f"declared-{slug}-in-changes", f"'changes' is {what}", packed(msg), code)
    for slug, raw, code, what in declared[4:8]:
        msg = push(rows=[row(3, fields={"v": Splice(raw)})])
        add(c, f"declared-{slug}-in-value", f"a field value is {what}", packed(msg), code)
    # Extension types (timestamps included): never accepted.
    exts = [
        ("fixext1", b"\xd4\x01\x00"),
        ("fixext2", b"\xd5\x02\x00\x00"),
        ("fixext4", b"\xd6\x05" + b"\x00" * 4),
        ("fixext8", b"\xd7\x7f" + b"\x00" * 8),
        ("fixext16", b"\xd8\x80" + b"\x00" * 16),
        ("ext8", b"\xc7\x03\x01abc"),
        ("ext16", b"\xc8\x00\x03\x01abc"),
        ("ext32", b"\xc9\x00\x00\x00\x03\x01abc"),
        ("timestamp32", b"\xd6\xff" + struct.pack(">I", 1_767_225_600)),
        ("timestamp64", b"\xd7\xff" + struct.pack(">Q", 1_767_225_600)),
        ("timestamp96", b"\xc7\x0c\xff" + struct.pack(">Iq", 0, 1_767_225_600)),
    ]
    for slug, raw in exts:
        add(c, f"ext-{slug}-top", f"the body is an {slug} extension", raw, "malformed_body")
        msg = push(rows=[row(3, fields={"v": Splice(raw)})])
        add(
            c,
            f"ext-{slug}-in-value",
            f"a field value is an {slug} extension",
            packed(msg),
            "malformed_body",
        )
    for name in ("first", "node"):
        msg = push()
        msg[name] = Splice(exts[8][1])
        add(
            c,
            f"ext-timestamp-as-{name}",
            f"{name!r} is a msgpack timestamp",
            packed(msg),
            "malformed_body",
        )
    # Non-string map keys.
    keys = [
        ("int", 1),
        ("negative-int", -1),
        ("nil", None),
        ("true", True),
        ("float", 1.5),
        ("bin", b"v"),
    ]
    for slug, key in keys:
        msg = push()
        msg[key] = 1
        add(c, f"key-{slug}-top", f"the push has a {slug} map key", pack(msg), "unknown_field")
        msg = push(rows=[row(3, fields={key: 1})])
        add(
            c, f"key-{slug}-in-fields", f"a field name is a {slug}", pack(msg), "invalid_field_name"
        )
    for slug, raw in [("array", b"\x91\x01"), ("map", b"\x80")]:
        add(
            c,
            f"key-{slug}-top",
            f"a map keyed by an {slug} (unhashable)",
            b"\x81" + raw + b"\x01",
            "malformed_body",
        )
        msg = push(rows=[row(3, fields={"v": Splice(b"\x81" + raw + b"\x01")})])
        add(
            c,
            f"key-{slug}-in-value",
            f"a field value is a map keyed by an {slug}",
            packed(msg),
            "malformed_body",
        )
    msg = push(rows=[row(3, base={1: 5})])
    add(c, "key-int-in-base", "a base map keyed by an int", pack(msg), "invalid_value")
    msg = push(rows=[row(3, fields={"v": {2: "x"}})])
    add(c, "key-int-in-value", "a field value is a map keyed by an int", pack(msg), "invalid_value")
    # Not a map at all.
    for slug, obj in [
        ("nil", None),
        ("true", True),
        ("int", 3),
        ("float", 3.5),
        ("str", "push"),
        ("bin", b"push"),
        ("array", [push()]),
        ("empty-array", []),
    ]:
        add(c, f"not-a-map-{slug}", f"the body is a msgpack {slug}", pack(obj), "malformed_body")
    add(c, "empty-map", "the body is an empty map", pack({}), "missing_field")
    add(c, "empty-body", "no body at all", b"", "malformed_body")
    # Duplicate keys: the last one counts, and it is bad.
    dup = NEXT_PUSH.replace(b"\xa4lane\x02", b"\xa4lane\x02\xa4lane\x09")
    dup = b"\x8a" + dup[1:]  # one more pair in the map header
    add(
        c,
        "duplicate-key-last-bad",
        "'lane' given twice, the second time out of range",
        dup,
        "invalid_value",
    )


# -- size ---------------------------------------------------------------------------------------


def size_cases() -> None:
    c = "size"
    over = b"\x00" * (MAX_BODY + 1)
    add(c, "body-over-limit", "a body one byte over the 8 MiB limit", over, "body_too_large")
    add(
        c,
        "body-over-limit-chunked",
        "the same body sent chunked (no Content-Length)",
        over,
        "body_too_large",
        chunked=True,
    )
    add(
        c,
        "body-over-limit-zstd",
        "an over-limit body labelled zstd (refused before inflating)",
        over,
        "body_too_large",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-bomb-1gib",
        "32 KiB of zstd RLE blocks inflating to 1 GiB of zeros",
        rle_bomb(1 << 30),
        "decompressed_too_large",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-bomb-1gib-no-size",
        "the 1 GiB bomb without a declared content size",
        rle_bomb(1 << 30, content_size=False),
        "decompressed_too_large",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-bomb-1gib-nesting",
        "a bomb inflating to 1 GiB of 0x91 (array headers)",
        rle_bomb(1 << 30, 0x91),
        "decompressed_too_large",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-bomb-just-over-cap",
        "a bomb inflating to the 64 MiB cap plus 128 KiB",
        rle_bomb((64 << 20) + (128 << 10)),
        "decompressed_too_large",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-two-frames",
        "a valid zstd push followed by a second frame",
        zstd(NEXT_PUSH) + zstd(NEXT_PUSH),
        "malformed_body",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "zstd-unlabelled",
        "a zstd push without Content-Encoding",
        zstd(NEXT_PUSH),
        "malformed_body",
    )
    add(
        c,
        "zstd-label-on-plain",
        "Content-Encoding zstd on a plain msgpack body",
        NEXT_PUSH,
        "malformed_body",
        headers={"Content-Encoding": "zstd"},
    )
    for enc in ("gzip", "br", "deflate", "ZSTD", "zstd, gzip", "x-zstd"):
        add(
            c,
            "encoding-" + re.sub(r"[^a-z0-9]+", "-", enc.lower()),
            f"Content-Encoding {enc!r}",
            NEXT_PUSH,
            "unsupported_encoding",
            headers={"Content-Encoding": enc},
        )
    for n in (1001, 5001):
        msg = push(rows=[row(3 + i) for i in range(n)])
        add(
            c,
            f"batch-{n}-changes",
            f"a batch of {n} changes (limit 1,000)",
            pack(msg),
            "batch_too_large",
        )
    big = "x" * (MAX_STR + 1)
    add(
        c,
        "value-str-over-limit",
        "one field value of 4 MiB + 1 bytes",
        pack(push(rows=[row(3, fields={"v": big})])),
        "item_limit_exceeded",
    )
    add(
        c,
        "value-bin-over-limit",
        "one binary field value of 4 MiB + 1 bytes",
        pack(push(rows=[row(3, fields={"v": big.encode()})])),
        "item_limit_exceeded",
    )
    add(
        c,
        "value-str-over-limit-zstd",
        "the 4 MiB + 1 value, zstd-compressed",
        zstd(pack(push(rows=[row(3, fields={"v": big})]))),
        "item_limit_exceeded",
        headers={"Content-Encoding": "zstd"},
    )
    add(
        c,
        "key-513",
        "a key of 513 characters (limit 512)",
        pack(push(rows=[row(3, key="k" * 513)])),
        "key_too_long",
    )
    add(
        c,
        "field-name-257",
        "a field name of 257 characters (limit 256)",
        pack(push(rows=[row(3, fields={"f" * 257: 1})])),
        "invalid_field_name",
    )
    add(
        c,
        "collection-65",
        "a collection name of 65 characters (limit 64)",
        pack(push(colls=["c" * 65])),
        "invalid_collection",
    )
    add(
        c,
        "cell-256",
        "a cell id of 256 characters (limit 255)",
        pack(push(cells=["west/" + "/".join(["a" * 62] * 4)])),
        "invalid_cell",
    )
    add(
        c,
        "node-id-65",
        "a node id of 65 characters (limit 64)",
        pack(push(node="n" * 65)),
        "invalid_node_id",
    )
    msg = push()
    msg["skipped"] = Splice(b"\xdd" + struct.pack(">I", MAX_ITEMS + 1) + b"\x04" * (MAX_ITEMS + 1))
    add(
        c,
        "skipped-200001",
        "'skipped' with 200,001 seqs (over the item limit)",
        packed(msg),
        "item_limit_exceeded",
    )


# -- types --------------------------------------------------------------------------------------

NAN = float("nan")
BAD_VALUES: list[tuple[str, Any]] = [
    ("str", "1"),
    ("float", 1.0),
    ("negative", -1),
    ("zero", 0),
    ("true", True),
    ("nil", None),
    ("uint64-max", 2**64 - 1),
    ("int64-min", -(2**63)),
    ("array", [1]),
    ("map", {"a": 1}),
    ("bin", b"\x01"),
    ("nan", NAN),
    ("inf", math.inf),
]


def top_level_expected(name: str, slug: str, value: Any) -> str | None:
    """The code for ``push()[name] = value`` (None: the value happens to be valid)."""
    if name == "v":
        return "unsupported_version"
    if name == "node":
        # "1" is a well-formed node id, just not the token's.
        return "node_mismatch" if value == "1" else "invalid_node_id"
    if name in ("lane", "first", "last"):
        ok_int = type(value) is int
        if name == "lane" and ok_int and 0 <= value <= 3:
            return None if value == 2 else "invalid_seq_or_gap"
        return "invalid_value"
    if name == "skipped":
        return "invalid_value" if not isinstance(value, list) else "invalid_seq"
    if name == "colls" and isinstance(value, list):
        return "invalid_collection"
    return "invalid_value"  # cells, colls, changes


def types_cases() -> None:
    c = "types"
    for name in ("v", "node", "lane", "first", "last", "skipped", "cells", "colls", "changes"):
        for slug, value in BAD_VALUES:
            code = top_level_expected(name, slug, value)
            if code == "invalid_seq_or_gap":
                continue  # lane 0 (zero): a valid lane of another queue; not a bad input
            assert code is not None
            msg = push()
            msg[name] = value
            add(
                c,
                f"{name}-as-{slug}",
                f"{name!r} is {value!r:.30}",
                pack(msg),
                code,
                headers={"Accept": "application/msgpack"} if len(CASES) % 3 == 0 else {},
            )
    row_codes = {0: "invalid_value", 1: "invalid_value", 2: "invalid_key", 3: "invalid_hlc"}
    for i, what in ((0, "cell index"), (1, "collection index"), (2, "key"), (3, "stamp")):
        for slug, value in BAD_VALUES:
            if i == 3 and slug == "uint64-max":
                continue  # below, as an HLC over 2^63
            if (i in (0, 1) and slug == "zero") or (i == 2 and slug == "str"):
                continue  # index 0 and key "1" are valid
            msg = push()
            msg["changes"][0][i] = value
            add(
                c,
                f"change-{i}-{what.replace(' ', '-')}-as-{slug}",
                f"a change's {what} is {value!r:.30}",
                pack(msg),
                row_codes[i],
            )
    for slug, idx in (("cell-index-1", 0), ("collection-index-1", 1)):
        msg = push()
        msg["changes"][0][idx] = 1
        add(
            c,
            f"change-{slug}-out-of-range",
            f"a change's {slug} (tables hold one entry)",
            pack(msg),
            "invalid_value",
        )
    for slug, fields, code in [
        ("str", "x", "invalid_value"),
        ("int", 1, "invalid_value"),
        ("array", [1], "invalid_value"),
        ("true", True, "invalid_value"),
        ("bin", b"x", "invalid_value"),
        ("empty-map", {}, "empty_put"),
        ("empty-name", {"": 1}, "invalid_field_name"),
        ("bin-value", {"v": b"x"}, "unencodable_value"),
        ("nan-value", {"v": NAN}, "invalid_value"),
        ("inf-value", {"v": math.inf}, "invalid_value"),
        ("minus-inf-value", {"v": -math.inf}, "invalid_value"),
        ("uint64-value", {"v": 2**64 - 1}, "invalid_value"),
        ("nested-nan", {"v": [1, {"x": NAN}]}, "invalid_value"),
    ]:
        msg = push(rows=[row(3, fields=fields)])
        add(c, f"fields-{slug}", f"a change's fields are {fields!r:.30}", pack(msg), code)
    for slug, base in [
        ("str", "x"),
        ("array", [1]),
        ("str-stamp", {"v": "1"}),
        ("negative-stamp", {"v": -1}),
        ("bool-stamp", {"v": True}),
        ("float-stamp", {"v": 1.0}),
        ("huge-stamp", {"v": 2**63}),
    ]:
        msg = push(rows=[row(3, base=base)])
        add(c, f"base-{slug}", f"a change's base is {base!r:.30}", pack(msg), "invalid_value")
    for slug, r in [
        ("5-items", [0, 0, "k3", T0 + 3, {"v": 3}]),
        ("7-items", [0, 0, "k3", T0 + 3, {"v": 3}, None, None]),
        ("map", {"cell": 0}),
        ("str", "change"),
        ("nil", None),
        ("empty", []),
    ]:
        add(
            c,
            f"change-shape-{slug}",
            f"a change is {r!r:.30}",
            pack(raw_push([r])),
            "invalid_value",
        )
    # Stamps (HLCs): negative, zero, over 2^63, beyond 2^64, NaN.
    for slug, rows, code in [
        ("negative", [[0, 0, "k3", -5, {"v": 3}, None]], "invalid_hlc"),
        ("zero", [[0, 0, "k3", 0, {"v": 3}, None]], "invalid_hlc"),
        ("2p63", [[0, 0, "k3", 2**63, {"v": 3}, None]], "invalid_hlc"),
        ("uint64-max", [[0, 0, "k3", 2**64 - 1, {"v": 3}, None]], "invalid_hlc"),
        ("nan", [[0, 0, "k3", NAN, {"v": 3}, None]], "invalid_hlc"),
        ("float", [[0, 0, "k3", float(T0), {"v": 3}, None]], "invalid_hlc"),
        (
            "second-goes-negative",
            [[0, 0, "k3", T0, {"v": 3}, None], [0, 0, "k4", -T0 - 1, {"v": 4}, None]],
            "invalid_hlc",
        ),
        (
            "second-over-2p63",
            [[0, 0, "k3", T0, {"v": 3}, None], [0, 0, "k4", MAX_HLC, {"v": 4}, None]],
            "invalid_hlc",
        ),
        ("max-hlc", [[0, 0, "k3", MAX_HLC, {"v": 3}, None]], "clock_drift"),
    ]:
        add(c, f"hlc-{slug}", f"a stamp: {slug}", pack(raw_push(rows)), code)
    # Missing and unknown fields.
    for name in ("v", "node", "lane", "first", "last", "cells", "colls", "changes"):
        msg = push()
        del msg[name]
        add(c, f"missing-{name}", f"the push lacks {name!r}", pack(msg), "missing_field")
    for slug, key in [
        ("extra", "extra"),
        ("case", "Node"),
        ("empty", ""),
        ("space", "v "),
        ("seq", "seq"),
        ("token", "token"),
    ]:
        msg = push()
        msg[key] = 1
        add(
            c,
            f"unknown-{slug}",
            f"the push has an unknown field {key!r}",
            pack(msg),
            "unknown_field",
        )
    msg = push()
    msg.update({f"x{i}": i for i in range(200)})
    add(c, "unknown-200", "the push has 200 unknown fields", pack(msg), "unknown_field")
    # The counter collection takes integer increments only.
    for slug, value in [
        ("str", "five"),
        ("float", 1.5),
        ("true", True),
        ("nil", None),
        ("list", [1]),
    ]:
        msg = push(colls=["stock"], rows=[row(3, fields={"n": value})])
        add(c, f"counter-{slug}", f"a counter increment is {value!r}", pack(msg), "invalid_value")
    # Query parameters of the read routes.
    pulls = [
        ("tier=bogus", "invalid_tier"),
        ("tier=", "invalid_tier"),
        ("tier=CRITICAL", "invalid_tier"),
        ("limit=0", "invalid_param"),
        ("limit=5001", "invalid_param"),
        ("limit=abc", "invalid_param"),
        ("limit=1e3", "invalid_param"),
        ("limit=-1", "invalid_param"),
        ("after=-1", "invalid_param"),
        ("after=9223372036854775808", "invalid_param"),
        ("after=1.5", "invalid_param"),
        ("wait=-1", "invalid_param"),
        ("wait=nan", "invalid_param"),
        ("wait=inf", "invalid_param"),
        ("wait=901", "invalid_param"),
        ("watch=bogus:1", "invalid_tier"),
        ("watch=critical:x", "invalid_param"),
        ("watch=critical:-1", "invalid_param"),
        ("watch=critical", "invalid_param"),
    ]
    for q, code in pulls:
        add(
            c,
            f"pull-{q.replace('=', '-').replace(':', '-')}",
            f"GET /v1/pull with {q}",
            b"",
            code,
            method="GET",
            path="/v1/pull",
            query=f"prefix={quote(CELL, safe='')}&{q}",
        )
    add(
        c,
        "snapshot-limit-0",
        "GET /v1/snapshot with limit=0",
        b"",
        "invalid_param",
        method="GET",
        path="/v1/snapshot",
        query=f"prefix={quote(CELL, safe='')}&limit=0",
    )
    add(
        c,
        "conflicts-limit-abc",
        "GET /v1/conflicts with limit=abc",
        b"",
        "invalid_param",
        method="GET",
        path="/v1/conflicts",
        query="limit=abc",
    )
    records = "/v1/records", f"cell={quote(CELL, safe='')}&collection=visits"
    add(
        c,
        "records-no-key",
        "GET /v1/records with no key",
        b"",
        "invalid_value",
        method="GET",
        path=records[0],
        query=records[1],
    )
    add(
        c,
        "records-501-keys",
        "GET /v1/records with 501 keys",
        b"",
        "invalid_value",
        method="GET",
        path=records[0],
        query=records[1] + "".join(f"&key=k{i}" for i in range(501)),
    )
    add(
        c,
        "records-bad-collection",
        "GET /v1/records with collection 'a b'",
        b"",
        "invalid_collection",
        method="GET",
        path=records[0],
        query=f"cell={quote(CELL, safe='')}&collection=a%20b&key=k1",
    )
    add(
        c,
        "records-nul-key",
        "GET /v1/records with a NUL in the key",
        b"",
        "invalid_key",
        method="GET",
        path=records[0],
        query=records[1] + "&key=a%00b",
    )
    # Routes and methods that do not exist: aiohttp's own page, on purpose without the hub's
    # error shape (an edge reads a 4xx without it as "not a hub", never as a rejection).
    add(c, "route-unknown", "POST /v1/nope", NEXT_PUSH, "", status=404, path="/v1/nope")
    add(c, "method-get-push", "GET /v1/push", b"", "", status=405, method="GET")
    add(c, "method-post-pull", "POST /v1/pull", NEXT_PUSH, "", status=405, path="/v1/pull")


# -- text ---------------------------------------------------------------------------------------

#: node-t's last seq: its accepted pushes follow one another.
_text_seq = 0


def accepted(slug: str, what: str, *, key: str, fields: dict[str, Any]) -> None:
    """A push of node-t that the hub must take, and give back byte-identical in a pull."""
    global _text_seq
    _text_seq += 1
    seq = _text_seq
    msg = push(
        node="node-t",
        first=seq,
        cells=[TEXT_CELL],
        colls=["notes"],
        rows=[row(seq, key=key, hlc=T0 + 1000 + seq, fields=fields)],
    )
    CASES.append(
        Case(
            "text",
            slug,
            what,
            pack(msg),
            200,
            "",
            auth="node-t",
            acked=seq,
            mutates=True,
            roundtrip=True,
        )
    )


BAD_UTF8 = [
    ("lone-continuation", b"\x80"),
    ("overlong-slash", b"\xc0\xaf"),
    ("truncated-euro", b"\xe2\x82"),
    ("surrogate-d800", b"\xed\xa0\x80"),
    ("surrogate-dfff", b"\xed\xbf\xbf"),
    ("beyond-10ffff", b"\xf4\x90\x80\x80"),
    ("byte-ff", b"\xff"),
    ("byte-fe", b"\xfe"),
    ("c1", b"\xc1\xbf"),
    ("surrogate-pair-cesu", b"\xed\xa0\xbd\xed\xb8\x80"),
]

ODD_TEXT = {
    "sql-drop": "'; DROP TABLE records;--",
    "sql-dollar-1": "$1",
    "sql-dollar-quote": "$$; DROP TABLE feed; $$",
    "sql-or": "' OR '1'='1",
    "sql-comment": "/* */ SELECT pg_sleep(10); --",
    "sql-backslash-x00": "\\x00",
    "sql-e-string": "E'\\\\x00'",
    "sql-nul": "\x00",
    "sql-nul-inside": "a\x00b",
    "percent-s": "%s %d %n",
    "template": "{{7*7}} ${7*7}",
    "quotes": "\"'`",
    "backslashes": "\\\\\\",
    "json-escape": "\\u0000 \\ud800",
    "null-word": "null",
    "rtl-override": "\u202eevil.exe\u202c",
    "combining": "e\u0301 a\u0308 n\u0303",
    "zalgo": "z" + "\u0336\u0301\u0308\u0316\u0317" * 40,
    "emoji": "\U0001f600",
    "zwj-family": "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "flag": "\U0001f1f3\U0001f1ec",
    "bom": "\ufeffbom",
    "noncharacter": "\uffff\U0010ffff",
    "line-separator": "a\u2028b\u2029c",
    "del-and-c1": "\x7f\x85\x9f",
    "newlines": "a\r\nb\nc\rd\te",
    "mixed-scripts": "Lagos \u0644\u0627\u063a\u0648\u0633 \u62c9\u5404\u65af \u03bb",
    "empty": "",
}

#: Text that is fine as a record key too (no control characters).
KEY_OK = [k for k, v in ODD_TEXT.items() if v and not any(ord(ch) < 0x20 for ch in v)]

BIG_TEXT = {
    "1mb-ascii": "x" * 1_000_000,
    "1mb-emoji": "\U0001f600" * 250_000,
    "1mb-two-byte": "\u00e9" * 500_000,
    "1mb-combining": "a\u0301" * 333_333,
}


def text_cases() -> None:
    c = "text"
    for slug, raw in BAD_UTF8:
        bad = Splice(bytes([0xA0 | (2 + len(raw))]) + b"ab" + raw)  # fixstr "ab" + raw
        msg = push(rows=[row(3, fields={"v": bad})])
        add(
            c,
            f"bad-utf8-{slug}-value",
            f"a field value holds invalid UTF-8 ({slug})",
            packed(msg),
            "invalid_utf8",
        )
        msg = push(rows=[row(3, key=Splice(bad.raw))])
        add(
            c,
            f"bad-utf8-{slug}-key",
            f"a key holds invalid UTF-8 ({slug})",
            packed(msg),
            "invalid_utf8",
        )
    raw = bytes([0xA0 | 3]) + b"ab\xff"
    for slug, place in [("node", "node"), ("cell", "cells"), ("collection", "colls")]:
        msg = push()
        msg[place] = Splice(raw) if place == "node" else [Splice(raw)]
        add(c, f"bad-utf8-{slug}", f"the {slug} holds invalid UTF-8", packed(msg), "invalid_utf8")
    msg = push(rows=[row(3, fields={Splice(raw): 1})])
    add(c, "bad-utf8-field-name", "a field name holds invalid UTF-8", packed(msg), "invalid_utf8")
    msg = push()
    msg[Splice(raw)] = 1
    add(c, "bad-utf8-top-key", "a top-level key holds invalid UTF-8", packed(msg), "invalid_utf8")
    # Odd text where identifiers belong.
    for slug, s, where, code in [
        ("nul-key", "k\x00", "key", "invalid_key"),
        ("newline-key", "k\n", "key", "invalid_key"),
        ("tab-key", "\tk", "key", "invalid_key"),
        ("esc-key", "\x1b[31m", "key", "invalid_key"),
        ("nul-cell", CELL + "\x00", "cell", "invalid_cell"),
        ("rtl-cell", "west/ng/\u202elagos", "cell", "invalid_cell"),
        ("combining-cell", "west/ng/lago\u0301s", "cell", "invalid_cell"),
        ("emoji-cell", "west/ng/\U0001f600", "cell", "invalid_cell"),
        ("fullwidth-cell", "\uff57est/ng/lagos", "cell", "invalid_cell"),
        ("nul-collection", "visits\x00", "coll", "invalid_collection"),
        ("emoji-collection", "visits\U0001f600", "coll", "invalid_collection"),
        ("rtl-collection", "\u202evisits", "coll", "invalid_collection"),
        ("nul-node", "node-a\x00", "node", "invalid_node_id"),
        ("rtl-node", "node-\u202ea", "node", "invalid_node_id"),
        ("emoji-node", "node-\U0001f600", "node", "invalid_node_id"),
        ("1mb-key", "k" * 1_000_000, "key", "key_too_long"),
        ("1mb-field-name", "f" * 1_000_000, "field", "invalid_field_name"),
        ("1mb-cell", "west/" + "a" * 1_000_000, "cell", "invalid_cell"),
        ("1mb-collection", "c" * 1_000_000, "coll", "invalid_collection"),
        ("1mb-node", "n" * 1_000_000, "node", "invalid_node_id"),
    ]:
        if where == "key":
            msg = push(rows=[row(3, key=s)])
        elif where == "field":
            msg = push(rows=[row(3, fields={s: 1})])
        elif where == "cell":
            msg = push(cells=[s])
        elif where == "coll":
            msg = push(colls=[s])
        else:
            msg = push(node=s)
        add(c, slug, f"{where} {s!r:.40}", pack(msg), code)
    # Accepted: odd and SQL-ish text stored verbatim, read back byte-identical from a pull.
    for slug, s in ODD_TEXT.items():
        accepted(
            f"verbatim-value-{slug}",
            f"a value {s!r:.40} comes back byte-identical",
            key=f"value-{slug}",
            fields={"v": s, "w": [s, {"x": s}]},
        )
    for slug in KEY_OK:
        s = ODD_TEXT[slug]
        accepted(
            f"verbatim-key-{slug}",
            f"a key and a field name {s!r:.40} come back as sent",
            key=s,
            fields={s: slug},
        )
    accepted(
        "verbatim-numbers",
        "integer and float edge values come back as sent",
        key="numbers",
        fields={
            "min": -(2**63),
            "max": 2**63 - 1,
            "big": 1e308,
            "tiny": 5e-324,
            "negzero": -0.0,
            "t": True,
            "n": None,
        },
    )
    accepted(
        "verbatim-nul-field-name",
        "a field name holding NUL comes back as sent",
        key="nul-field-name",
        fields={"a\x00b": 1},
    )


def big_text_cases() -> None:
    """Last: every case after these would checksum megabytes of stored text."""
    for slug, s in BIG_TEXT.items():
        accepted(
            f"verbatim-{slug}",
            f"a {slug} string value comes back byte-identical",
            key=f"big-{slug}",
            fields={"v": s},
        )


# -- cells --------------------------------------------------------------------------------------

INVALID_CELLS = [
    "west/ng/../lagos",
    "west/ng/./lagos",
    "west/..",
    "west//ng",
    "west/ng/",
    "west/ng//",
    "/west/ng",
    "West/ng/lagos",
    "WEST/ng",
    "west/NG/lagos",
    "mars/ng/lagos",
    "westeros/x",
    "west",
    "",
    "west/ng lagos",
    "west/ng\tlagos",
    "west\\ng\\lagos",
    "west/ng/lagos/clinic.12",
    "west/ng/lagos/cl\u00ednica",
    "west/%2e%2e/x",
    "west/ng/lagos/" + "a" * 65,
    "/".join(["west"] + ["s"] * 16),
    "west/ng/lagos/clinic-12 ",
    " west/ng",
    "west\u2215ng",
]
FOREIGN = [
    "east/ke/nairobi/shop-1",
    "central/cd/kinshasa/school-2",
    "southern/za/durban/x",
    "north/eg/cairo/y",
]
UNGRANTED = [
    "west/gh/accra/school-3",
    "west/ng/lagosx/clinic-1",
    "west/ng",
    "west/ng/abuja/clinic-9",
]


def cells_cases() -> None:
    c = "cells"
    for i, cell in enumerate(INVALID_CELLS):
        add(
            c,
            f"push-invalid-{i:02d}",
            f"a push to cell {cell!r:.40}",
            pack(push(cells=[cell])),
            "invalid_cell",
        )
    msg = push(cells=[CELL, "west/ng/../x"])
    add(
        c,
        "push-invalid-unused",
        "an invalid cell in the table, not used by any change",
        pack(msg),
        "invalid_cell",
    )
    for cell in FOREIGN:
        add(
            c,
            f"push-foreign-{cell.split('/')[0]}",
            f"a push to {cell} at the west hub",
            pack(push(cells=[cell])),
            "foreign_region",
        )
    for i, cell in enumerate(UNGRANTED):
        add(
            c,
            f"push-ungranted-{i}",
            f"a push to {cell}, outside node-a's grant",
            pack(push(cells=[cell])),
            "not_granted",
        )
    mixed = push(cells=[CELL, FOREIGN[0]], rows=[row(3), row(4, cell_i=1)])
    add(
        c,
        "push-second-change-foreign",
        "a batch whose second change is of another region",
        pack(mixed),
        "foreign_region",
    )
    mixed = push(cells=[CELL, UNGRANTED[0]], rows=[row(3), row(4, cell_i=1)])
    add(
        c,
        "push-second-change-ungranted",
        "a batch whose second change is outside the grant",
        pack(mixed),
        "not_granted",
    )
    for route in ("pull", "snapshot"):
        for i, cell in enumerate(INVALID_CELLS[:12]):
            add(
                c,
                f"{route}-invalid-{i:02d}",
                f"GET /v1/{route} of prefix {cell!r:.40}",
                b"",
                "invalid_cell",
                method="GET",
                path=f"/v1/{route}",
                query=f"prefix={quote(cell, safe='')}",
            )
        for cell in FOREIGN[:2] + UNGRANTED[:2]:
            code = "foreign_region" if cell in FOREIGN else "not_granted"
            add(
                c,
                f"{route}-{code}-{cell.split('/')[-1]}",
                f"GET /v1/{route} of {cell}",
                b"",
                code,
                method="GET",
                path=f"/v1/{route}",
                query=f"prefix={quote(cell, safe='')}",
            )
    add(
        c,
        "pull-second-prefix-foreign",
        "a pull of a granted and a foreign prefix",
        b"",
        "foreign_region",
        method="GET",
        path="/v1/pull",
        query=f"prefix={quote(CELL, safe='')}&prefix={quote(FOREIGN[0], safe='')}",
    )
    add(
        c,
        "pull-no-prefix",
        "a pull without prefix",
        b"",
        "missing_prefix",
        method="GET",
        path="/v1/pull",
        query="tier=standard",
    )
    add(
        c,
        "pull-prefix-bad-utf8",
        "a pull prefix of invalid UTF-8 (percent-encoded)",
        b"",
        "invalid_cell",
        method="GET",
        path="/v1/pull",
        query="prefix=west%2F%FF%FE",
    )
    add(
        c,
        "snapshot-no-prefix",
        "a snapshot without prefix",
        b"",
        "invalid_cell",
        method="GET",
        path="/v1/snapshot",
    )
    for cell, code in [
        (FOREIGN[0], "foreign_region"),
        (UNGRANTED[0], "not_granted"),
        ("west/ng/../x", "invalid_cell"),
    ]:
        add(
            c,
            f"records-{code}",
            f"GET /v1/records of {cell}",
            b"",
            code,
            method="GET",
            path="/v1/records",
            query=f"cell={quote(cell, safe='')}&collection=visits&key=k1",
        )


# -- identity -----------------------------------------------------------------------------------


def identity_cases() -> None:
    c = "identity"
    for route, method in [
        ("push", "POST"),
        ("pull", "GET"),
        ("snapshot", "GET"),
        ("records", "GET"),
        ("config", "GET"),
        ("conflicts", "GET"),
    ]:
        query = "" if method == "POST" else f"prefix={quote(CELL, safe='')}"
        if route == "records":
            query = f"cell={quote(CELL, safe='')}&collection=visits&key=k1"
        add(
            c,
            f"no-token-{route}",
            f"{method} /v1/{route} without a token",
            NEXT_PUSH if method == "POST" else b"",
            "unauthenticated",
            auth="none",
            method=method,
            path=f"/v1/{route}",
            query=query,
        )
    add(
        c,
        "empty-bearer",
        "Authorization 'Bearer ' with no token",
        NEXT_PUSH,
        "unauthenticated",
        auth="raw",
        headers={"Authorization": "Bearer "},
    )
    add(
        c,
        "basic-auth",
        "HTTP Basic credentials instead of a bearer token",
        NEXT_PUSH,
        "unauthenticated",
        auth="raw",
        headers={"Authorization": "Basic bm9kZS1hOnNlY3JldA=="},
    )
    add(
        c,
        "wrong-token",
        "a token the hub never issued",
        NEXT_PUSH,
        "invalid_token",
        auth="raw",
        headers={"Authorization": "Bearer se1_" + "A" * 43},
    )
    add(
        c,
        "long-token",
        "a 4 KiB token",
        NEXT_PUSH,
        "invalid_token",
        auth="raw",
        headers={"Authorization": "Bearer " + "t" * 4096},
    )
    add(
        c,
        "token-with-suffix",
        "node-a's token with a byte appended",
        NEXT_PUSH,
        "invalid_token",
        auth="node-a+x",
    )
    add(
        c,
        "revoked-push",
        "node-c's revoked token on a push",
        pack(push(node="node-c", first=1)),
        "revoked_token",
        auth="node-c",
    )
    add(
        c,
        "revoked-pull",
        "node-c's revoked token on a pull",
        b"",
        "revoked_token",
        auth="node-c",
        method="GET",
        path="/v1/pull",
        query=f"prefix={quote(CELL, safe='')}",
    )
    add(
        c,
        "forged-node-b",
        "node-a's token on a batch claiming node-b",
        pack(push(node="node-b", first=1, rows=[row(1)])),
        "node_mismatch",
    )
    add(
        c,
        "forged-node-a",
        "node-b's token on a batch claiming node-a",
        NEXT_PUSH,
        "node_mismatch",
        auth="node-b",
    )
    add(
        c,
        "forged-unknown-node",
        "node-a's token on a batch claiming node-z",
        pack(push(node="node-z", first=1, rows=[row(1)])),
        "node_mismatch",
    )
    # Replays: answered as the first time, nothing changes.
    CASES.append(
        Case(
            c,
            "replay-seed",
            "the seed batch again: 200, acked 2, no change",
            SEED_PUSH,
            200,
            "",
            acked=2,
        )
    )
    CASES.append(
        Case(
            c,
            "replay-seed-zstd",
            "the seed batch again, zstd: 200, acked 2",
            zstd(SEED_PUSH),
            200,
            "",
            acked=2,
            headers={"Content-Encoding": "zstd"},
        )
    )
    CASES.append(
        Case(
            c,
            "replay-first-half",
            "seq 1 alone again: 200, acked 2, no change",
            pack(push(first=1, rows=[row(1)])),
            200,
            "",
            acked=2,
        )
    )
    # Held seqs with other changes, gaps, non-monotonic ranges.
    add(
        c,
        "reuse-seq-2",
        "seqs 1..2 with other stamps than the ones held",
        pack(push(first=1, rows=[row(1, hlc=T0 + 50), row(2, hlc=T0 + 51)])),
        "seq_reused",
    )
    add(
        c,
        "overlap-reuse",
        "seqs 2..3 where seq 2 is not the change held",
        pack(push(first=2, rows=[row(2, hlc=T0 + 60), row(3)])),
        "seq_reused",
    )
    for first in (4, 1000):
        add(
            c,
            f"gap-from-{first}",
            f"a batch starting at seq {first} (hub holds up to 2)",
            pack(push(first=first, rows=[row(first)])),
            "seq_gap",
        )
    for slug, msg, code in [
        ("skipped-descending", push(first=3, rows=[row(5)], skipped=[4, 3]), "invalid_seq"),
        ("skipped-duplicate", push(first=3, rows=[row(5)], skipped=[4, 4]), "invalid_seq"),
        ("skipped-outside", push(first=3, rows=[row(3)], skipped=[9]), "invalid_seq"),
        ("skipped-bool", push(first=3, rows=[row(4)], skipped=[True]), "invalid_seq"),
        ("range-too-long", push(first=3, last=9), "invalid_seq"),
        ("range-too-short", push(first=3, rows=[row(3), row(4)], last=3), "invalid_seq"),
        ("range-backwards", push(first=5, last=3), "invalid_value"),
        ("first-zero", push(first=0, rows=[row(0)]), "invalid_value"),
        ("lane-4", push(lane=4), "invalid_value"),
    ]:
        add(c, slug, f"seq arithmetic: {slug}", pack(msg), code)
    add(
        c,
        "drift-future",
        "a change stamped in 2100",
        pack(push(rows=[row(3, hlc=FUTURE)])),
        "clock_drift",
    )
    add(
        c,
        "drift-second-change",
        "the second change of a batch stamped in 2100",
        pack(push(rows=[row(3), row(4, hlc=FUTURE)])),
        "clock_drift",
    )


# -- output -------------------------------------------------------------------------------------


def toml_str(s: str) -> str:
    """A TOML basic string, ASCII only (everything else escaped)."""
    out = []
    for ch in s:
        n = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= n < 0x7F:
            out.append(ch)
        elif 0xD800 <= n <= 0xDFFF:
            raise ValueError("TOML cannot hold a lone surrogate")
        else:
            out.append(f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}")
    return '"' + "".join(out) + '"'


def build() -> list[Case]:
    global _text_seq
    CASES.clear()
    Splice._n = 0
    _text_seq = 0
    for make in (
        setup_cases,
        msgpack_cases,
        size_cases,
        types_cases,
        text_cases,
        cells_cases,
        identity_cases,
        big_text_cases,
    ):
        make()
    return CASES


def file_name(i: int, case: Case) -> str:
    suffix = ".bin.zst" if len(case.body) > STORE_ZSTD_OVER else ".bin"
    return f"{i:03d}-{case.category}-{case.slug}{suffix}"


def render(cases: list[Case]) -> str:
    lines = [
        "# The T14 bad-input corpus: written by make_corpus.py (do not edit by hand).",
        "# One [[case]] per request, run in this order. A *.bin.zst file holds its body",
        '# zstd-compressed for storage only. error = "" means no hub error body.',
        "",
    ]
    for i, case in enumerate(cases):
        lines.append("[[case]]")
        lines.append(f"file = {toml_str(file_name(i, case))}")
        lines.append(f"category = {toml_str(case.category)}")
        lines.append(f"what = {toml_str(case.what)}")
        lines.append(f"method = {toml_str(case.method)}")
        lines.append(f"path = {toml_str(case.path)}")
        if case.query:
            lines.append(f"query = {toml_str(case.query)}")
        lines.append(f"auth = {toml_str(case.auth)}")
        if case.headers:
            pairs = ", ".join(f"{toml_str(k)} = {toml_str(v)}" for k, v in case.headers.items())
            lines.append(f"headers = {{ {pairs} }}")
        if case.chunked:
            lines.append("chunked = true")
        lines.append(f"status = {case.status}")
        lines.append(f"error = {toml_str(case.error)}")
        if case.acked is not None:
            lines.append(f"acked = {case.acked}")
        if case.mutates:
            lines.append("mutates = true")
        if case.roundtrip:
            lines.append("roundtrip = true")
        lines.append("")
    return "\n".join(lines)


def stored(body: bytes, name: str) -> bytes:
    return zstd(body) if name.endswith(".zst") else body


def main(argv: list[str]) -> int:
    check = "--check" in argv
    cases = build()
    wanted = {file_name(i, c): c.body for i, c in enumerate(cases)}
    toml = render(cases)
    problems = []
    existing = {p.name for p in HERE.iterdir() if p.name.endswith((".bin", ".bin.zst"))}
    if check:
        for name, body in wanted.items():
            path = HERE / name
            if not path.exists():
                problems.append(f"missing {name}")
                continue
            data = path.read_bytes()
            if name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
            if data != body:
                problems.append(f"differs: {name}")
        problems += [f"extra file {n}" for n in sorted(existing - set(wanted))]
        if (HERE / "expected.toml").read_text() != toml:
            problems.append("expected.toml differs")
        for p in problems:
            print(p)
        return 1 if problems else 0
    for name in existing - set(wanted):
        (HERE / name).unlink()
    for name, body in wanted.items():
        path = HERE / name
        data = stored(body, name)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
    (HERE / "expected.toml").write_text(toml)
    sizes = sum((HERE / n).stat().st_size for n in wanted)
    print(f"{len(cases)} cases, {sizes / 1e6:.2f} MB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
