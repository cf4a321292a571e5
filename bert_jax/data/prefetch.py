"""Batches built ahead of the training step, off the training thread.

A background thread takes batches from a resumable iterator (get_state/set_state), applies
`place` (the training loop passes the host->device copy, so batch n+1 is on the devices while
step n runs) and keeps up to `depth` of them in a bounded queue. The state handed out is the
one recorded right after the last batch the consumer received, not where the thread has got
to, so a checkpoint resumes at the next batch the loop would have trained on. An error in the
thread (a bad record, a dead worker) is raised by the consumer's next(), and a thread that
vanished without one is an error too, never a hang.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_POLL_S = 0.5   # how often a waiting consumer or producer checks that the other side lives


class Prefetcher:
  """`iterator` run `depth` batches ahead in a thread (depth 0: in the caller's thread)."""

  def __init__(self, iterator: Any, depth: int, place: Callable[[Any], Any] | None = None):
    self.inner, self.depth = iterator, depth
    self.place = place or (lambda batch: batch)
    self._state = None        # the state after the last batch handed out; None: inner's
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Any:
    if self.depth == 0:
      return self.place(next(self.inner))
    if self._thread is None:
      self._begin()
    while True:
      try:
        kind, value, state = self._queue.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if not self._thread.is_alive():
          raise RuntimeError("input pipeline: the prefetch thread stopped without a batch "
                             "or an error") from None
    if kind == "error":
      self._thread.join()
      self._thread = None      # a later next() retries from the last state handed out
      self._set_inner(self._state)
      raise value
    self._state = state
    return value

  def _begin(self) -> None:
    if self._state is None:
      self._state = self.inner.get_state()
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self.depth)
    self._thread = threading.Thread(target=self._produce, name="bert-jax-prefetch", daemon=True)
    self._thread.start()

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self.inner)
        state = self.inner.get_state()
        self._put(("batch", self.place(batch), state))
    except BaseException as e:  # noqa: BLE001 - StopIteration and errors go to the consumer
      self._put(("error", e, None))

  def _put(self, item: tuple) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return
      except queue.Full:
        continue

  def _halt(self) -> None:
    """Stops the thread and drops what it built ahead."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self._set_inner(self._state)

  def _set_inner(self, state: Any) -> None:
    if state is not None:
      self.inner.set_state(state)

  def get_state(self) -> Any:
    return self.inner.get_state() if self._state is None else self._state

  def set_state(self, state: Any) -> None:
    self._halt()
    self.inner.set_state(state)
    self._state = None

  def close(self) -> None:
    self._halt()
    close = getattr(self.inner, "close", None)
    if close is not None:
      close()
