"""Liveness timestamps shared between the master and its children.

A child proves it is not wedged by writing the current monotonic time into its own slot; the master
reads the slot and kills a child whose time has gone stale. The board lives in an anonymous
``MAP_SHARED`` mapping created by the master *before* forking, so every child sees the same pages
without a file, a lock or a system call per beat.

Layout: ``slots`` consecutive native float64 values, 8-byte aligned. Each slot has exactly one
writer (the child that was given it) and one reader (the master), so no lock is needed. An aligned
8-byte store is a single instruction on the machines we run on; even a torn read would mix two
timestamps taken a fraction of a second apart whose high (exponent) bytes agree, so it could only
misjudge a child's age by far less than any sensible timeout.

``time.monotonic()`` is CLOCK_MONOTONIC on Linux, one clock for every process on the machine, so a
value written by a child can be compared with the master's own clock.
"""

from __future__ import annotations

import mmap
import struct
import time

_SLOT = struct.Struct("d")


class HeartbeatBoard:
    """A fixed number of shared float64 timestamps, one per live child."""

    __slots__ = ("_map", "slots")

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a heartbeat board needs at least one slot, got {slots}")
        self.slots = slots
        # fileno -1 with the default flags gives MAP_SHARED|MAP_ANONYMOUS: pages survive fork()
        # shared rather than copied-on-write, which is the whole point.
        self._map = mmap.mmap(-1, slots * _SLOT.size)

    def beat(self, slot: int) -> None:
        """Record that the owner of ``slot`` is alive now. Called by the child; one store."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, time.monotonic())

    def stamp(self, slot: int, when: float) -> None:
        """Set ``slot`` to ``when``; the master does this before handing a slot to a new child so
        the previous owner's stale time is never read as the new child's."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, when)

    def last(self, slot: int) -> float:
        """The monotonic time of the last beat written to ``slot``."""
        return _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]

    def close(self) -> None:
        self._map.close()
