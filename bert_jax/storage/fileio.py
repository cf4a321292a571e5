"""Files on any path etils.epath understands: local, gs:// (also s3://, az://).

Writes are atomic in the sense the project needs: a reader sees the old content or the new,
never half a file. Locally that is a temporary name then a rename; on object stores an
upload only becomes visible when complete, and the rename is a copy of a complete object.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

from bert_jax.errors import UserError

REMOTE_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for an object-store URI (no appends, no local file handles for native readers)."""
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path; local paths are made absolute, URIs are left as they are."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def resolved(path: str | os.PathLike) -> epath.Path:
  """A local path resolved (symlinks too, so its parents are the real ones), or a URI."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(pathlib.Path(path).resolve())


def self_and_parents(path: str | os.PathLike, levels: int) -> list[epath.Path]:
  """`path` and up to `levels` of its parents: where a checkpoint's config and vocab live."""
  p = resolved(path)
  return [p] + list(p.parents)[:levels]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Creates the parent folder if needed; a failed write leaves no temporary file behind."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
  """Indented, key-sorted JSON with a final newline (dump_kwargs override those defaults)."""
  write_text_atomic(path, json.dumps(obj, **{"indent": 2, "sort_keys": True, **dump_kwargs})
                    + "\n")


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  src, dst = as_path(src), as_path(dst)
  tmp = dst.with_name(dst.name + ".tmp")
  # Streamed rather than Path.copy: that uses the source's backend, which cannot write gs://.
  with src.open("rb") as fin, tmp.open("wb") as fout:
    shutil.copyfileobj(fin, fout, 16 << 20)
  tmp.replace(dst)


@functools.cache
def scratch_dir() -> str:
  """A directory for this process's temporary local copies, removed when the process exits."""
  path = tempfile.mkdtemp(prefix="bert-jax-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def local_copy(path: str | os.PathLike, suffix: str = "") -> str:
  """A local file path with the content of `path` (itself when already local), for readers
  that only open local files (tokenizers, sentencepiece). Copies live in scratch_dir()."""
  if not is_remote(path):
    return os.fspath(path)
  fd, local = tempfile.mkstemp(suffix=suffix or "-" + as_path(path).name, dir=scratch_dir())
  with os.fdopen(fd, "wb") as fout, as_path(path).open("rb") as fin:
    shutil.copyfileobj(fin, fout, 16 << 20)
  return local


def upload_tree(local_dir: str | os.PathLike, dst: str | os.PathLike,
                last: tuple[str, ...] = ()) -> None:
  """Copies the files of `local_dir` into `dst` (any epath); the names in `last` (e.g. a
  manifest that marks the directory complete) are copied after all the others."""
  local_dir, dst = os.fspath(local_dir), as_path(dst)
  names = sorted(os.listdir(local_dir), key=lambda n: (n in last, n))
  for name in names:
    src = os.path.join(local_dir, name)
    if os.path.isdir(src):
      upload_tree(src, dst / name)
    else:
      dst.mkdir(parents=True, exist_ok=True)
      copy_atomic(src, dst / name)


def check_writable(path: str | os.PathLike, flag: str, *, is_file: bool = False) -> None:
  """Raises UserError (one line naming `flag`) unless `path` can be created or written: every
  command calls it before any work, so a read-only or mistyped output fails in seconds rather
  than after training. Object stores are not probed (their first write reports it)."""
  if is_remote(path):
    return
  path = os.path.abspath(os.fspath(path))
  if is_file and os.path.isdir(path):
    raise UserError(f"{flag} {path}: is a directory; expected a file name")
  if not is_file and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path}: exists and is not a directory")
  probe = os.path.dirname(path) if is_file else path
  while not os.path.lexists(probe):  # the nearest existing ancestor is where mkdir starts
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"{flag} {path}: {probe} is a file, not a directory")
  try:
    fd, name = tempfile.mkstemp(prefix=".bert-jax-write-test-", dir=probe)
  except OSError as e:
    raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror})") from None
  os.close(fd)
  os.remove(name)


def refuse_nonempty(path: str | os.PathLike) -> None:
  """UserError unless `path` is absent or an empty directory: outputs never overwrite work."""
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"{path}: already exists and is not empty; choose a new output directory")


@contextlib.contextmanager
def new_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary directory beside local `path` that becomes `path` (with the umask's
  modes) when the block ends, and is removed if it raises: readers never see half a model.
  An existing `path` must be empty unless `replace`."""
  final = pathlib.Path(path).resolve()
  if not replace:
    refuse_nonempty(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  try:
    yield tmp
    follow_umask(tmp)  # not mkdtemp's 0700: others on a shared machine may read the model
    if final.exists():
      shutil.rmtree(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def follow_umask(root: str | os.PathLike) -> None:
  """Directories and files under `root` get the modes a plain mkdir/open would give (0777 /
  0666 less the umask), as transformers' save_pretrained does; for trees built in a
  tempfile.mkdtemp directory, which is 0700 (and mkstemp files 0600)."""
  mask = os.umask(0)
  os.umask(mask)
  for dirpath, _, files in os.walk(root):
    os.chmod(dirpath, 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
