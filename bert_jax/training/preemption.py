"""SIGTERM (a TPU/spot preemption, SLURM's time limit, `kill`) as a request to stop cleanly:
both training loops finish their step, save what they have and exit."""

from __future__ import annotations

import signal


class Preemption:
  """SIGTERM sets a flag; the loop finishes its step, saves and exits. On several hosts the
  JAX preemption sync point (through orbax) makes every pretraining host stop at one step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    def handler(signum, frame):
      del frame
      self.requested = True
      print(f"received signal {signum}: saving after this step", flush=True)
    self._previous = signal.signal(signal.SIGTERM, handler)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "Preemption":
    self.install()
    return self

  def __exit__(self, *exc) -> None:
    self.uninstall()
