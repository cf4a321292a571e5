"""fileio: local copies of remote files live in a per-process scratch directory that goes away
when the process exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bert_jax import fileio

_COPY_AND_EXIT = """
import json, sys
from bert_jax import fileio
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
