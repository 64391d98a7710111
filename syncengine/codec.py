"""Bytes on the wire and on disk: msgpack with hard limits, zstd when it pays, canonical form.

Hostile input is the normal case for a hub on the internet, so decoding checks every limit
before it allocates: the body size before decompression, the decompressed size while
decompressing (a 1 MB zstd bomb never becomes 1 GB), and msgpack's declared lengths of
strings, binaries, arrays and maps before they are read. Nesting depth and key types are
checked on the decoded object. Everything that goes wrong raises :class:`DecodeError` or
:class:`LimitExceededError`; nothing else escapes.

The canonical encoding (maps with sorted keys, minimal integers, float64) is what replicas
compare byte for byte.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import zstandard

from syncengine.errors import DecodeError, LimitExceededError

__all__ = [
    "DEFAULT_LIMITS",
    "ZSTD",
    "Limits",
    "canonical",
    "canonical_packb",
    "compress",
    "decode",
    "decompress",
    "encode",
]

ZSTD: Final = "zstd"

#: Bodies smaller than this are not worth a zstd frame header.
_MIN_COMPRESS_BYTES = 256
_ZSTD_LEVEL = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Upper bounds for one decoded message. Every field is a hard limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    """Size of the body as received, before decompression."""
    max_decoded_bytes: int = 64 * 1024 * 1024
    """Size after decompression."""
    max_items: int = 200_000
    """Elements of any one array or map."""
    max_str_bytes: int = 4 * 1024 * 1024
    max_bin_bytes: int = 4 * 1024 * 1024
    max_depth: int = 32


DEFAULT_LIMITS: Final = Limits()

_packer = msgpack.Packer(use_bin_type=True, datetime=False, strict_types=False)


def encode(obj: Any) -> bytes:
    """Pack ``obj`` as msgpack. Raises :class:`DecodeError` for values msgpack cannot hold."""
    try:
        return _packer.pack(obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(
            f"value cannot be encoded as msgpack: {exc}",
            code="unencodable_value",
            hint="Use strings, numbers, booleans, null, lists and maps with string keys.",
        ) from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(
        f"msgpack extension type {code} is not accepted",
        detail={"ext_type": code},
    )


def _check_shape(obj: Any, limits: Limits) -> None:
    """Depth and key-type check, iterative so hostile nesting cannot blow the stack."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > limits.max_depth:
                break
            for k, v in node.items():
                if not isinstance(k, str):
                    raise DecodeError(
                        f"map keys must be strings, got {type(k).__name__}",
                        code="malformed_body",
                    )
                if isinstance(v, dict | list):
                    stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > limits.max_depth:
                break
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    else:
        return
    raise LimitExceededError(
        f"message nested deeper than {limits.max_depth} levels",
        detail={"max_depth": limits.max_depth},
        code="too_deep",
    )


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, *, check_shape: bool = True) -> Any:
    """Unpack one msgpack object from ``data`` (already decompressed), enforcing ``limits``.

    Raises :class:`DecodeError` for malformed, truncated or trailing bytes, invalid UTF-8,
    extension types and non-string map keys; :class:`LimitExceededError` for sizes past
    ``limits``. ``check_shape=False`` skips the depth and key-type walk, for callers that
    validate every key and nesting level of the message themselves (the sync protocol);
    msgpack's own nesting cap still applies.
    """
    if len(data) > limits.max_decoded_bytes:
        raise LimitExceededError(
            f"message of {len(data)} bytes exceeds {limits.max_decoded_bytes}",
            detail={"bytes": len(data), "max": limits.max_decoded_bytes},
            code="body_too_large",
        )
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # checked in _check_shape, with a clearer message
            ext_hook=_reject_ext,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_bin_bytes,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
            use_list=True,
        )
    except (DecodeError, LimitExceededError):
        raise
    except msgpack.ExtraData:
        raise DecodeError("trailing bytes after the msgpack message") from None
    except msgpack.StackError:
        raise LimitExceededError(
            "message nested too deeply", detail={"max_depth": limits.max_depth}, code="too_deep"
        ) from None
    except UnicodeDecodeError as exc:
        raise DecodeError(
            f"string is not valid UTF-8 ({exc.reason})", code="invalid_utf8"
        ) from None
    except ValueError as exc:
        text = str(exc)
        if "max_ext_len" in text:
            raise DecodeError("msgpack extension types are not accepted") from None
        if "exceeds max_" in text:
            raise LimitExceededError(
                f"msgpack length limit: {text}", code="item_limit_exceeded"
            ) from None
        raise DecodeError(f"malformed msgpack: {text or type(exc).__name__}") from None
    except (TypeError, OverflowError, MemoryError) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from None
    if check_shape:
        _check_shape(obj, limits)
    return obj


class _Zstd(threading.local):
    """This thread's zstd contexts. Making one allocates its working memory (about 10 µs
    for a small body, most of the cost of compressing or decompressing one); a context may
    be reused for one operation after another, but not by two threads at once."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        self.decompressor = zstandard.ZstdDecompressor()


_ZSTD: Final = _Zstd()


def compress(data: bytes) -> tuple[bytes, str | None]:
    """zstd-compress ``data`` when that saves at least 10%.

    Returns ``(body, encoding)`` where ``encoding`` is ``"zstd"`` or ``None`` (sent as is).
    """
    if len(data) < _MIN_COMPRESS_BYTES:
        return data, None
    packed = _ZSTD.compressor.compress(data)
    if len(packed) <= len(data) * 0.9:
        return packed, ZSTD
    return data, None


def decompress(body: bytes, encoding: str | None, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Undo :func:`compress`, never producing more than ``limits.max_decoded_bytes``.

    Checks the received size first; reads at most one byte past the cap, so a bomb costs
    bounded memory and time.
    """
    if len(body) > limits.max_body_bytes:
        raise LimitExceededError(
            f"body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
            detail={"bytes": len(body), "max": limits.max_body_bytes},
            code="body_too_large",
        )
    if encoding in (None, "", "identity"):
        return body
    if encoding != ZSTD:
        raise DecodeError(
            f"unsupported content encoding {encoding!r}",
            hint="Send the body uncompressed or as zstd.",
            code="unsupported_encoding",
        )
    cap = limits.max_decoded_bytes
    try:
        reader = _ZSTD.decompressor.stream_reader(io.BytesIO(body))
        with reader:
            out = reader.read(cap + 1)
            # A concatenated second frame would be silently ignored by read(); refuse it.
            trailing = reader.read(1)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"corrupt zstd body: {exc}", code="malformed_body") from None
    if len(out) > cap:
        raise LimitExceededError(
            f"body decompresses to more than {cap} bytes",
            detail={"max": cap},
            code="decompressed_too_large",
        )
    if trailing:
        raise DecodeError("zstd body has trailing frames", code="malformed_body")
    return out


_CONTAINERS: Final = (dict, list, tuple)


def canonical(obj: Any) -> Any:
    """A copy of ``obj`` whose maps are ordered by key, recursively (tuples become lists).

    Scalars are returned as they are without a call per value: this runs on every write.
    """
    if isinstance(obj, dict):
        return {
            k: canonical(v) if isinstance(v, _CONTAINERS) else v
            for k, v in sorted(obj.items(), key=_first)
        }
    if isinstance(obj, list | tuple):
        return [canonical(v) if isinstance(v, _CONTAINERS) else v for v in obj]
    return obj


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def canonical_packb(obj: Any) -> bytes:
    """The canonical msgpack bytes of ``obj``: equal values give equal bytes."""
    return encode(canonical(obj))
