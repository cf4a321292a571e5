"""A lock on a directory that one run owns (a pretraining workdir, a fine-tuning --output-dir).

Two runs writing one directory silently lose work (metrics.jsonl rewritten, checkpoints
interleaved). The lock file holds the owner's pid, host and start time; a second run refuses
with one line naming them. A lock whose process is gone (a killed run; a pid now reused by
another process) is taken over with a warning, so a rerun after SIGKILL just works.

Local directories: the lock is created with O_EXCL, so of two runs starting together exactly
one gets it. Object stores (gs://): best-effort: there is no atomic create (check, then write),
and a process on another host cannot be checked, so its lock stands until it is released or
deleted by hand (the message says which file).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings

from bert_jax.errors import UserError
from bert_jax.storage.fileio import as_path, is_remote, write_text_atomic

LOCK_NAME = ".bert-jax.lock"


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _owner() -> dict:
  return dict(pid=os.getpid(), host=socket.gethostname(), start_ticks=_start_ticks(os.getpid()),
              started=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv)[:300])


def _is_running(owner: dict) -> bool | None:
  """True/False for a process on this host; None when it cannot be known (another host)."""
  if owner.get("host") != socket.gethostname():
    return None
  pid = int(owner.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  ticks = owner.get("start_ticks")
  now = _start_ticks(pid)
  return not (ticks is not None and now is not None and now != ticks)


class DirLock:
  """`with DirLock(dir, "--workdir"):` holds dir/.bert-jax.lock for the block."""

  def __init__(self, directory: str | os.PathLike, flag: str):
    self.directory, self.flag = os.fspath(directory), flag
    self.path = as_path(directory) / LOCK_NAME
    self.held = False

  def acquire(self) -> None:
    as_path(self.directory).mkdir(parents=True, exist_ok=True)
    me = _owner()
    for _ in range(5):  # a stale lock is moved aside, then the create is retried
      if self._create(me):
        self.held = True
        return
      owner = self._read()
      if owner == {}:  # perhaps being written this instant by a run that just created it
        time.sleep(0.5)
        owner = self._read()
      if owner is None:
        continue  # released in the meantime
      running = _is_running(owner) if owner else False
      mine = owner.get("pid") == me["pid"] and owner.get("start_ticks") == me["start_ticks"]
      if running is False or mine:
        if not mine:
          warnings.warn(f"{self.directory}: taking over the lock of pid {owner.get('pid')} on "
                        f"{owner.get('host')} (started {owner.get('started')}), which is no "
                        "longer running", stacklevel=2)
        self._move_aside()
        continue
      raise UserError(
          f"{self.flag} {self.directory}: in use by pid {owner.get('pid')} on host "
          f"{owner.get('host')} (started {owner.get('started')}); wait for it, use another "
          f"directory, or delete {self.path} if that run is no longer running")
    raise UserError(f"{self.flag} {self.directory}: cannot take the lock {self.path}")

  def _create(self, me: dict) -> bool:
    text = json.dumps(me) + "\n"
    if is_remote(self.path):
      if self.path.exists():
        return False
      write_text_atomic(self.path, text)
      return True
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return True

  def _read(self) -> dict | None:
    try:
      owner = json.loads(self.path.read_text(encoding="utf-8"))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # torn or foreign: treated as a dead owner
    return owner if isinstance(owner, dict) else {}

  def _move_aside(self) -> None:
    """Renames the stale lock (atomic locally: of two runs taking over, one wins the create)."""
    aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
      self.path.rename(aside)
      aside.unlink()
    except (FileNotFoundError, OSError):
      pass

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    owner = self._read()
    if owner and owner.get("pid") == os.getpid():
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass

  def __enter__(self) -> "DirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
