"""The context-selection + span-QA homework layout (Chinese reading comprehension, HW2 of the
applied deep learning course): questions that point into a shared paragraph list.

  context.json   a JSON list of paragraph strings, indexed by position (--context-file)
  train.json     a JSON list of {"id", "question", "paragraphs": [ids into context.json],
                 "relevant": one of paragraphs, "answer": {"text", "start"}}; test.json has
                 neither `relevant` nor `answer`.

`--task choice` reads each question as a choice among its paragraphs (gold: the relevant one);
`--task qa` reads the relevant paragraph as the context, `answer.start` a character offset in
it. Bad input raises UserError naming the file, record and field.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from bert_jax.errors import UserError

UNLABELED = -1  # ChoiceRecord.label of a test question (no `relevant`)


def load_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def is_paragraph_layout(data: Any) -> bool:
  """A list of records whose `paragraphs` are integers (ids into context.json)."""
  return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
          and isinstance(data[0].get("paragraphs"), list)
          and all(isinstance(p, int) and not isinstance(p, bool) for p in data[0]["paragraphs"]))


def load_contexts(path: str | None, data_path: str) -> list[str]:
  if not path:
    raise UserError(f"{data_path}: its 'paragraphs' are ids into a paragraph list; pass "
                    "--context-file context.json")
  contexts = load_json(path)
  if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
    raise UserError(f"{path}: expected a JSON list of paragraph strings")
  return contexts


def read_records(path: str, context_file: str | None, data: Any = None,
                 labeled: bool = True) -> tuple[list[dict], list[str]]:
  """Checked records {id, question, paragraphs, relevant (or None), answer (or None)} and the
  paragraph list. `labeled`: every record must name its relevant paragraph."""
  data = load_json(path) if data is None else data
  contexts = load_contexts(context_file, path)
  out, seen = [], set()
  for n, r in enumerate(data):
    where = f"{path}: record {n}"
    if not isinstance(r, dict):
      raise UserError(f"{where}: expected a JSON object")
    where = f"{path}: record {n} (id {r.get('id', n)!r})"
    for key, kind in (("question", str), ("paragraphs", list)):
      if not isinstance(r.get(key), kind):
        raise UserError(f"{where}: missing field {key!r} ({kind.__name__})")
    rid = str(r.get("id", n))
    if rid in seen:
      raise UserError(f"{where}: duplicate id (predictions are keyed by id)")
    seen.add(rid)
    paragraphs = r["paragraphs"]
    for p in paragraphs:
      if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < len(contexts):
        raise UserError(f"{where}: paragraph id {p!r} is not an index into {context_file} "
                        f"(0..{len(contexts) - 1})")
    relevant = r.get("relevant")
    if relevant is None and labeled:
      raise UserError(f"{where}: missing field 'relevant' (the id of the paragraph that holds "
                      "the answer)")
    if relevant is not None and relevant not in paragraphs:
      raise UserError(f"{where}: 'relevant' {relevant!r} is not one of its paragraphs "
                      f"{paragraphs}")
    answer = r.get("answer")
    if answer is not None and relevant is not None:
      answer = _check_answer(answer, contexts[relevant], where)
    out.append({"id": rid, "question": r["question"], "paragraphs": paragraphs,
                "relevant": relevant, "answer": answer})
  if not out:
    raise UserError(f"{path}: no records")
  return out, contexts


def _check_answer(answer: Any, context: str, where: str) -> dict:
  from bert_jax.finetune.qa import _locate_answer
  if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) or not \
      isinstance(answer.get("start"), int):
    raise UserError(f"{where}: field 'answer' should be {{\"text\": str, \"start\": int}}")
  located = _locate_answer(context, answer["text"], answer["start"])
  if located is None or located < 0:
    # A target at the wrong place would silently train on other text: refused, as read_squad.
    found = context.find(answer["text"])
    hint = f"it occurs at {found}" if found >= 0 else "it does not occur in the paragraph"
    raise UserError(f"{where}: answer text {answer['text'][:40]!r} is not at start "
                    f"{answer['start']} of the relevant paragraph ({hint})")
  return {"text": answer["text"], "start": located}


def choice_rows(path: str, context_file: str | None, data: Any = None,
                labeled: bool = True) -> list[tuple]:
  """One (id, questions, paragraphs, label, line) per question, the fields of
  readers.ChoiceRecord: the question beside each of its paragraphs."""
  records, contexts = read_records(path, context_file, data, labeled)
  return [(r["id"], [r["question"]] * len(r["paragraphs"]),
           [contexts[p] for p in r["paragraphs"]],
           UNLABELED if r["relevant"] is None else r["paragraphs"].index(r["relevant"]), n)
          for n, r in enumerate(records)]


def qa_examples(path: str, context_file: str | None, data: Any = None, labeled: bool = True,
                selected: dict[str, int] | None = None) -> list:
  """One QAExample per question over its relevant paragraph, or the one `selected` names (a
  choice model's predictions, `read_selected`): then a gold answer stays a reference text for
  EM/F1 (its start is in the relevant paragraph, which may not be the selected one)."""
  from bert_jax.finetune.qa import UNKNOWN_START, QAExample
  records, contexts = read_records(path, context_file, data, labeled and not selected)
  out = []
  for r in records:
    relevant = r["relevant"]
    if selected is not None:
      if r["id"] not in selected:
        raise UserError(f"{path}: question id {r['id']!r} has no selected paragraph in "
                        "--selected-paragraphs")
      relevant = selected[r["id"]]
      if relevant not in r["paragraphs"]:  # a selection made for another file
        raise UserError(f"--selected-paragraphs: question id {r['id']!r}: paragraph "
                        f"{relevant} is not one of its paragraphs {r['paragraphs']}")
    if relevant is None:
      raise UserError(f"{path}: question id {r['id']!r}: no 'relevant' paragraph; pass "
                      "--selected-paragraphs (the CSV of `predict --task choice`)")
    start = r["answer"]["start"] if r["answer"] and relevant == r["relevant"] else UNKNOWN_START
    answers = [] if r["answer"] is None else [{"text": r["answer"]["text"], "answer_start": start}]
    if labeled and not answers:
      raise UserError(f"{path}: question id {r['id']!r}: missing field 'answer' "
                      "({\"text\", \"start\"})")
    out.append(QAExample(id=r["id"], question=r["question"], context=contexts[relevant],
                         answers=answers, source=path))
  return out


def read_qa(path: str, context_file: str | None = None, labeled: bool = True,
            selected: dict[str, int] | None = None) -> list:
  """QA examples from the homework layout (detected) or SQuAD JSON (CMRC 2018, DRCD)."""
  from bert_jax.finetune import qa
  data = load_json(path)
  if is_paragraph_layout(data):
    return qa_examples(path, context_file, data, labeled, selected)
  if isinstance(data, list):
    raise UserError(f"{path}: a list of records without 'paragraphs' ids; expected the "
                    "homework layout (question, paragraphs, relevant, answer) or SQuAD JSON "
                    "(data -> paragraphs -> qas)")
  if not labeled:  # a SQuAD-layout test file: questions without answers
    for article in _items(data, "data"):
      for paragraph in _items(article, "paragraphs"):
        for question in _items(paragraph, "qas"):
          if isinstance(question, dict):
            question.setdefault("answers", [])
  return qa.parse_squad(data, source=path)


def _items(parent: Any, key: str) -> list:
  """parent[key] when it is a list (parse_squad reports any other shape)."""
  value = parent.get(key) if isinstance(parent, dict) else None
  return value if isinstance(value, list) else []


def read_selected(path: str) -> dict[str, int]:
  """{question id: paragraph id} from an `id,answer` CSV written by `predict --task choice`."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"id", "answer"} <= set(rows[0]):
    raise UserError(f"{path}: expected a CSV with columns id,answer (predict --task choice)")
  bad = next((r for r in rows if not (r["answer"] or "").strip().isdigit()), None)
  if bad:
    raise UserError(f"{path}: id {bad['id']!r}: answer {bad['answer']!r} is not a paragraph id")
  return {r["id"]: int(r["answer"]) for r in rows}
