"""`bert-jax create-data`: documents -> instances in array_record shards + manifest: MLM + NSP
sentence pairs (--objective mlm_nsp, instances.py) or MLM-only packed rows (--objective mlm,
full_sentences.py).

Determinism whatever --workers: documents are grouped into chunks by a rule that depends only
on the document stream (CHUNK_DOCUMENTS documents or CHUNK_CHARS characters), and every chunk
is processed alone with random generators seeded from (seed, split, chunk index). The random
"next sentence" of an NSP pair comes from another document of the same chunk. Chunks run in a
process pool, and their records are written in chunk order, so the bytes do not depend on
scheduling; memory holds a few chunks per worker, however large the corpus.

Writes are atomic: shards are written under `*.tmp` names and renamed at the end, and
manifest.json is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from bert_jax.data import full_sentences, masking, records, row_records
from bert_jax.data import instances as inst_lib
from bert_jax.data.shards import RECORDS_PER_SHARD, SplitWriter, prepare_output_dir
from bert_jax.errors import UserError, cli_entry
from bert_jax.storage.fileio import check_writable, write_json_atomic

CHUNK_DOCUMENTS = 1000
CHUNK_CHARS = 256 << 10
SPLIT_CODES = {"train": 0, "eval": 1}
OBJECTIVES = ("mlm_nsp", "mlm")   # sentence pairs for MLM + NSP | packed rows for MLM only
_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


class Job(NamedTuple):
  split: str
  index: int
  documents: list[list[str]]


class ChunkResult(NamedTuple):
  split: str
  index: int
  num_documents: int
  num_tokens: int              # tokens in the instances written
  records: list[bytes]
  input_tokens: int            # tokens of the chunk's documents
  nsp: tuple[int, int, int] = (0, 0, 0)  # random-next Bs: all, forced, from the same document
  tail: object = None          # objective mlm: full_sentences.Stream after the last full row


# -- the work on one chunk (runs in a worker process) -------------------------------------

_WORKER: dict = {}


def _init_worker(params: dict, in_pool: bool = False) -> None:
  from bert_jax.tokenizer import load_tokenizer
  if in_pool:   # the pool's processes are the parallelism: no tokenizer threads on top
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  tok = load_tokenizer(params["vocab_path"], params["lower_case"])
  _WORKER.clear()
  _WORKER.update(params=params, tok=tok, pool=masking.random_token_pool(
      tok.vocab_size, (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)))


def _chunk_rngs(seed: int, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
  entropy = [seed, SPLIT_CODES[split], index]
  py_seed = np.random.SeedSequence(entropy + [0]).generate_state(2, np.uint64)
  return random.Random(int(py_seed[0]) << 64 | int(py_seed[1])), \
      np.random.default_rng(np.random.SeedSequence(entropy + [1]))


def _jieba():
  try:
    import jieba
  except ImportError:
    raise UserError("--whole-word-mask on Chinese text needs the jieba segmenter: "
                    "pip install 'bert-jax[zh]'") from None
  jieba.setLogLevel(60)
  return jieba


def chinese_word_continuation(tok, text: str) -> tuple[list[int], np.ndarray]:
  """Token ids of `text` and, per token, whether it continues the previous token's word,
  with words from jieba (so the characters of a Chinese word group like ## pieces)."""
  ids, offsets = tok.encode_with_offsets(text)
  word_of_char = np.zeros(len(text) + 1, np.int64)
  position = 0
  for number, word in enumerate(_jieba().cut(text)):
    word_of_char[position:position + len(word)] = number
    position += len(word)
  words = word_of_char[[start for start, _ in offsets]] if offsets else np.zeros(0, np.int64)
  continuation = np.zeros(len(ids), bool)
  continuation[1:] = words[1:] == words[:-1]
  continuation |= tok.continuation_mask[np.asarray(ids, np.int64)] if ids else False
  return ids, continuation


def _tokenize(tok, documents: list[list[str]], whole_word: bool):
  flat = [sentence for document in documents for sentence in document]
  encoded = tok.encode_batch(flat)
  continuation = None
  if whole_word:
    continuation = []
    for k, (text, ids) in enumerate(zip(flat, encoded)):
      if _CJK_RE.search(text):
        encoded[k], cont = chinese_word_continuation(tok, text)
      else:
        cont = tok.continuation_mask[np.asarray(ids, np.int64)] if ids else np.zeros(0, bool)
      continuation.append(cont)
  per_doc_ids, per_doc_cont, k = [], [], 0
  for document in documents:
    per_doc_ids.append(encoded[k:k + len(document)])
    if continuation is not None:
      per_doc_cont.append(continuation[k:k + len(document)])
    k += len(document)
  return per_doc_ids, (per_doc_cont if whole_word else None)


def process_chunk(job: Job) -> ChunkResult:
  params, tok, pool = _WORKER["params"], _WORKER["tok"], _WORKER["pool"]
  py_rng, np_rng = _chunk_rngs(params["seed"], job.split, job.index)
  doc_ids, doc_cont = _tokenize(tok, job.documents, params["whole_word_mask"])
  chunk = inst_lib.build_chunk(doc_ids, doc_cont)
  if not chunk.sentence_bounds:
    return ChunkResult(job.split, job.index, len(job.documents), 0, [], 0)
  if params["objective"] == "mlm":
    out, tokens, tail = full_sentences.chunk_records(chunk, np_rng, params, tok, pool)
    return ChunkResult(job.split, job.index, len(job.documents), tokens, out, len(chunk.ids),
                       tail=tail)
  nsp_counts = {"forced_random": 0, "random_same_document": 0}
  spans = inst_lib.chunk_pairs(chunk, py_rng, max_seq_length=params["max_seq_length"],
                               short_seq_prob=params["short_seq_prob"],
                               dupe_factor=params["dupe_factor"], counts=nsp_counts)
  rows = inst_lib.assemble(chunk, spans, cls_id=tok.cls_id, sep_id=tok.sep_id)
  out = row_records.to_records(rows, spans.is_random_next, np_rng, params, tok, pool)
  nsp = (int(spans.is_random_next.sum()), nsp_counts["forced_random"],
         nsp_counts["random_same_document"])
  return ChunkResult(job.split, job.index, len(job.documents), int(rows.lengths.sum()), out,
                     len(chunk.ids), nsp)


# -- chunking, the pool, the shards -------------------------------------------------------


def eval_document(document: list[str], eval_fraction: float) -> bool:
  """Deterministic hold-out by a hash of the document's text."""
  if eval_fraction <= 0:
    return False
  digest = hashlib.blake2b("\n".join(document).encode("utf-8", "replace"), digest_size=8).digest()
  return int.from_bytes(digest, "little") < eval_fraction * 2.0**64


def make_jobs(documents: Iterable[list[str]], eval_fraction: float) -> Iterator[Job]:
  pending = {split: ([], 0) for split in SPLIT_CODES}
  next_index = dict.fromkeys(SPLIT_CODES, 0)
  for document in documents:
    split = "eval" if eval_document(document, eval_fraction) else "train"
    docs, chars = pending[split]
    docs.append(document)
    chars += sum(map(len, document))
    if len(docs) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
      yield Job(split, next_index[split], docs)
      next_index[split] += 1
      docs, chars = [], 0
    pending[split] = (docs, chars)
  for split, (docs, _) in pending.items():
    if docs:
      yield Job(split, next_index[split], docs)


def _start_method() -> str:
  """fork (fast: workers inherit the imports) unless this process already runs JAX's
  threads (e.g. create-data called from the training loop), where forking can deadlock."""
  if "fork" not in multiprocessing.get_all_start_methods():
    return "spawn"
  if "jax" in sys.modules:
    try:
      from jax._src import xla_bridge
      if xla_bridge.backends_are_initialized():
        return "spawn"
    except (ImportError, AttributeError):
      return "spawn"
  return "fork"


def _run_jobs(jobs: Iterator[Job], params: dict, workers: int) -> Iterator[ChunkResult]:
  """Results in job order; at most 2 jobs per worker in flight (bounded memory)."""
  if workers <= 1:
    _init_worker(params)
    for job in jobs:
      yield process_chunk(job)
    return
  with multiprocessing.get_context(_start_method()).Pool(workers, _init_worker, (params, True)) as pool:
    in_flight: collections.deque = collections.deque()
    for job in jobs:
      in_flight.append(pool.apply_async(process_chunk, (job,)))
      if len(in_flight) >= 2 * workers:
        yield in_flight.popleft().get()
    while in_flight:
      yield in_flight.popleft().get()


def _validate(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
              short_seq_prob, eval_fraction, workers, num_shards, objective,
              doc_sentences) -> None:
  if objective not in OBJECTIVES:
    raise UserError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
  if doc_sentences and objective != "mlm":
    raise UserError("--doc-sentences: packs rows for --objective mlm only")
  if max_seq_length < 8:
    raise UserError(f"--max-seq-length {max_seq_length}: expected at least 8 "
                    "([CLS] A [SEP] B [SEP] needs room for text)")
  if max_seq_length > 65535:
    raise UserError(f"--max-seq-length {max_seq_length}: expected at most 65535")
  if not 1 <= max_predictions_per_seq <= max_seq_length:
    raise UserError(f"--max-predictions-per-seq {max_predictions_per_seq}: expected 1.."
                    f"{max_seq_length} (the sequence length)")
  if not 0.0 < masked_lm_prob < 1.0:
    raise UserError(f"--masked-lm-prob {masked_lm_prob}: expected a fraction in (0, 1)")
  if dupe_factor < 1:
    raise UserError(f"--dupe-factor {dupe_factor}: expected at least 1")
  if not 0.0 <= short_seq_prob <= 1.0:
    raise UserError(f"--short-seq-prob {short_seq_prob}: expected a probability in [0, 1]")
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f"--eval-fraction {eval_fraction}: expected a fraction in [0, 1)")
  if workers is not None and workers < 1:
    raise UserError(f"--workers {workers}: expected at least 1")
  if num_shards is not None and num_shards < 1:
    raise UserError(f"--num-shards {num_shards}: expected at least 1")


