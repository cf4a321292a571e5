"""Writing a create-data output directory: the shards of each split under temporary names,
renamed to `-of-` their count when done (the manifest, written last by create.py, marks the
directory complete), and the directory itself checked and cleaned before a run.
"""

from __future__ import annotations

import os
import re
import shutil

from bert_jax.data import records
from bert_jax.errors import UserError

RECORDS_PER_SHARD = 100_000  # when --num-shards is not given, a new shard every so many
_OWN_FILE_RE = re.compile(
    r"^((train|eval)-\d{5}(-of-\d{5})?\.array_record|manifest\.json)(\.tmp)?$")


class SplitWriter:
  """Shards of one split under temporary names; `finish` renames them `-of-` the count."""

  def __init__(self, output_dir: str, split: str, num_shards: int | None):
    self.output_dir, self.split, self.num_shards = output_dir, split, num_shards
    self.writers: list = []
    self.counts: list[int] = []
    self.names: list[str] = []  # the finished shards' file names
    self.num_instances = self.num_documents = self.num_tokens = self.input_tokens = 0
    self.nsp = [0, 0, 0]

  def _tmp_path(self, index: int) -> str:
    return os.path.join(self.output_dir, f"{self.split}-{index:05d}.array_record.tmp")

  def _open(self) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    self.writers.append(ArrayRecordWriter(self._tmp_path(len(self.writers)),
                                          records.WRITER_OPTIONS))
    self.counts.append(0)

  def add(self, result) -> None:
    """Appends a chunk's records (create.ChunkResult) and counts its statistics."""
    if self.num_shards:
      while len(self.writers) < self.num_shards:
        self._open()
      shard = result.index % self.num_shards
    else:
      if not self.writers or self.counts[-1] >= RECORDS_PER_SHARD:
        self._open()
      shard = len(self.writers) - 1
    writer = self.writers[shard]
    for record in result.records:
      writer.write(record)
    self.counts[shard] += len(result.records)
    self.num_instances += len(result.records)
    self.num_documents += result.num_documents
    self.num_tokens += result.num_tokens
    self.input_tokens += result.input_tokens
    self.nsp = [a + b for a, b in zip(self.nsp, result.nsp)]

  def finish(self) -> list[str]:
    for writer in self.writers:
      writer.close()
    kept = [i for i, count in enumerate(self.counts) if count > 0]
    names = []
    for new_index, old_index in enumerate(kept):
      name = records.shard_name(self.split, new_index, len(kept))
      os.replace(self._tmp_path(old_index), os.path.join(self.output_dir, name))
      names.append(name)
    self.names = names
    for old_index, count in enumerate(self.counts):
      if count == 0:
        os.remove(self._tmp_path(old_index))
    return names


def prepare_output_dir(output_dir: str) -> None:
  """Creates the directory; refuses a complete dataset or foreign files; cleans a partial run."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output {output_dir}: exists and is not a directory")
  os.makedirs(output_dir, exist_ok=True)
  entries = os.listdir(output_dir)
  if records.MANIFEST in entries:
    raise UserError(f"--output {output_dir}: already holds a complete dataset "
                    f"({records.MANIFEST}); choose another directory or delete it")
  foreign = [e for e in entries if not _OWN_FILE_RE.match(e)]
  if foreign:
    raise UserError(f"--output {output_dir}: not empty ({foreign[0]} ...); expected an empty "
                    "directory or an incomplete create-data run to clean up")
  for entry in entries:    # leftovers of an interrupted run
    path = os.path.join(output_dir, entry)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
