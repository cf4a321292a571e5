"""The directory lock of `pretrain --workdir` and `finetune --output-dir`: a live owner refuses
the second run (naming pid and host), a dead one's lock is taken over with a warning."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from bert_jax.errors import UserError
from bert_jax.training.lock import LOCK_NAME, DirLock


def _write_lock(directory, pid, host=None):
  (directory / LOCK_NAME).write_text(json.dumps(
      {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01 00:00:00"}))


def test_acquire_release(tmp_path):
  with DirLock(tmp_path / "run", "--workdir") as lock:
    owner = json.loads(lock.path.read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] > 0
  assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_owner_refuses_naming_pid_and_host(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(tmp_path, holder.pid)
    with pytest.raises(UserError, match=rf"--workdir {tmp_path}: in use by pid {holder.pid} on "
                                        rf"host {socket.gethostname()} .*delete "):
      DirLock(tmp_path, "--workdir").acquire()
  finally:
    holder.kill()
    holder.wait()
  assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left alone


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  _write_lock(tmp_path, gone.pid)
  lock = DirLock(tmp_path, "--workdir")
  with pytest.warns(UserWarning, match=f"taking over the lock of pid {gone.pid}.*no longer "
                                       "running"):
    lock.acquire()
  assert json.loads(lock.path.read_text())["pid"] != gone.pid
  lock.release()
  (tmp_path / LOCK_NAME).write_text("")   # torn (a run killed while writing it): stale too
  with pytest.warns(UserWarning, match="taking over"):
    DirLock(tmp_path, "--workdir").acquire()


def test_another_hosts_lock_is_honoured(tmp_path):
  _write_lock(tmp_path, 1, host="some-other-host")
  with pytest.raises(UserError, match="in use by pid 1 on host some-other-host"):
    DirLock(tmp_path, "--output-dir").acquire()