def nsp_warnings(instances: int, random_next: int, forced: int, same_document: int) -> list[str]:
  """One-line warnings when the corpus's shape weakens next-sentence prediction."""
  out = []
  if instances and forced > instances / 3:  # short documents alone give ~10-20%
    out.append(f"NSP: {forced:,} of {instances:,} instances ({forced / instances:.0%}) got a "
               f"random B because their segment was one sentence, so {random_next / instances:.0%}"
               " of the labels are 'random next' instead of about 50%: one-sentence documents "
               "(bert format: one sentence per line, a blank line between documents), or "
               "sentences about as long as --max-seq-length?")
  if random_next and same_document > 0.05 * random_next:
    out.append(f"NSP: {same_document:,} of {random_next:,} random-next Bs "
               f"({same_document / random_next:.0%}) come from the same document as A, since "
               "no other document was at hand (one huge document?); separate the documents "
               "with blank lines")
  return out


def default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _no_training_data(inputs, eval_fraction: float, eval_documents: int) -> UserError:
  if eval_documents:
    return UserError(f"--eval-fraction {eval_fraction}: all {eval_documents} documents went to "
                     "the eval split, none to training; lower --eval-fraction or give more "
                     "documents")
  return UserError(f"--input {', '.join(map(str, _as_list(inputs)))}: produced no instances "
                   "(no text that the vocab tokenises)")


