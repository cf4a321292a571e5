"""fileio: local copies of remote files live in a per-process scratch directory that goes away
when the process exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bert_jax.storage import fileio

_COPY_AND_EXIT = """
import json, sys
from bert_jax.storage import fileio
fileio.is_remote = lambda path: str(path).endswith(".remote")  # a stand-in for gs://
local = fileio.local_copy(sys.argv[1])
print(json.dumps([local, open(local).read(), fileio.scratch_dir()]))
"""


def test_a_local_path_is_its_own_copy(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("[PAD]\n")
  assert fileio.local_copy(path) == str(path)


def test_remote_copies_are_removed_when_the_process_exits(tmp_path):
  source = tmp_path / "vocab.remote"
  source.write_text("[PAD]\n[UNK]\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-c", _COPY_AND_EXIT, str(source)], env=env,
                       capture_output=True, text=True, check=True).stdout
  local, content, scratch = json.loads(out.strip().splitlines()[-1])
  assert content == "[PAD]\n[UNK]\n" and os.path.dirname(local) == scratch
  assert not os.path.exists(local) and not os.path.exists(scratch)
  assert source.read_text() == "[PAD]\n[UNK]\n"  # the original is untouched


def test_check_writable_names_the_flag_and_the_reason(tmp_path):
  import pytest

  from bert_jax.errors import UserError
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  fileio.check_writable(tmp_path / "new" / "deeper", "--workdir")   # created later: fine
  fileio.check_writable(tmp_path / "vocab.txt", "--output", is_file=True)
  assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["a_file"]  # no probes left
  cases = [(dict(path=blocker / "sub"), f"--workdir {blocker / 'sub'}: {blocker} is a file"),
           (dict(path=blocker), f"--workdir {blocker}: exists and is not a directory"),
           (dict(path=tmp_path, is_file=True), "is a directory; expected a file name"),
           (dict(path="/proc/bert-jax-test/x"), "cannot write in /proc")]
  for kwargs, message in cases:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
      fileio.check_writable(flag="--workdir", **kwargs)
  fileio.check_writable("gs://bucket/run", "--workdir")  # object stores are not probed
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="cannot write in"):
      fileio.check_writable(locked / "out", "--output-dir")


def test_follow_umask_undoes_mkdtemp_modes(tmp_path):
  import tempfile
  root = tempfile.mkdtemp(dir=tmp_path)
  os.mkdir(os.path.join(root, "sub"), 0o700)
  fd, name = tempfile.mkstemp(dir=os.path.join(root, "sub"))
  os.close(fd)
  old = os.umask(0o027)
  try:
    fileio.follow_umask(root)
  finally:
    os.umask(old)
  assert [os.stat(p).st_mode & 0o777 for p in (root, os.path.join(root, "sub"), name)] == [
      0o750, 0o750, 0o640]
