"""Read-side flow control for one HTTP connection.

Reading stops for either of two independent reasons, and resumes only when neither holds:

* the transport's write buffer is above its high-water mark (``pause_writing``), i.e. the client
  is not reading our answers, so reading more of its requests would only grow that buffer;
* too many requests are parsed but not yet answered (pipelining), so their handlers' work and
  their responses would pile up without bound.

``stop()`` is a third, permanent reason: the connection will accept no more requests (it is
closing), so nothing may resume reading again.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("_transport", "_writing_paused", "_pipeline_full", "_stopped", "_reading")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._writing_paused = False
        self._pipeline_full = False
        self._stopped = False
        self._reading = True  # what we last asked of the transport

    @property
    def reading_paused(self) -> bool:
        return not self._reading

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    @property
    def pipeline_full(self) -> bool:
        return self._pipeline_full

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update()

    def set_pipeline_full(self, full: bool) -> None:
        self._pipeline_full = full
        self._update()

    def stop(self) -> None:
        self._stopped = True
        self._update()

    def _update(self) -> None:
        want = not (self._writing_paused or self._pipeline_full or self._stopped)
        if want == self._reading:
            return
        self._reading = want
        # A closing transport has already stopped reading, and some transports raise if asked again.
        if self._transport.is_closing():
            return
        if want:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()