def create_data(inputs, vocab_path, output_dir, *, max_seq_length=128, max_predictions_per_seq=20,
                masked_lm_prob=0.15, dupe_factor=10, short_seq_prob=0.1, seed=12345,
                whole_word_mask=False, workers=None, lower_case=None, input_format="auto",
                eval_fraction=0.0, num_shards=None, static_masking=True, progress=True,
                text_field=None, allow_replaced_bytes=False, objective="mlm_nsp",
                doc_sentences=False) -> dict:
  """Writes instances to `output_dir` (see the module docstring); returns the manifest.

  Suspect but usable input (a few non-UTF-8 bytes, documents too short or too few for NSP)
  gives one-line warnings, and their counts go into the manifest."""
  from bert_jax.data.corpus import CorpusStats, iter_documents
  from bert_jax.tokenizer import load_tokenizer
  _validate(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
            short_seq_prob, eval_fraction, workers, num_shards, objective, doc_sentences)
  workers = workers or default_workers()
  vocab_path = os.fspath(vocab_path)
  output_dir = os.fspath(output_dir)
  check_writable(output_dir, "--output")
  tok = load_tokenizer(vocab_path, lower_case)   # validates the vocab before any work
  try:
    pool = masking.random_token_pool(tok.vocab_size, (tok.pad_id, tok.unk_id, tok.cls_id,
                                                      tok.sep_id, tok.mask_id))
  except UserError as e:
    raise UserError(f"--vocab {vocab_path}: {e}") from None
  stats = CorpusStats()
  documents = iter_documents(inputs, input_format=input_format, text_field=text_field, stats=stats,
                             allow_replaced_bytes=allow_replaced_bytes)
  created_dir = not os.path.exists(output_dir)
  prepare_output_dir(output_dir)
  params = dict(vocab_path=vocab_path, lower_case=tok.lower_case, seed=int(seed),
                max_seq_length=int(max_seq_length),
                max_predictions_per_seq=int(max_predictions_per_seq),
                masked_lm_prob=float(masked_lm_prob), dupe_factor=int(dupe_factor),
                short_seq_prob=float(short_seq_prob), whole_word_mask=bool(whole_word_mask),
                static_masking=bool(static_masking), objective=objective,
                doc_sentences=bool(doc_sentences))
  writers = {split: SplitWriter(output_dir, split, num_shards) for split in SPLIT_CODES}
  packers = {split: full_sentences.TailPacker(params, tok, pool, split, code)  # MLM tails
             for split, code in SPLIT_CODES.items()}
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(unit="doc", desc="create-data", file=sys.stderr, dynamic_ncols=True)
  started = time.perf_counter()
  try:
    for result in _run_jobs(make_jobs(documents, eval_fraction), params, workers):
      for res in (result, packers[result.split].add(result.tail, result.index, ChunkResult)):
        writers[result.split].add(res)
      if bar is not None:
        bar.update(result.num_documents)
        bar.set_postfix(instances=sum(w.num_instances for w in writers.values()), refresh=False)
    for split, packer in packers.items():   # the split's last row, into its last shard
      writers[split].add(packer.finish((num_shards or 1) - 1, ChunkResult))
    shards = {split: w.finish() for split, w in writers.items()}
    if writers["train"].num_instances == 0:
      raise _no_training_data(inputs, eval_fraction, writers["eval"].num_documents)
  except BaseException:
    for w in writers.values():     # leave nothing behind that a rerun would have to explain
      for index, writer in enumerate(w.writers):
        writer.close()
        if os.path.exists(w._tmp_path(index)):
          os.remove(w._tmp_path(index))
      for name in w.names:         # finished shards of a run refused at the end
        os.remove(os.path.join(output_dir, name))
    if created_dir and not os.listdir(output_dir):
      os.rmdir(output_dir)
    raise
  finally:
    if bar is not None:
      bar.close()
  splits = {}
  for split, w in writers.items():
    if split == "train" or w.num_instances:
      splits[split] = dict(num_instances=w.num_instances, num_documents=w.num_documents,
                           num_tokens=w.num_tokens, num_input_tokens=w.input_tokens,
                           shards=shards[split])
      if objective == "mlm_nsp":
        splits[split].update(random_next=w.nsp[0], forced_random_next=w.nsp[1],
                             random_next_same_document=w.nsp[2])
  nsp_totals = [sum(w.nsp[k] for w in writers.values()) for k in range(3)]
  notes = nsp_warnings(sum(w.num_instances for w in writers.values()), *nsp_totals)
  for note in notes:
    warnings.warn(note, inst_lib.NSPWarning, stacklevel=2)
  manifest = dict(
      format=records.FORMAT_NAME, format_version=records.FORMAT_VERSION,
      created_by="bert-jax create-data", splits=splits,
      inputs=[str(i) for i in _as_list(inputs)], input_format=input_format,
      eval_fraction=float(eval_fraction), num_shards=num_shards,
      seconds=round(time.perf_counter() - started, 3),
      corpus=dict(documents=stats.documents, sentences=stats.sentences,
                  characters=stats.characters, bytes=stats.bytes, bad_bytes=stats.bad_bytes,
                  files_with_bad_bytes=stats.files_with_bad_bytes[:100],
                  allow_replaced_bytes=bool(allow_replaced_bytes),
                  long_lines_split=stats.long_lines_split),
      warnings=notes,
      vocab=dict(path=os.path.abspath(vocab_path), sha256=_sha256(vocab_path),
                 size=tok.vocab_size, lower_case=tok.lower_case, pad_id=tok.pad_id,
                 unk_id=tok.unk_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id),
      **{k: v for k, v in params.items() if k not in ("vocab_path", "lower_case")})
  write_json_atomic(os.path.join(output_dir, records.MANIFEST), manifest)
  return manifest


