"""Task file readers: classification tables (TSV/CSV/JSONL), token tagging (CoNLL), multiple
choice (SWAG CSV, {question, candidates, gold} JSON), each into plain records.

Bad input raises UserError naming the file and line (or record): a missing or ambiguous
column, a label spelt two ways, columns whose roles are surely swapped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Sequence

from bert_jax.errors import UserError

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question1", "question", "premise", "query",
                "utterance", "content", "review")
PAIR_COLUMNS = ("sentence2", "question2", "hypothesis", "passage", "context", "text_b")
LABEL_COLUMNS = ("label", "labels", "gold_label", "intent", "category", "class", "score",
                 "target")


# ----------------------------------------------------------------------------- classification

@dataclasses.dataclass
class TextRecord:
  text: str
  pair: str | None
  label: str | None
  line: int
  id: str | None = None  # the row's `id` field, which submissions are keyed by
  label_key: str | None = None  # the label's column, which names a submission's column


def _open_text(path: str):
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _pick_column(names: list[str], wanted: str | None, candidates: Sequence[str], what: str,
                 path: str, flag: str) -> str | None:
  if wanted is not None:
    if wanted in names:
      return wanted
    if wanted.isdigit() and int(wanted) < len(names):
      return names[int(wanted)]
    raise UserError(f"{path}: no {what} column {wanted!r} ({flag}); columns are "
                    f"{', '.join(names)}")
  lowered = {n.lower(): n for n in names}
  return next((lowered[c] for c in candidates if c in lowered), None)


def read_text_records(path: str, text_column: str | None = None,
                      pair_column: str | None = None, label_column: str | None = None,
                      max_rows: int | None = None) -> list[TextRecord]:
  """Rows of a TSV/CSV (header row optional) or JSONL file. Columns are found by name
  (sentence/text/sentence1..., sentence2/hypothesis..., label...) or given by name or index;
  a headerless file reads as text[, pair], label."""
  content = _open_text(path)
  lower = path.lower()
  if lower.endswith((".jsonl", ".json", ".ndjson")):
    rows, names = _jsonl_rows(path, content)
  else:
    delimiter = "," if lower.endswith(".csv") else "\t"
    table = list(csv.reader(content.splitlines(), delimiter=delimiter, quotechar='"'
                            if delimiter == "," else None, quoting=csv.QUOTE_MINIMAL
                            if delimiter == "," else csv.QUOTE_NONE))
    table = [(i + 1, r) for i, r in enumerate(table) if r and any(c.strip() for c in r)]
    if not table:
      raise UserError(f"{path}: empty file; expected rows of text and label")
    header = [c.strip() for c in table[0][1]]
    known = {c.lower() for c in (*TEXT_COLUMNS, *PAIR_COLUMNS, *LABEL_COLUMNS)}
    given = {c for c in (text_column, pair_column, label_column) if c and not c.isdigit()}
    headerless = not (any(h.lower() in known for h in header) or given & set(header))
    if not headerless:
      names, body = header, table[1:]
    else:  # no header: text[, pair], label
      width = len(header)
      names = [str(i) for i in range(width)]
      text_column = text_column or "0"
      label_column = label_column or str(width - 1)
      if width >= 3 and pair_column is None:
        pair_column = "1"
      body = table
    rows = []
    for line, r in body:
      if len(r) != len(names):
        raise UserError(f"{path}:{line}: {len(r)} fields; expected {len(names)} "
                        f"({', '.join(names)})")
      rows.append((line, dict(zip(names, r))))
  if not rows:
    raise UserError(f"{path}: no data rows")
  text_key = _pick_column(names, text_column, TEXT_COLUMNS, "text", path, "--text-column")
  if text_key is None:
    raise UserError(f"{path}: no text column among {', '.join(names)}; name it with "
                    "--text-column")
  pair_key = _pick_column(names, pair_column, PAIR_COLUMNS, "text-pair", path,
                          "--text-pair-column")
  label_key = _pick_column(names, label_column, LABEL_COLUMNS, "label", path, "--label-column")
  records = []
  for line, row in rows:
    text = row.get(text_key)
    if text is None or not str(text).strip():
      raise UserError(f"{path}:{line}: empty or missing text column {text_key!r}")
    label = row.get(label_key) if label_key else None
    records.append(TextRecord(str(text), None if pair_key is None else str(row.get(pair_key) or ""),
                              None if label is None else str(label).strip(), line,
                              None if row.get("id") is None else str(row["id"]), label_key))
    if max_rows and len(records) >= max_rows:
      break
  roles = (f"; a file without a header is read as text{', pair' if pair_key else ''}, label"
           if not lower.endswith((".jsonl", ".json", ".ndjson")) and headerless else "")
  _check_column_roles(records, path, text_key, label_key, roles)
  return records


def _check_column_roles(records: Sequence[TextRecord], path: str, text_key: str,
                        label_key: str | None, roles: str) -> None:
  """Refuses column roles that are surely swapped: numbers as the text (class ids), or a label
  column with a different value in most rows (text, e.g. a news description)."""
  fix = "name the columns with --text-column and --label-column (a name or 0-based index)"
  if len(records) >= 2 and all(_is_float(r.text.strip()) for r in records):
    raise UserError(f"{path}: the text column {text_key!r} holds only numbers (class ids?)"
                    f"{roles}; {fix}")
  labels = [r.label for r in records if r.label]
  distinct = len(set(labels))
  if labels and not _all_float(set(labels)) and distinct > max(20, len(labels) // 2):
    raise UserError(f"{path}: the label column {label_key!r} has {distinct} different values in "
                    f"{len(labels)} rows, so it looks like text{roles}; {fix}")


def _jsonl_rows(path: str, content: str):
  stripped = content.lstrip()
  if stripped.startswith("["):
    try:
      items = json.loads(content)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: not valid JSON ({e})") from None
    rows = [(i + 1, r) for i, r in enumerate(items)]
  else:
    rows = []
    for i, line in enumerate(content.splitlines()):
      if not line.strip():
        continue
      try:
        rows.append((i + 1, json.loads(line)))
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
  if not rows:
    raise UserError(f"{path}: empty file; expected one JSON object per line")
  for line, r in rows:
    if not isinstance(r, dict):
      raise UserError(f"{path}:{line}: expected a JSON object")
  names = list(dict.fromkeys(k for _, r in rows for k in r))
  return rows, names


def build_label_map(records: Sequence[TextRecord], path: str, regression: bool | None
                    ) -> tuple[list[str], bool]:
  """Label names from the training file (numeric order if all integers) and whether the task
  is regression (None: auto, when labels are numbers that are not all integers)."""
  labels = [r.label for r in records]
  for r in records:
    if r.label is None or r.label == "":
      raise UserError(f"{path}:{r.line}: missing label; name its column with --label-column")
  names = sorted(set(labels))
  if not regression:
    _check_label_spellings(records, names, path)
  if regression is None:
    regression = _all_float(names) and not all(_is_int(n) for n in names)
  if regression:
    bad = next((r for r in records if not _is_float(r.label)), None)
    if bad:
      raise UserError(f"{path}:{bad.line}: label {bad.label!r} is not a number (regression)")
    return [], True
  if all(_is_int(n) for n in names):
    names.sort(key=int)
  return names, False


def _check_label_spellings(records: Sequence[TextRecord], names: Sequence[str], path: str) -> None:
  """Refuses class labels where one class is surely spelled two ways (0 / 1 / 1.0 / neg /
  positive would otherwise train a 5-class model without a word)."""
  numbers = [n for n in names if _is_float(n)]
  words = [n for n in names if not _is_float(n)]
  clash = None
  if numbers and words:
    clash = f"mix numbers and words ({', '.join(list(names)[:8])})"
  else:
    seen: dict[Any, str] = {}
    for n in names:
      key = float(n) if numbers else n.strip().lower()
      if key in seen:
        clash = f"spell one class two ways ({seen[key]!r} and {n!r})"
        break
      seen[key] = n
  if clash:
    line = next(r.line for r in records if r.label == names[-1])
    raise UserError(f"{path}: the labels {clash}, e.g. line {line}; expected one spelling per "
                    "class (--regression for a numeric target; --label-column if this is not "
                    "the label column)")


def _is_float(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


def _all_float(names) -> bool:
  return all(_is_float(n) for n in names)


def _is_int(s: str) -> bool:
  return s.lstrip("-").isdigit()


# ----------------------------------------------------------------------------- token tagging

@dataclasses.dataclass
class TaggedSentence:
  words: list[str]
  tags: list[str]
  line: int  # line of the first word (the record number in slot JSON)
  id: str | None = None


def read_tagged(path: str, labeled: bool = True) -> list[TaggedSentence]:
  """Slot JSON (a list or JSONL of {"tokens": [...], "tags": [...], "id"}) or CoNLL.
  `labeled=False` (a test file): tags may be absent (CoNLL: a word a line) and read as []."""
  if not path.lower().endswith((".json", ".jsonl", ".ndjson")):  # a CoNLL word may be "["
    return read_conll(path, labeled)
  rows, _ = _jsonl_rows(path, _open_text(path))
  out = []
  for n, r in rows:
    where = f"{path}: record {n}" + (f" (id {r['id']!r})" if "id" in r else "")
    tokens, tags = r.get("tokens"), r.get("tags")
    if not isinstance(tokens, list) or not tokens:
      raise UserError(f"{where}: missing field 'tokens' (a non-empty list of words)")
    if tags is None and labeled:
      raise UserError(f"{where}: missing field 'tags' (one tag per token)")
    if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)):
      raise UserError(f"{where}: field 'tags' should list one tag per token ({len(tokens)})")
    out.append(TaggedSentence([str(t) for t in tokens], [str(t) for t in tags or []], n,
                              None if r.get("id") is None else str(r["id"])))
  return out


def read_conll(path: str, labeled: bool = True) -> list[TaggedSentence]:
  """CoNLL-style: one `word ... tag` per line (first column the word, last the tag), a blank
  line between sentences, -DOCSTART- lines skipped."""
  content = _open_text(path)
  sentences, words, tags, start = [], [], [], 0
  for i, raw in enumerate(content.splitlines(), start=1):
    line = raw.strip()
    if not line or line.startswith("-DOCSTART-"):
      if words:
        sentences.append(TaggedSentence(words, tags, start))
        words, tags = [], []
      continue
    fields = line.split()
    if len(fields) < 2 and labeled:
      raise UserError(f"{path}:{i}: expected 'word ... tag' (at least two columns), got "
                      f"{line[:40]!r}")
    if not words:
      start = i
    words.append(fields[0])
    if len(fields) > 1:
      tags.append(fields[-1])
  if words:
    sentences.append(TaggedSentence(words, tags, start))
  if not sentences:
    raise UserError(f"{path}: empty file; expected CoNLL lines 'word tag'")
  return sentences


def tag_names(sentences: Sequence[TaggedSentence]) -> list[str]:
  names = sorted({t for s in sentences for t in s.tags})
  return (["O"] if "O" in names else []) + [t for t in names if t != "O"]


# ----------------------------------------------------------------------------- multiple choice

@dataclasses.dataclass
class ChoiceRecord:
  id: str
  first: list[str]   # per choice: the context / question
  second: list[str]  # per choice: the ending / candidate paragraph
  label: int
  line: int


def read_swag(path: str) -> list[ChoiceRecord]:
  """SWAG's CSV: sent1 is the context; sent2 + " " + ending{i} each candidate; label the gold."""
  content = _open_text(path)
  rows = list(csv.DictReader(content.splitlines()))
  if not rows:
    raise UserError(f"{path}: empty file; expected SWAG CSV rows with a header")
  endings = sorted((k for k in rows[0] if k and k.startswith("ending")), key=lambda k: k[6:])
  missing = [c for c in ("sent1", "sent2", "label") if c not in rows[0]]
  if missing or not endings:
    raise UserError(f"{path}: missing column(s) {', '.join(missing or ['ending0'])}; expected "
                    "SWAG's sent1, sent2, ending0..N, label")
  records = []
  for i, r in enumerate(rows):
    line = i + 2
    label = (r.get("label") or "").strip()
    if not _is_int(label) or not 0 <= int(label) < len(endings):
      raise UserError(f"{path}:{line}: label {label!r}; expected 0..{len(endings) - 1}")
    _refuse_blank(f"{path}:{line}", [r[e] for e in endings], endings)
    records.append(ChoiceRecord(
        str(r.get("fold-ind") or r.get("video-id") or i), [r["sent1"] or ""] * len(endings),
        [f"{r['sent2'] or ''} {r[e] or ''}".strip() for e in endings], int(label), line))
  return records


