"""Shared-memory regions and the lock that serialises writers to them.

A region is a fixed-size ``MAP_SHARED`` mapping that several processes read and write
directly. There are two ways to get one:

* ``SharedRegion.anonymous(size)`` in the master, before it forks. The memory has no
  name; children inherit the mapping (and its descriptor) through ``fork()``. This is
  the normal case: HTTP workers and executors are all forked from the master.
* ``SharedRegion.open(path, size)`` for a process that was not forked from the master
  (an admin command, a test harness). ``path`` should live on a tmpfs such as
  ``/dev/shm`` so the pages never touch a disk.

Both are backed by a file descriptor (a ``memfd`` for the anonymous case; the memory is
exactly as anonymous as ``mmap(-1, MAP_SHARED)`` but has a descriptor), and that
descriptor is what makes the writer lock work the same way in both cases.

Why the writer lock is an ``fcntl`` record lock on the region's own descriptor:

* The kernel drops it when its holder dies. A worker killed mid-write (OOM killer,
  ``SIGKILL`` from the supervisor) cannot leave every other process blocked forever,
  which a spinlock or a semaphore living inside the mapping would.
* It works identically for forked children and for unrelated processes that opened the
  same path, with no extra file to create, name or clean up.
* Different byte ranges are independent locks, so several structures that share one
  region can each have their own (``region.lock(index)`` locks byte ``index``).

Its costs are acceptable because writes are rare (cache fills and invalidations): a
system call per acquire and release, a few microseconds. Readers never take it.

Two properties of POSIX record locks shape the ``RegionLock`` class:

* They belong to a process, not a thread, so two threads of one process would both
  "hold" the lock. Each ``RegionLock`` therefore also holds a ``threading.Lock``.
* They are not inherited across ``fork()``; the thread lock is re-created in the child
  so a lock held by the parent at fork time is not held in the child either.

One trap remains and cannot be fixed here: closing *any* descriptor of a file drops all
of the process's record locks on that file. Do not open the same path twice in one
process while a lock may be held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
import weakref
from typing import Self

__all__ = ["RegionLock", "SharedRegion"]


class SharedRegion:
    """A fixed-size shared mapping. ``buf`` is the writable ``mmap`` object itself.

    Slicing ``buf`` copies bytes out (one ``memcpy``); ``struct.pack_into`` and
    ``unpack_from`` work on it directly. Structures built on a region decide their own
    layout; this class knows nothing about what is stored.
    """

    __slots__ = ("__weakref__", "_fd", "buf", "path", "size")

    def __init__(self, fd: int, size: int, path: str | None) -> None:
        # Use anonymous() or open(); this takes ownership of fd.
        self._fd = fd
        self.size = size
        self.path = path
        self.buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def anonymous(cls, size: int) -> SharedRegion:
        """Zero-filled shared memory inherited by children forked after this call."""
        _check_size(size)
        # MFD_CLOEXEC: children that fork inherit it, programs they exec do not.
        fd = os.memfd_create("runlater-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, None)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str, size: int, *, create: bool = True) -> SharedRegion:
        """Map ``path`` (created zero-filled if missing and ``create``), at least ``size`` bytes.

        Several processes may race to create the same path: each only ever grows the file
        to ``size``, so none of them can truncate data another one has written.
        """
        _check_size(size)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                if not create:
                    raise ValueError(f"shared region {path!r} is {actual} bytes, expected at least {size}")
                os.ftruncate(fd, size)
            return cls(fd, size, path)
        except BaseException:
            os.close(fd)
            raise

    def lock(self, index: int = 0) -> RegionLock:
        """An exclusive cross-process lock on byte ``index`` of this region's file.

        Locks on different indexes are independent. The lock is advisory: it does not stop
        anyone from writing; it only excludes other holders of the same index.
        """
        if index < 0:
            raise ValueError(f"lock index must be >= 0, got {index}")
        return RegionLock(self, index)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Unmap and close this process's view. Other processes are unaffected. Idempotent."""
        if self._fd < 0:
            return
        self.buf.close()
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        """Remove the path of an ``open()``-ed region; mappings stay valid until closed."""
        if self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "anonymous"
        return f"<SharedRegion {where} size={self.size}{' closed' if self.closed else ''}>"


def _check_size(size: int) -> None:
    if size <= 0:
        raise ValueError(f"shared region size must be > 0, got {size}")


# Locks whose thread-level half must be replaced in a forked child. Weak, so a lock that is
# garbage collected is forgotten; one fork hook for all of them (the logging module keeps
# its handler locks the same way).
_live_locks: weakref.WeakSet[RegionLock] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for lock in list(_live_locks):
        lock._thread_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


class RegionLock:
    """Exclusive across processes (record lock) and across threads of one process.

    Not reentrant. Use as a context manager, or ``acquire()``/``release()`` in pairs.
    """

    __slots__ = ("__weakref__", "_index", "_region", "_thread_lock")

    def __init__(self, region: SharedRegion, index: int) -> None:
        # Keep the region, not its descriptor number: after close() that number may be
        # reused by an unrelated file, and locking it would silently protect nothing.
        self._region = region
        self._index = index
        self._thread_lock = threading.Lock()
        _live_locks.add(self)

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False instead of waiting."""
        if not self._thread_lock.acquire(blocking):
            return False
        cmd = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fd = self._region._fd
            if fd < 0:
                raise ValueError("lock of a closed shared region")
            fcntl.lockf(fd, cmd, 1, self._index, os.SEEK_SET)
        except (OSError, ValueError) as exc:
            self._thread_lock.release()
            if not blocking and isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def release(self) -> None:
        # Drop the process-level lock first: once the thread lock is free another thread
        # of this process may acquire, and its lockf must not race our unlock.
        fcntl.lockf(self._region._fd, fcntl.LOCK_UN, 1, self._index, os.SEEK_SET)
        self._thread_lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
