"""One live writer per rank and store: an flock on ``writer-r{rank:02d}.lock`` that dies with its
process (the file names the holder's pid for the error a second writer gets)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
from pathlib import Path


from mechsink.cache.layout import StoreError, StoreLocked

log = logging.getLogger("mechsink")


_LOCK_RE = re.compile(r"^writer-r(\d{2,})\.lock$")


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return "?"
    return text[0] if text else "?"


class _Lock:
    """An exclusive flock on ``root/writer-r{rank}.lock``, released when the holder closes or dies.

    The file holds the holder's pid and host. A lock left by a dead process is not held (the kernel
    drops a flock with its process), so the next writer takes it over and says so in the log.
    """

    def __init__(self, root: Path, rank: int) -> None:
        self.path = root / f"writer-r{rank:02d}.lock"
        self.fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise StoreLocked(
                f"{root} is being written by pid {holder} (lock {self.path.name}); one writer per store: wait "
                "for it to finish or stop it, then rerun to resume") from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path} ({e.strerror}); write the store on a local disk") from None
        previous = _lock_holder(fd)
        if previous not in ("?", str(os.getpid())):
            log.warning("%s: took over the lock of pid %s, which is no longer running", root, previous)
        self.taken_over = None if previous == "?" else previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)   # drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _hold_all_locks(root: Path) -> list[_Lock]:
    """Every rank's lock of ``root`` (raises StoreLocked if a writer is alive); release them after."""
    held: list[_Lock] = []
    try:
        for p in sorted(root.glob("writer-r*.lock")):
            m = _LOCK_RE.match(p.name)
            if m:
                held.append(_Lock(root, int(m.group(1))))
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held
