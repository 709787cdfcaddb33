"""Multiple-choice VQA accuracy on MMBench-format TSV files, with circular evaluation.

A TSV row has ``index, question, hint, A, B, C, D, answer, category`` and a
base64 ``image`` (MMBench stores a repeated image once: a later row's ``image``
may be the ``index`` of the row that holds it). Empty options are absent.

The prompt is VLMEvalKit's MCQ layout::

  Hint: <hint>                   (only when there is one)
  Question: <question>
  Options:
  A. <option A>
  B. <option B>
  Please select the correct answer from the options above. \n

Circular evaluation (MMBench's CircularEval): a question with n options is
asked n times, its options rotated by 0 .. n-1 places, and counts as right only
if every rotation is answered right. The answer is read from the model's text:
a lone option letter (``B``, ``B.``, ``(B)``, ``Answer: B``), else the one
option whose text the reply contains.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import re
import string
import sys
from typing import Callable

from etils import epath
from PIL import Image

from muse_jax.data import images as image_ops
from muse_jax.evaluate import progress as progress_lib

COLUMNS = ("index", "question", "answer", "category", "image")
PROMPT_SUFFIX = "Please select the correct answer from the options above. \n"
AnswerFn = Callable[[Image.Image, str], str]


@dataclasses.dataclass(frozen=True)
class Question:
  index: str
  question: str
  hint: str | None
  options: dict[str, str]   # letter -> text, in letter order
  answer: str               # a letter of options
  category: str
  image_b64: str


def _missing(value: str | None) -> bool:
  return value is None or value.strip() == "" or value.strip().lower() == "nan"


def read_tsv(path: str | epath.PathLike) -> list[Question]:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (an MMBench-format TSV file)")
  csv.field_size_limit(sys.maxsize)   # base64 images are far larger than csv's default
  with path.open() as f:
    # quoting as pandas writes (and VLMEvalKit reads) it: fields with a tab, a quote or a
    # newline are double-quoted
    rows = list(csv.DictReader(f, delimiter="\t"))
  if not rows:
    raise ValueError(f"{path} has no rows")
  absent = [c for c in COLUMNS if c not in rows[0]]
  if absent:
    raise ValueError(f"{path} lacks column(s) {absent}; MMBench TSVs have index, question, hint, "
                     "A, B, C, D, answer, category, image")
  images = {row["index"]: row["image"] for row in rows}
  questions = []
  for number, row in enumerate(rows, 2):
    options = {c: row[c] for c in string.ascii_uppercase if c in row and not _missing(row[c])}
    answer = row["answer"].strip()
    if answer not in options:
      raise ValueError(f"{path}:{number}: answer {answer!r} is not one of the options "
                       f"{sorted(options)}")
    image = row["image"]
    if len(image) <= 64 and image in images:    # a reference to another row's image
      image = images[image]
    questions.append(Question(row["index"], row["question"],
                              None if _missing(row.get("hint")) else row["hint"], options,
                              answer, row["category"], image))
  return questions


def decode_image(question: Question) -> Image.Image:
  try:
    data = base64.b64decode(question.image_b64)
  except ValueError as error:
    raise ValueError(f"question {question.index}: image is not base64 ({error})") from error
  try:
    return image_ops.decode_rgb(data, max_pixels=2**28)
  except image_ops.BadExample as error:
    raise ValueError(f"question {question.index}: unreadable image ({error})") from error


def build_prompt(question: str, hint: str | None, options: dict[str, str]) -> str:
  prompt = f"Hint: {hint}\n" if hint is not None else ""
  prompt += f"Question: {question}\n"
  if options:
    prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    prompt += PROMPT_SUFFIX
  return prompt


def rotations(question: Question) -> list[tuple[dict[str, str], str]]:
  """(options, right letter) for each of the n circular shifts of the options."""
  letters = list(question.options)
  texts = [question.options[k] for k in letters]
  right = letters.index(question.answer)
  n = len(letters)
  return [({letters[j]: texts[(j + shift) % n] for j in range(n)}, letters[(right - shift) % n])
          for shift in range(n)]


def extract_choice(reply: str, options: dict[str, str]) -> str | None:
  """The option letter a reply picks, or None when it picks none or several."""
  text = reply.strip()
  letters = "".join(options)
  lone = re.fullmatch(rf"[\(\[]?([{letters}])[\)\]]?[.:]?", text)
  if lone:
    return lone.group(1)
  tagged = set(re.findall(rf"(?:^|[\s(\[])([{letters}])(?=$|[\s).:,\]])", text))
  if len(tagged) == 1:
    return tagged.pop()
  by_text = [k for k, v in options.items() if v.strip() and v.strip().lower() in text.lower()]
  return by_text[0] if len(by_text) == 1 else None


def evaluate(questions: list[Question], answer: AnswerFn, *, circular: bool = True,
             show_progress: bool = True) -> dict:
  """Accuracy (overall and per category) of ``answer(image, prompt) -> reply``.

  ``answer`` is the model: e.g. ``understand`` with a loaded MUSE-VL, greedy.
  """
  right: dict[str, list[bool]] = {}
  records = []
  for question in progress_lib.progress(questions, total=len(questions), desc="MMBench",
                                        unit="question", enabled=show_progress):
    image = decode_image(question)
    asked = rotations(question) if circular else [(question.options, question.answer)]
    all_right = True
    for options, letter in asked:
      reply = answer(image, build_prompt(question.question, question.hint, options))
      choice = extract_choice(reply, options)
      records.append({"index": question.index, "options": options, "answer": letter,
                      "reply": reply, "choice": choice})
      all_right = all_right and choice == letter
    right.setdefault(question.category, []).append(all_right)
  total = [r for values in right.values() for r in values]
  return {"accuracy": sum(total) / len(total), "questions": len(total),
          "circular": circular, "asked": len(records),
          "per_category": {c: sum(v) / len(v) for c, v in sorted(right.items())},
          "records": records}
