"""`bert-jax pretrain` with its workdir, data and vocab on gs://, against a fake bucket.

The fake: etils.epath's mock backend sends gs:// paths to the local file system, and with the
working directory at tmp_path "gs://fake-bucket/x" lands in tmp_path/"gs:"/fake-bucket/x;
orbax's tensorstore GCS driver spec is pointed at the same files; array_record's own GCS
client reads shards from a tiny local HTTP server speaking the GCS JSON media API (through
CLOUD_STORAGE_EMULATOR_ENDPOINT, the variable its tests use).
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.parse
from http import server

import numpy as np
import pytest

from test_train import TINY  # prepared (vocab + both phases' data): conftest.py


def _emulator(root: str):
  class Handler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
      url = urllib.parse.urlparse(self.path)
      m = re.match(r"^(?:/download)?/storage/v1/b/([^/]+)/o/(.+)$", url.path)
      path = (os.path.join(root, "gs:", m.group(1), urllib.parse.unquote(m.group(2)))
              if m else "")
      if not os.path.isfile(path):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      with open(path, "rb") as f:
        data = f.read()
      start, end, status = 0, len(data) - 1, 200
      wanted = self.headers.get("Range") or ""
      if (last := re.fullmatch(r"bytes=-(\d+)", wanted)):
        start, status = max(0, len(data) - int(last.group(1))), 206
      elif (span := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
        start, status = int(span.group(1)), 206
        end = min(end, int(span.group(2))) if span.group(2) else end
      body = data[start:end + 1]
      self.send_response(status)
      self.send_header("Content-Type", "application/octet-stream")
      self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      del args

  srv = server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  return srv


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """Yields the local directory that holds gs://fake-bucket."""
  from etils.epath import testing
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.chdir(tmp_path)

  def kvstore(path: str) -> dict:
    bucket, _, key = path[len("gs://"):].partition("/")
    local = os.path.join(str(tmp_path), "gs:", bucket, key)
    # The file driver wants a trailing slash on a directory (an ocdbt base), none on the one
    # single-file key orbax writes this way (the _sharding table).
    return {"driver": "file", "path": local if key.endswith("_sharding") else local + "/"}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  # orbax asks google-cloud-storage (not installed here) whether the bucket is hierarchical.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  srv = _emulator(str(tmp_path))
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
  bucket = tmp_path / "gs:" / "fake-bucket"
  bucket.mkdir(parents=True)
  with testing.mock_epath():
    yield bucket
  srv.shutdown()


def test_fileio_atomic_writes_on_gs(fake_gcs):
  from bert_jax.storage import fileio
  (fake_gcs / "a").mkdir()  # a local "bucket" needs the directory that GCS does not
  fileio.write_json_atomic("gs://fake-bucket/a/b.json", {"x": 1})
  assert json.loads((fake_gcs / "a" / "b.json").read_text()) == {"x": 1}
  assert not (fake_gcs / "a" / "b.json.tmp").exists()
  fileio.copy_atomic(str(fake_gcs / "a" / "b.json"), "gs://fake-bucket/c.json")
  assert (fake_gcs / "c.json").read_text() == (fake_gcs / "a" / "b.json").read_text()
  assert fileio.is_remote("gs://fake-bucket/c.json") and not fileio.is_remote("/tmp/x")
  local = fileio.local_copy("gs://fake-bucket/c.json")
  assert os.path.isabs(local) and open(local).read() == (fake_gcs / "c.json").read_text()


def test_metric_writer_on_gs_rewrites_and_truncates(fake_gcs):
  from bert_jax.pretraining.metric_writer import MetricWriter
  w = MetricWriter("gs://fake-bucket/run", stream=open(os.devnull, "w"), upload_secs=0)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step}, phase=0, seq_len=32)
  w.close()
  path = fake_gcs / "run" / "metrics.jsonl"
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
  assert any((fake_gcs / "run" / "tensorboard").iterdir())  # event files were copied up
  w = MetricWriter("gs://fake-bucket/run", resume_step=2, stream=open(os.devnull, "w"),
                   upload_secs=3600)
  w.write(3, {"loss": 0.5}, phase=0, seq_len=32)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]  # not yet
  w.close()
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow  # two pretraining runs
def test_pretrain_on_gs_writes_bucket_and_resumes(prepared, fake_gcs):
  import shutil
  from bert_jax.pretraining import train
  vocab, (d32, d64) = prepared
  shutil.copyfile(vocab, fake_gcs / "vocab.txt")
  for name, src in (("d32", d32), ("d64", d64)):
    shutil.copytree(src, fake_gcs / "data" / name)

  def args(total):
    return ["--config", TINY, "--workdir", "gs://fake-bucket/run",
            f"--config.total_steps={total}", "--config.data.vocab=gs://fake-bucket/vocab.txt",
            "--config.phases.0.seq_len=32", "--config.phases.0.max_predictions=5",
            "--config.phases.0.batch_size=4", "--config.phases.0.data=gs://fake-bucket/data/d32",
            "--config.phases.1.seq_len=64", "--config.phases.1.max_predictions=10",
            "--config.phases.1.batch_size=2", "--config.phases.1.data=gs://fake-bucket/data/d64",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep_last=10",
            "--config.checkpoint.async_save=false", "--config.log_every=1",
            "--config.eval_every=0", "--config.optim.warmup_steps=2",
            "--config.data.dynamic_masking=False"]

  # Phases split 9:1, so 10 steps are 9 at length 32 and 1 at 64 (both data dirs are read).
  assert train.main(args(6)) == 0
  run = fake_gcs / "run"
  for name in ("config.json", "config.pretrain.json", "vocab.txt", "metrics.jsonl"):
    assert (run / name).is_file(), name
  assert (run / "vocab.txt").read_bytes() == open(vocab, "rb").read()
  assert json.loads((run / "config.json").read_text())["vocab_size"] >= 1
  steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
  assert steps[-1] == 6
  assert (run / "checkpoints" / "6" / "params").is_dir()
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]

  # A rerun with a longer schedule resumes from step 6 in the bucket.
  assert train.main(args(10)) == 0
  steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
  assert steps[-1] == 10
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == list(range(1, 11))  # 1-6 kept, 7-10 appended by the resumed run
  assert {r["phase"] for r in rows} == {0, 1}

  # The checkpoint loads back through load_pretrained from its gs:// workdir.
  from bert_jax.convert import load_pretrained
  from bert_jax.tokenizer import find_vocab
  config, params = load_pretrained("gs://fake-bucket/run")
  assert config.num_hidden_layers == 2
  assert open(find_vocab("gs://fake-bucket/run/checkpoints/10")).read() == \
      (run / "vocab.txt").read_text()
  emb = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
  assert np.isfinite(emb).all() and emb.shape[0] == config.vocab_size


def test_missing_gs_data_is_a_user_error(prepared, fake_gcs):
  from bert_jax.data.records import read_manifest
  from bert_jax.errors import UserError
  with pytest.raises(UserError, match="gs://fake-bucket/nothing: not found"):
    read_manifest("gs://fake-bucket/nothing")
