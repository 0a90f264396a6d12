"""Where the process is in its drain: one object, owned by the runtime, read by all that serve.

A drain (SIGTERM, SPEC section 7) has two steps, and each part reads the step it cares
about here, so none can disagree with another about it:

1. :meth:`Lifecycle.stop`: ``/readyz`` answers 503 at once, while requests keep being
   served on kept-alive connections (endpoints propagate meanwhile);
2. :meth:`Lifecycle.start_draining`: the proxy port's servers keep no connection alive
   past its answer, and the upgrade hand-off closes after its exchange.
"""

from __future__ import annotations

__all__ = ["Lifecycle"]


class Lifecycle:
    """The drain's two steps as plain attributes (read on every answer: no property)."""

    __slots__ = ("draining", "stopping")

    def __init__(self) -> None:
        self.stopping = False  # the drain was announced: not ready
        self.draining = False  # connections close after their answer (implies stopping)

    def stop(self) -> None:
        self.stopping = True

    def start_draining(self) -> None:
        self.stopping = self.draining = True
