"""Hostile bytes never crash, hang or allocate without bound (invariant 8, codec level)."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine import steps
from syncengine.codec import Limits, canonical_packb, compress, decode, decompress, encode
from syncengine.errors import DecodeError, LimitExceededError, SyncError
from syncengine.merge import Change
from syncengine.protocol import (
    DECODE_STEP,
    PullPage,
    PushBatch,
    decode_pull_page,
    decode_push,
    decode_push_steps,
    encode_pull_page,
    encode_push,
)

SMALL = Limits(
    max_body_bytes=1 << 20,
    max_decoded_bytes=1 << 20,
    max_items=1000,
    max_str_bytes=1 << 16,
    max_bin_bytes=1 << 16,
    max_depth=8,
)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", DecodeError),
        (b"\x92\x01", DecodeError),  # truncated array
        (b"\xc1", DecodeError),  # reserved byte
        (b"\x01\x02", DecodeError),  # trailing garbage
        (b"\xa2\xff\xfe", DecodeError),  # invalid UTF-8
        (b"\x81\x01\x02", DecodeError),  # non-string map key
        (b"\xd4\x01\x00", DecodeError),  # ext type
        (b"\xdd" + struct.pack(">I", 2**32 - 1), LimitExceededError),  # array32 of 4G items
        (b"\xdf" + struct.pack(">I", 2**32 - 1), LimitExceededError),  # map32 of 4G items
        (b"\xdb" + struct.pack(">I", 2**32 - 1), DecodeError),  # str32 of 4 GiB, no bytes
        (b"\xdb" + struct.pack(">I", 2**17) + b"x" * 2**17, LimitExceededError),  # str over cap
        (b"\x91" * 10_000 + b"\x00", LimitExceededError),  # 10,000-deep nesting
        (b"\x91" * 9 + b"\x00", LimitExceededError),  # deeper than max_depth=8
    ],
)
def test_hostile_msgpack_raises_typed_errors(data: bytes, error: type[SyncError]) -> None:
    with pytest.raises(error):
        decode(data, SMALL)


def test_zstd_bomb_is_cut_at_the_cap() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(LimitExceededError) as info:
        decompress(bomb, "zstd", SMALL)
    assert info.value.code == "decompressed_too_large"


def test_body_over_the_limit_is_refused_before_decompression() -> None:
    with pytest.raises(LimitExceededError):
        decompress(b"x" * ((1 << 20) + 1), None, SMALL)


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_unknown_encoding_is_refused(encoding: str) -> None:
    with pytest.raises(DecodeError):
        decompress(b"abc", encoding, SMALL)


def test_corrupt_and_concatenated_zstd_frames_are_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(b"hello" * 100)
    with pytest.raises(DecodeError):
        decompress(frame[:-5] + b"\x00\x00\x00\x00\x00", "zstd", SMALL)
    with pytest.raises(DecodeError):
        decompress(frame + frame, "zstd", SMALL)


def test_compress_only_when_it_pays() -> None:
    small, enc = compress(b"abc")
    assert enc is None and small == b"abc"
    body, enc = compress(encode([{"cell": "west/ng/lagos/clinic-12", "n": i} for i in range(500)]))
    assert enc == "zstd"
    assert decode(decompress(body, enc)) == [
        {"cell": "west/ng/lagos/clinic-12", "n": i} for i in range(500)
    ]


def test_canonical_bytes_ignore_key_order() -> None:
    assert canonical_packb({"b": 1, "a": {"y": 2, "x": 3}}) == canonical_packb(
        {"a": {"x": 3, "y": 2}, "b": 1}
    )


def test_unencodable_value_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        encode({"x": object()})


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_the_error_tree(data: bytes) -> None:
    with contextlib.suppress(SyncError):
        decode(data, SMALL)


@settings(max_examples=500, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_round_trip(value: object) -> None:
    assert decode(msgpack.packb(value, use_bin_type=True), SMALL) == value


def _pull_page(**overrides: object) -> dict[str, object]:
    change = Change(
        cell="west/ng/lagos",
        collection="patients",
        key="p1",
        hlc=1 << 20,
        node="e1",
        fields={"n": 1},
        lane=1,
        seq=1,
    )
    page = PullPage(changes=[change], ids=[7], next_cursor=7, head=7, more=False, hub_hlc=1)
    return {**encode_pull_page(page), **overrides}


def test_a_pull_page_round_trips() -> None:
    page = decode_pull_page(_pull_page())
    assert [c.key for c in page.changes] == ["p1"] and page.ids == [7]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"v": 2}, "unsupported_version"),
        ({"v": True}, "unsupported_version"),
        ({"nodes": [["e1"]]}, "invalid_node_id"),
        ({"nodes": [""]}, "invalid_node_id"),
    ],
)
def test_a_pull_page_from_a_hostile_or_newer_hub_is_refused(
    overrides: dict[str, object], code: str
) -> None:
    """A page the edge cannot trust is refused whole (its cursor does not move), with a
    code that says why: never a crash, never a node id that is not a string."""
    deep: object = 0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SyncError) as info:
        decode_pull_page(_pull_page(**overrides))
    assert info.value.code == code
    with pytest.raises(SyncError):  # never RecursionError
        decode_pull_page(_pull_page(nodes=[deep]))


def test_a_push_decodes_in_steps_to_the_same_batch_and_fails_at_the_same_change() -> None:
    """The hub decodes a large push in steps (between them its event loop runs the push
    applier): the steps give exactly what ``decode_push`` gives, and a bad change fails
    the same way, naming its seq, wherever it falls."""
    changes = [
        Change(
            cell="west/ng/lagos/clinic-12",
            collection="visits",
            key=f"v-{seq}",
            hlc=(1_700_000_000_000 << 16) + seq,
            node="edge-1",
            fields={"n": seq},
            lane=2,
            seq=seq,
        )
        for seq in range(1, 151)
    ]
    batch = PushBatch(node="edge-1", lane=2, first_seq=1, last_seq=150, changes=changes)
    msg = decode(encode(encode_push(batch)))
    pauses = len(list(decode_push_steps(msg)))
    assert pauses == 150 // DECODE_STEP
    assert steps.run(decode_push_steps(msg)) == decode_push(msg) == batch
    msg["changes"][100][2] = ""  # the key of seq 101
    for decoder in (decode_push, lambda m: list(decode_push_steps(m))):
        with pytest.raises(SyncError) as refused:
            decoder(msg)
        assert refused.value.detail["seq"] == 101
