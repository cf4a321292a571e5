"""Extractive QA (SQuAD v1.1/v2.0, CMRC 2018, DRCD): reading, windowing, answer extraction.

The pipeline keeps character offsets from end to end, so an answer goes back to the user as
the original context substring (its case, accents, spacing and full-width punctuation):

  read_squad(path)        -> [QAExample]     SQuAD JSON (CMRC 2018 and DRCD use the same layout)
  featurize(examples, tok) -> QAFeatures     each distinct context is tokenised once, with offsets,
                                             then windows of `max_seq_length` slide over its
                                             tokens `doc_stride` apart:
                                             [CLS] question [SEP] context window [SEP]
  postprocess(examples, features, start_logits, end_logits) -> {id: answer text}

Answer positions. Some public files carry small position errors, and `read_squad` accepts
them deliberately:
  * CMRC 2018 dev gives extra reference answers with `answer_start: -1` whose text is not in
    the context (e.g. with a period added). They are kept as references for evaluation and
    never used as a training target.
  * CMRC 2018 trial/dev have answers whose `answer_start` is off by one or two characters.
    When the text occurs within ANSWER_START_TOLERANCE characters of the given start, the
    start is moved to the nearest occurrence.
Any other answer whose text is not at (or near) its answer_start is an error naming the file
and the question id: a training target that points at the wrong text silently ruins training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from bert_jax.errors import UserError
from bert_jax.finetune import qa_windows

# How far (in characters) a stated answer_start may be from where the text really is.
ANSWER_START_TOLERANCE = 16
# answer_start value that means "position unknown: a reference text only" (CMRC 2018 dev).
UNKNOWN_START = -1


@dataclasses.dataclass
class QAExample:
  """One question over one context. `answers` are {"text", "answer_start"} dicts; an answer
  with answer_start == -1 is a reference text for evaluation only."""
  id: str
  question: str
  context: str
  answers: list[dict[str, Any]]
  is_impossible: bool = False
  title: str = ""
  source: str = ""  # the file it came from, for error messages

  def answer_char_span(self) -> tuple[int, int] | None:
    """[start, end) of the first answer with a known position: the training target."""
    for answer in self.answers:
      start = answer["answer_start"]
      if start >= 0:
        return start, start + len(answer["text"])
    return None


# -- reading ---------------------------------------------------------------------------------

def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  if not isinstance(mapping, dict) or key not in mapping:
    raise UserError(f"{where}: missing field {key!r}")
  value = mapping[key]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
    name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise UserError(f"{where}: field {key!r} should be {name}, got {type(value).__name__}")
  return value


def _locate_answer(context: str, text: str, start: int) -> int | None:
  """The corrected answer_start, UNKNOWN_START for a reference-only answer, None if wrong."""
  if start >= 0 and context[start:start + len(text)] == text:
    return start
  if start == UNKNOWN_START:
    return UNKNOWN_START
  nearest = None
  lo = max(0, start - ANSWER_START_TOLERANCE)
  hit = context.find(text, lo)
  while hit != -1 and hit <= start + ANSWER_START_TOLERANCE:
    if nearest is None or abs(hit - start) < abs(nearest - start):
      nearest = hit
    hit = context.find(text, hit + 1)
  return nearest


def parse_squad(data: Any, source: str = "<squad>") -> list[QAExample]:
  """Examples from an already-loaded SQuAD-layout JSON object; see `read_squad`."""
  articles = _require(data, "data", list, f"{source}: top level")
  examples: list[QAExample] = []
  seen: set[str] = set()
  for a_index, article in enumerate(articles):
    where = f"{source}: data[{a_index}]"
    title = article.get("title", "") if isinstance(article, dict) else ""
    for p_index, paragraph in enumerate(_require(article, "paragraphs", list, where)):
      p_where = f"{where}.paragraphs[{p_index}]"
      context = _require(paragraph, "context", str, p_where)
      for q_index, qa in enumerate(_require(paragraph, "qas", list, p_where)):
        q_where = f"{p_where}.qas[{q_index}]"
        qid = str(_require(qa, "id", (str, int), q_where))
        q_where = f"{source}: question id {qid!r}"
        if qid in seen:
          raise UserError(f"{q_where}: duplicate id (predictions are keyed by id)")
        seen.add(qid)
        question = _require(qa, "question", str, q_where)
        is_impossible = qa.get("is_impossible", False)
        if not isinstance(is_impossible, bool):
          raise UserError(f"{q_where}: field 'is_impossible' should be true or false")
        answers = []
        # an unanswerable (v2.0) question may leave out "answers"; any other must list them
        listed = [] if is_impossible and "answers" not in qa else _require(
            qa, "answers", list, q_where)
        for n, answer in enumerate(listed):
          a_where = f"{q_where} answers[{n}]"
          text = _require(answer, "text", str, a_where)
          start = _require(answer, "answer_start", int, a_where)
          located = _locate_answer(context, text, start)
          if located is None:
            found = context.find(text)
            hint = f"it occurs at {found}" if found >= 0 else "it does not occur in the context"
            raise UserError(f"{a_where}: answer text {text[:40]!r} is not at answer_start "
                            f"{start} ({hint})")
          answers.append({"text": text, "answer_start": located})
        examples.append(QAExample(id=qid, question=question, context=context, answers=answers,
                                  is_impossible=is_impossible, title=str(title), source=source))
  if not examples:
    raise UserError(f"{source}: no questions (expected SQuAD JSON: data -> paragraphs -> qas)")
  return examples


def read_squad(path: str | os.PathLike) -> list[QAExample]:
  """Reads a SQuAD v1.1/v2.0 JSON file (also CMRC 2018 and DRCD). Bad input -> UserError."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"QA file {path}: not found")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise UserError(f"QA file {path}: empty file (expected SQuAD JSON)")
  try:
    data = json.loads(raw.decode("utf-8-sig"))
  except UnicodeDecodeError as e:
    raise UserError(f"QA file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"QA file {path}: not JSON ({e.msg} at line {e.lineno})") from None
  return parse_squad(data, source=path)


# -- features --------------------------------------------------------------------------------

@dataclasses.dataclass
class QAFeatures:
  """One row per (example, window). Arrays are numpy; L = max_seq_length.

  input_ids, token_type_ids, attention_mask: int32 [N, L]
  start_positions, end_positions: int32 [N] answer token indices in the row of the example's
      first located answer (0 = [CLS]: the window lacks it, the question is impossible, or it
      has no answer with a position, as a test file)
  example_index: int32 [N] index into the examples list
  token_to_char: int32 [N, L, 2] [start, end) character offsets into the context; -1 for
      [CLS], question, [SEP] and padding
  token_is_max_context: bool [N, L] True where this row gives the token its most context
  answer_lengths: int32 [examples with a located answer] the first answer's length in tokens
  answers_in_no_window: how many of those answers no window holds whole (never predictable)
"""
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  attention_mask: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_index: np.ndarray
  token_to_char: np.ndarray
  token_is_max_context: np.ndarray
  answer_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  answers_in_no_window: int = 0

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def context_mask(self) -> np.ndarray:
    """bool [N, L]: the tokens an answer may start or end on."""
    return self.token_to_char[..., 0] >= 0

  def model_inputs(self, rows: Sequence[int] | slice | None = None) -> dict[str, np.ndarray]:
    rows = slice(None) if rows is None else rows
    return {"input_ids": self.input_ids[rows], "token_type_ids": self.token_type_ids[rows],
            "attention_mask": self.attention_mask[rows]}


def featurize(examples: Sequence[QAExample], tokenizer, *, max_seq_length: int = 384,
              doc_stride: int = 128, max_query_length: int = 64,
              is_training: bool) -> QAFeatures:
  """Windows over each example's context tokens; see QAFeatures for the arrays.

  Rows get the token positions of the example's first located answer, or 0 when the window
  does not hold the whole answer (or the question is impossible); `is_training` requires every
  possible question to have one. All questions
  and each distinct context are tokenised in one batch; the rows are filled with whole-array
  numpy (qa_windows), not per example or window.
  """
  if doc_stride < 1:
    raise UserError(f"--doc-stride: expected a positive number of tokens, got {doc_stride}")
  if max_query_length < 1:
    raise UserError(f"--max-query-length: expected a positive number, got {max_query_length}")
  if not examples:
    raise UserError("QA data: no examples to featurize")
  seq_len = max_seq_length
  contexts: dict[str, int] = {}
  context_of = np.asarray([contexts.setdefault(e.context, len(contexts)) for e in examples])
  docs = tokenizer.encode_ragged(list(contexts), offsets=True)
  queries = tokenizer.encode_ragged([e.question for e in examples])
  query_len = np.minimum(queries.lengths, max_query_length)
  header = query_len + 2                                   # [CLS] question [SEP]
  max_doc = seq_len - header - 1
  no_room = np.flatnonzero(max_doc < 1)
  checked = examples[:no_room[0] + 1] if len(no_room) else examples  # errors in file order
  spans = qa_windows.training_spans(checked, is_training)
  if len(no_room):
    example = examples[no_room[0]]
    raise UserError(f"{example.source or 'QA data'}: question id {example.id!r}: its "
                    f"{int(query_len[no_room[0]])} question tokens leave no room for the "
                    f"context in --max-seq-length {seq_len} (lower --max-query-length)")
  first_answer, last_answer = qa_windows.answer_tokens(spans, docs, context_of)
  n_doc = docs.lengths[context_of]
  example, start, length = qa_windows.windows(n_doc, max_doc, doc_stride)
  input_ids, token_type_ids, attention_mask, token_to_char = qa_windows.fill_rows(
      tokenizer, seq_len, queries, query_len, docs, context_of, example, start, length)
  own_lo, own_hi = qa_windows.max_context_spans(n_doc, max_doc, doc_stride, example, start)
  column = header[example] - start                         # + context token = its column
  position = np.arange(seq_len)
  token_is_max_context = ((position >= (own_lo + column)[:, None])
                          & (position < (own_hi + column)[:, None]))

  located = first_answer >= 0
  first, last = first_answer[example], last_answer[example]
  holds = located[example] & (start <= first) & (last < start + length)
  return QAFeatures(
      input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
      start_positions=np.where(holds, first + column, 0).astype(np.int32),
      end_positions=np.where(holds, last + column, 0).astype(np.int32),
      example_index=example.astype(np.int32), token_to_char=token_to_char,
      token_is_max_context=token_is_max_context,
      answer_lengths=(last_answer - first_answer + 1)[located].astype(np.int32),
      answers_in_no_window=int((located & (np.bincount(example, holds, len(examples)) == 0))
                               .sum()))


def coverage_warnings(features: QAFeatures, path: str, *, max_answer_length: int,
                      max_seq_length: int, doc_stride: int) -> list[str]:
  """One line each when the limits make gold answers unreachable: longer than
  --max-answer-length (Chinese counts a token per character), or in no window."""
  lengths = features.answer_lengths
  out = []
  if not len(lengths):
    return out
  longer = int((lengths > max_answer_length).sum())
  if longer:
    hint = int(np.percentile(lengths, 99.5))
    out.append(f"{path}: {longer} of {len(lengths)} gold answers ({longer / len(lengths):.1%})"
               f" are longer than --max-answer-length {max_answer_length} tokens (longest "
               f"{int(lengths.max())}) and can never be predicted; e.g. --max-answer-length "
               f"{max(hint, max_answer_length + 1)} keeps 99.5% of them")
  missed = features.answers_in_no_window
  if missed:
    out.append(f"{path}: {missed} of {len(lengths)} gold answers ({missed / len(lengths):.1%}) "
               f"fit in no window of --max-seq-length {max_seq_length} with --doc-stride "
               f"{doc_stride} (they train as no-answer and can never be predicted); raise "
               "--max-seq-length or lower --doc-stride")
  return out


# -- answers from logits ---------------------------------------------------------------------

def _softmax(x: np.ndarray) -> np.ndarray:
  if x.size == 0:
    return x
  e = np.exp(x - x.max())
  return e / e.sum()


def _feature_candidates(start_L: np.ndarray, end_L: np.ndarray, valid_start: np.ndarray,
                        valid_end: np.ndarray, n_best: int, max_answer_length: int):
  """(start, end, start_logit, end_logit) of the legal pairs among the n_best best starts and
  n_best best ends of one row."""
  starts = np.argsort(-start_L, kind="stable")[:n_best]
  ends = np.argsort(-end_L, kind="stable")[:n_best]
  s = starts[:, None]
  e = ends[None, :]
  legal = (valid_start[s] & valid_end[e] & (e >= s) & (e - s + 1 <= max_answer_length))
  si, ei = np.nonzero(legal)
  return [(int(starts[a]), int(ends[b]), float(start_L[starts[a]]), float(end_L[ends[b]]))
          for a, b in zip(si, ei)]


def postprocess(examples: Sequence[QAExample], features: QAFeatures, start_logits,
                end_logits, *, n_best: int = 20, max_answer_length: int = 30,
                version_2_with_negative: bool = False, null_score_diff_threshold: float = 0.0,
                return_nbest: bool = False):
  """Best answer text per example id, from [N, L] start/end logits over `features` rows.

  Candidates: the n_best highest starts x n_best highest ends in every window, kept when both
  are context tokens, end >= start, at most max_answer_length tokens, and the start token has
  its maximum context in that window; scored start_logit + end_logit. The answer is the
  original context substring between the start token's first and the end token's last char.
  With version_2_with_negative, "" is predicted when (null score - best span score) >
  null_score_diff_threshold, the null score being the lowest [CLS] start+end over windows.
  return_nbest=True returns (predictions, nbest, null_odds): nbest[id] is a list of
  {"text", "probability", "start_logit", "end_logit"} best first, null_odds[id] the null
  score minus the best span score (the value compared with the threshold).
  """
  start_NL = np.asarray(start_logits, dtype=np.float32)
  end_NL = np.asarray(end_logits, dtype=np.float32)
  if start_NL.shape != end_NL.shape or start_NL.shape[0] != len(features):
    raise ValueError(f"logits {start_NL.shape}/{end_NL.shape} do not match {len(features)} rows")
  width = min(start_NL.shape[1], features.input_ids.shape[1])
  context_NL = features.context_mask[:, :width]
  max_ctx_NL = features.token_is_max_context[:, :width]

  rows_of: dict[int, list[int]] = {}
  for row, example_index in enumerate(features.example_index):
    rows_of.setdefault(int(example_index), []).append(row)

  predictions: dict[str, str] = {}
  nbest_all: dict[str, list[dict[str, Any]]] = {}
  null_odds: dict[str, float] = {}
  for example_index, example in enumerate(examples):
    candidates = []  # (score, start_char, end_char, start_logit, end_logit)
    null_start = null_end = None
    for row in rows_of.get(example_index, []):
      start_L, end_L = start_NL[row, :width], end_NL[row, :width]
      null = float(start_L[0] + end_L[0])
      if null_start is None or null < null_start + null_end:
        null_start, null_end = float(start_L[0]), float(end_L[0])
      valid_start = context_NL[row] & max_ctx_NL[row]
      for s, e, s_logit, e_logit in _feature_candidates(
          start_L, end_L, valid_start, context_NL[row], n_best, max_answer_length):
        chars = features.token_to_char[row]
        candidates.append((s_logit + e_logit, int(chars[s, 0]), int(chars[e, 1]), s_logit,
                           e_logit))
    candidates.sort(key=lambda c: -c[0])

    nbest: list[dict[str, Any]] = []
    seen_texts: set[str] = set()
    for score, c_start, c_end, s_logit, e_logit in candidates:
      text = example.context[c_start:c_end]
      if text in seen_texts:
        continue  # the same text from another window or tokenisation: keep the best
      seen_texts.add(text)
      nbest.append({"text": text, "start_logit": s_logit, "end_logit": e_logit,
                    "score": score})
      if len(nbest) >= n_best:
        break
    best_span = nbest[0] if nbest else None
    if version_2_with_negative and null_start is not None and "" not in seen_texts:
      nbest.append({"text": "", "start_logit": null_start, "end_logit": null_end,
                    "score": null_start + null_end})
      nbest.sort(key=lambda c: -c["score"])
    probabilities = _softmax(np.array([c["score"] for c in nbest], dtype=np.float64))
    for candidate, p in zip(nbest, probabilities):
      candidate["probability"] = float(p)
      del candidate["score"]

    if best_span is None:
      answer, odds = "", float("inf")
    else:
      odds = (null_start + null_end) - (best_span["start_logit"] + best_span["end_logit"])
      answer = best_span["text"]
      if version_2_with_negative and odds > null_score_diff_threshold:
        answer = ""
    predictions[example.id] = answer
    nbest_all[example.id] = nbest
    null_odds[example.id] = odds
  if return_nbest:
    return predictions, nbest_all, null_odds
  return predictions


