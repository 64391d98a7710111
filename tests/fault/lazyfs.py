"""A FUSE filesystem that loses what was not fsynced: a power cut for SQLite (T4).

Usage: ``python lazyfs.py BACKING MOUNTPOINT`` (foreground; as root, with ``/dev/fuse``).

A passthrough of BACKING in the manner of Jepsen's LazyFS: file data written through the
mount is kept in memory, per file, as an ordered list of writes and truncations that reads
see; ``fsync`` and ``fdatasync`` apply a file's list to BACKING and fsync it there. Metadata
(create, unlink, rename, mkdir) goes to BACKING at once. So SIGKILL of this process is a power
cut: whatever was not fsynced is gone, exactly what a disk with a volatile cache may do.

Control, by writing to the file ``/.lazyfs-ctl`` of the mount:
- ``torn SEED``: write to BACKING a random 512-byte-aligned prefix of the last unsynced write
  (as SQLite's crash tests tear a sector write), then carry on; kill the process right after.
- ``pending``: the number of unsynced operations, read back from the same file.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from typing import Any

from fuse import FUSE, FuseOSError, Operations

CTL = "/.lazyfs-ctl"

#: ("w", offset, data) or ("t", length, b"")
Op = tuple[str, int, bytes]


class LazyFS(Operations):  # type: ignore[misc]
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._mutex = threading.RLock()
        self.pending: dict[str, list[Op]] = {}
        self.last: tuple[str, Op] | None = None
        self.ctl_answer = b""

    # -- helpers ------------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _size(self, path: str) -> int:
        size = os.path.getsize(self._full(path))
        for kind, n, data in self.pending.get(path, ()):
            size = max(size, n + len(data)) if kind == "w" else n
        return size

    def _apply(self, path: str) -> None:
        ops = self.pending.pop(path, [])
        if not ops:
            return
        fd = os.open(self._full(path), os.O_WRONLY)
        try:
            for kind, n, data in ops:
                if kind == "w":
                    os.pwrite(fd, data, n)
                else:
                    os.ftruncate(fd, n)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- metadata: straight to the backing folder ---------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if path == CTL:
            return {"st_mode": 0o100644, "st_nlink": 1, "st_size": len(self.ctl_answer)}
        try:
            st = os.lstat(self._full(path))
        except OSError as exc:
            raise FuseOSError(exc.errno) from None
        attrs = {
            k: getattr(st, k)
            for k in (
                "st_atime",
                "st_ctime",
                "st_gid",
                "st_mode",
                "st_mtime",
                "st_nlink",
                "st_uid",
            )
        }
        with self._mutex:
            attrs["st_size"] = self._size(path) if path in self.pending else st.st_size
        return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def access(self, path: str, amode: int) -> None:
        if path != CTL and not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def unlink(self, path: str) -> None:
        with self._mutex:
            self.pending.pop(path, None)
            os.unlink(self._full(path))

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            os.rename(self._full(old), self._full(new))
            if old in self.pending:
                self.pending[new] = self.pending.pop(old)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._full(path), times)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in dir(st) if k.startswith("f_")}

    # -- files ----------------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fd = os.open(self._full(path), os.O_WRONLY | os.O_CREAT, mode)
        os.close(fd)
        return 0

    def open(self, path: str, flags: int) -> int:
        if path != CTL and not os.path.exists(self._full(path)):
            raise FuseOSError(errno.ENOENT)
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        if path == CTL:
            return self.ctl_answer[offset : offset + size]
        with self._mutex:
            with open(self._full(path), "rb") as f:
                f.seek(offset)
                buf = bytearray(f.read(size))
            end = offset + size
            # The backing bytes, then every unsynced operation over them, in order.
            buf.extend(b"\0" * (size - len(buf)))
            length = os.path.getsize(self._full(path))
            for kind, n, data in self.pending.get(path, ()):
                if kind == "w":
                    lo, hi = max(n, offset), min(n + len(data), end)
                    if lo < hi:
                        buf[lo - offset : hi - offset] = data[lo - n : hi - n]
                    length = max(length, n + len(data))
                else:
                    if n < end:
                        cut = max(n, offset)
                        buf[cut - offset :] = b"\0" * (end - cut)
                    length = n
            return bytes(buf[: max(0, min(size, length - offset))])

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if path == CTL:
            self._control(data.decode().split())
            return len(data)
        with self._mutex:
            op: Op = ("w", offset, bytes(data))
            self.pending.setdefault(path, []).append(op)
            self.last = (path, op)
        return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        if path == CTL:
            return
        with self._mutex:
            self.pending.setdefault(path, []).append(("t", length, b""))

    def fsync(self, path: str, datasync: int, fh: Any) -> None:
        with self._mutex:
            self._apply(path)

    def fsyncdir(self, path: str, datasync: int, fh: Any) -> None:
        return None

    def flush(self, path: str, fh: Any) -> None:
        return None

    def release(self, path: str, fh: Any) -> None:
        return None

    # -- control --------------------------------------------------------------------------------

    def _control(self, words: list[str]) -> None:
        with self._mutex:
            if words[:1] == ["torn"] and self.last is not None:
                rng = random.Random(int(words[1]) if len(words) > 1 else 0)
                path, (_, offset, data) = self.last
                keep = rng.randrange(0, len(data) // 512 + 1) * 512
                if keep and os.path.exists(self._full(path)):
                    fd = os.open(self._full(path), os.O_WRONLY)
                    try:
                        os.pwrite(fd, data[:keep], offset)
                    finally:
                        os.close(fd)
                self.ctl_answer = f"torn {path} {keep} of {len(data)}\n".encode()
            elif words[:1] == ["pending"]:
                count = sum(len(ops) for ops in self.pending.values())
                self.ctl_answer = f"{count}\n".encode()


def main() -> None:
    root, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(LazyFS(root), mountpoint, foreground=True, nothreads=False, fsname="lazyfs")


if __name__ == "__main__":
    main()