QUESTION_KEYS = ("question", "query", "context", "sent1", "premise")
CANDIDATE_KEYS = ("candidates", "paragraphs", "options", "endings", "choices")
# `relevant` before `answer`: an `answer` may be a QA span ({text, start}), not a choice.
GOLD_KEYS = ("gold", "label", "gold_index", "relevant", "answer")


def read_choice_json(path: str, context_file: str | None = None,
                     labeled: bool = True) -> list[ChoiceRecord]:
  """JSON list (or JSONL, or {"data": [...]}) of {question, candidates|paragraphs, gold}, or
  the homework layout (paragraphs as ids into --context-file; paragraphs.py)."""
  from bert_jax.finetune import paragraphs
  content = _open_text(path)
  try:
    loaded = json.loads(content) if content.lstrip()[:1] in ("[", "{") and \
        "\n{" not in content.strip() else None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if paragraphs.is_paragraph_layout(loaded):
    return [ChoiceRecord(*row)
            for row in paragraphs.choice_rows(path, context_file, loaded, labeled)]
  if loaded is None:
    rows, _ = _jsonl_rows(path, content)
  else:
    items = loaded.get("data", [loaded]) if isinstance(loaded, dict) else loaded
    rows = [(i + 1, r) for i, r in enumerate(items)]
  if not rows:
    raise UserError(f"{path}: empty file; expected records of question, candidates, gold")
  records = []
  for n, r in rows:
    if not isinstance(r, dict):
      raise UserError(f"{path}: record {n}: expected a JSON object")
    q = next((r[k] for k in QUESTION_KEYS if k in r), None)
    cands = next((r[k] for k in CANDIDATE_KEYS if k in r), None)
    gold = next((r[k] for k in GOLD_KEYS if k in r and not isinstance(r[k], dict)), None)
    if not labeled and gold is None:
      gold = paragraphs.UNLABELED
    if q is None or not isinstance(cands, list) or not cands or gold is None:
      raise UserError(f"{path}: record {n}: expected fields question, candidates (or "
                      "paragraphs: a non-empty list) and gold (an index)")
    cands = [c.get("text", c.get("paragraph", "")) if isinstance(c, dict) else str(c)
             for c in cands]
    _refuse_blank(f"{path}: record {n}", cands)
    if isinstance(gold, str) and not _is_int(gold):
      if gold not in cands:
        raise UserError(f"{path}: record {n}: gold {gold[:40]!r} is not one of the candidates")
      gold = cands.index(gold)
    gold = int(gold)
    if not 0 <= gold < len(cands) and (labeled or gold != paragraphs.UNLABELED):
      raise UserError(f"{path}: record {n}: gold index {gold}; expected 0..{len(cands) - 1}")
    records.append(ChoiceRecord(str(r.get("id", n)), [str(q)] * len(cands), cands, gold, n))
  return records


def _refuse_blank(where: str, candidates: list, names: list[str] | None = None) -> None:
  """A blank candidate is a broken row (a shifted column, a lost field), not a choice."""
  for i, text in enumerate(candidates):
    if not str(text or "").strip():
      raise UserError(f"{where}: candidate {names[i] if names else i} is blank; expected text "
                      "in every candidate")


def read_choice(path: str, context_file: str | None = None,
                labeled: bool = True) -> list[ChoiceRecord]:
  if path.lower().endswith(".csv"):
    return read_swag(path)
  return read_choice_json(path, context_file, labeled)
