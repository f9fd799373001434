"""Read-side flow control for one HTTP connection.

Reading stops for either of two independent reasons, and resumes only when neither holds:

* the transport's write buffer is above its high-water mark (``pause_writing``), i.e. the client
  is not reading our answers, so reading more of its requests would only grow that buffer;
* too many requests are parsed but not yet answered (pipelining), so their handlers' work and
  their responses would pile up without bound.

``stop()`` is a third, permanent reason: the connection will accept no more requests (it is
closing), so nothing may resume reading again.

The state is plain attributes, read on the protocol's per-answer path where a property call
would cost more than the check; only the methods below change them.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("pipeline_full", "reading", "stopped", "transport", "writing_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writing_paused = False
        self.pipeline_full = False
        self.stopped = False
        self.reading = True  # what we last asked of the transport

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update()

    def set_pipeline_full(self, full: bool) -> None:
        self.pipeline_full = full
        self._update()

    def stop(self) -> None:
        self.stopped = True
        self._update()

    def _update(self) -> None:
        want = not (self.writing_paused or self.pipeline_full or self.stopped)
        if want == self.reading:
            return
        self.reading = want
        # A closing transport has already stopped reading, and some transports raise if asked again.
        if self.transport.is_closing():
            return
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()
