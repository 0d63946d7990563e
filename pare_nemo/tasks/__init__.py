"""lm-evaluation-harness tasks that Pare ships, built from local text (no machine here reaches the
Hub). ``TASK_DIR`` is their ``include_path``; :func:`pare_nemo.report.run_tasks` adds it itself.

Both ask which continuation follows a passage. Passages are prose paragraphs from the end of
CPython's ``pydoc_data.topics`` (after ``HELD_OUT_FROM`` of it: Pare's tiny models train on its
beginning), cut into windows of ``CONTEXT_WORDS`` words followed by ``CONTINUATION_WORDS`` more:

- ``pare_pydoc``: the true next words against the same words in three other orders (word order and
  fluency: a model that learnt the language tells them apart, a random one cannot; chance 25%);
- ``pare_pydoc_passages``: the true next words against the next words of three other passages
  (what fits this context; harder; ``acc_mutual_info`` discounts how likely each continuation is
  on its own, which ``acc`` is dominated by in small models).

Scored by log-likelihood. The documents are rebuilt in memory, deterministically, on each load
(``custom_dataset`` in the YAML files): no file to ship or download.
"""

from __future__ import annotations

import random
from pathlib import Path

TASK_DIR = Path(__file__).parent
HELD_OUT_FROM = 0.4  # fraction of pydoc_text() before which no passage is taken
CONTEXT_WORDS = 24
CONTINUATION_WORDS = 6
CHOICES = 4
FEWSHOT_DOCS = 40  # the first documents (after shuffling): the "validation" split, for few-shot


def prose_paragraphs(text: str) -> list[list[str]]:
    """The words of each prose paragraph: blank-line separated, without indented (code), table
    (``+`` / ``|``) or prompt (``>>>``) lines."""
    return [p.split() for p in text.split("\n\n")
            if p.strip() and not any(line[:1].isspace() or line.startswith(("+", "|", ">>>"))
                                     for line in p.splitlines())]


def _reorderings(words: list[str], n: int, rng: random.Random) -> list[str] | None:
    """``n`` distinct orders of ``words``, none the original; None if there are not enough."""
    gold, out = " ".join(words), []
    for _ in range(100):
        w = list(words)
        rng.shuffle(w)
        s = " ".join(w)
        if s != gold and s not in out:
            out.append(s)
            if len(out) == n:
                return out
    return None


def pydoc_continuation_docs(distractors: str = "order", seed: int = 0) -> list[dict]:
    """Every document of ``pare_pydoc`` (``distractors="order"``) or ``pare_pydoc_passages``
    (``"passages"``), in a fixed shuffled order: {id, context, choices, label}."""
    from pare_nemo.tiny import pydoc_text

    if distractors not in ("order", "passages"):
        raise ValueError(f"distractors={distractors!r}: expected 'order' or 'passages'")
    text = pydoc_text()
    start = text.index("\n\n", int(len(text) * HELD_OUT_FROM))
    width = CONTEXT_WORDS + CONTINUATION_WORDS
    windows = [(words[s:s + CONTEXT_WORDS], words[s + CONTEXT_WORDS:s + width])
               for words in prose_paragraphs(text[start:])
               for s in range(0, len(words) - width + 1, width)]
    rng = random.Random(seed)
    docs = []
    for i, (context, cont) in enumerate(windows):
        gold = " ".join(cont)
        if distractors == "order":
            others = _reorderings(cont, CHOICES - 1, rng)
            if others is None:
                continue
        else:
            others = []
            while len(others) < CHOICES - 1:
                other = " ".join(windows[rng.randrange(len(windows))][1])
                if other != gold and other not in others:
                    others.append(other)
        label = rng.randrange(CHOICES)
        docs.append({"id": i, "context": " ".join(context),
                     "choices": others[:label] + [gold] + others[label:], "label": label})
    rng.shuffle(docs)
    return docs


def _splits(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs[:FEWSHOT_DOCS]),
                                 "test": datasets.Dataset.from_list(docs[FEWSHOT_DOCS:])})


def load_pare_pydoc(**_metadata):
    """``custom_dataset`` of pare_pydoc.yaml. lm-eval passes its task metadata (the model's
    arguments among them) as keywords; they do not change the documents."""
    return _splits(pydoc_continuation_docs("order"))


def load_pare_pydoc_passages(**_metadata):
    """``custom_dataset`` of pare_pydoc_passages.yaml."""
    return _splits(pydoc_continuation_docs("passages"))