def _as_list(inputs) -> list:
  return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="bert-jax create-data",
      description="Create pretraining instances (array_record shards + manifest): masked-LM + "
                  "next-sentence pairs, or packed masked-LM rows (--objective mlm).")
  p.add_argument("--input", action="append", required=True,
                 help="file, directory, glob, tfds:NAME[:SPLIT] or sample[:en|:zh]; repeatable")
  p.add_argument("--vocab", required=True, help="WordPiece vocab.txt")
  p.add_argument("--output", required=True, help="output directory (new, or an incomplete run)")
  p.add_argument("--objective", choices=OBJECTIVES, default="mlm_nsp",
                 help="mlm_nsp: [CLS] A [SEP] B [SEP] pairs with NSP labels; mlm: one segment, "
                 "contiguous sentences packed into full rows across documents ([SEP] between)")
  p.add_argument("--doc-sentences", action="store_true",
                 help="objective mlm: rows stay within a document (its last row is short)")
  p.add_argument("--max-seq-length", type=int, default=128)
  p.add_argument("--max-predictions-per-seq", type=int, default=20)
  p.add_argument("--masked-lm-prob", type=float, default=0.15)
  p.add_argument("--dupe-factor", type=int, default=10,
                 help="passes over the corpus, each with different pairs and masks")
  p.add_argument("--short-seq-prob", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=12345)
  p.add_argument("--whole-word-mask", action="store_true",
                 help="mask whole words (## pieces; Chinese words from jieba)")
  p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
  p.add_argument("--lower-case", action=argparse.BooleanOptionalAction, default=None,
                 help="default: inferred from the vocab")
  p.add_argument("--input-format", choices=("auto", "bert", "text"), default="auto")
  p.add_argument("--text-field", default=None, help="the field holding the text: of each line "
                 "of a JSON lines input (required there), of a tfds record (default text)")
  p.add_argument("--eval-fraction", type=float, default=0.0,
                 help="fraction of documents held out (by hash) as the eval split")
  p.add_argument("--num-shards", type=int, default=None,
                 help=f"shards per split (default: one per {RECORDS_PER_SHARD} instances)")
  p.add_argument("--no-static-masking", dest="static_masking", action="store_false",
                 help="store unmasked instances; the input pipeline masks them afresh each epoch")
  p.add_argument("--allow-replaced-bytes", action="store_true",
                 help="go on when over 1%% of a file's bytes are not UTF-8 (they become U+FFFD)")
  p.add_argument("--no-progress", dest="progress", action="store_false")
  return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  manifest = create_data(
      args.input, args.vocab, args.output, max_seq_length=args.max_seq_length,
      max_predictions_per_seq=args.max_predictions_per_seq, masked_lm_prob=args.masked_lm_prob,
      dupe_factor=args.dupe_factor, short_seq_prob=args.short_seq_prob, seed=args.seed,
      whole_word_mask=args.whole_word_mask, workers=args.workers, lower_case=args.lower_case,
      input_format=args.input_format, eval_fraction=args.eval_fraction,
      num_shards=args.num_shards, static_masking=args.static_masking, progress=args.progress,
      text_field=args.text_field, allow_replaced_bytes=args.allow_replaced_bytes,
      objective=args.objective, doc_sentences=args.doc_sentences)
  counts = ", ".join(f"{split}: {info['num_instances']} instances in {len(info['shards'])} shard(s)"
                     for split, info in manifest["splits"].items())
  print(f"wrote {args.output}: {counts}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
