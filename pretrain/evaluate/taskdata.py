"""The shipped evaluation tasks' examples, written deterministically from the built-in corpus.

Both tasks read the last ``HELD_OUT_CHAPTERS`` chapters of Jane Austen's *Persuasion*, the last
documents of the ``austen`` corpus (pretrain/data/corpus.py). Those are held out of training by the
shipped data configs: ``data=builtin`` splits each source's documents 949/50/1 in reading order, so a
source's last 5% (14 of Austen's 275 chapters) are validation and test documents, never trained on;
``data=tiny`` reads only Austen's first 40 chapters. Another mixture may train on them: the
contamination report (``pretrain.evaluate.contamination``) measures the overlap for any run.

| task               | lm-eval output type | example                                                        |
|--------------------|---------------------|----------------------------------------------------------------|
| pretrain_lastword  | loglikelihood       | a passage ending a sentence; predict its last word (LAMBADA)   |
| pretrain_cloze     | multiple_choice     | a sentence; pick the one that follows among four (story cloze) |

Each task has a ``test`` split and a ``train`` split of ``FEWSHOT`` examples (the first chapter's
first examples), from which lm-eval's ``first_n`` sampler takes few-shot examples in order.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pretrain.data.cache import atomic_write_text, make_key

TASKS = ("pretrain_lastword", "pretrain_cloze")
HELD_OUT_CHAPTERS = 4
FEWSHOT = 5
SEED = 1234
VERSION = 1  # bump when the generation below changes: the cache key holds it
_SENTENCE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def held_out_chapters() -> list[tuple[str, str]]:
    """(doc id, text) of the held-out chapters, in reading order. Raises CorpusNotInstalled."""
    from pretrain.data.corpus import get_builtin

    docs = list(get_builtin("austen").read())
    return docs[-HELD_OUT_CHAPTERS:]


def _sentences(text: str) -> list[str]:
    """The chapter's sentences with whitespace collapsed; the chapter heading and short lines dropped."""
    out = []
    for paragraph in text.split("\n\n")[1:]:
        out += [" ".join(s.split()) for s in _SENTENCE.split(paragraph.strip()) if s.strip()]
    return out


def lastword_examples(chapters: list[tuple[str, str]]) -> list[dict]:
    """Passages of whole sentences (25-60 words) whose last word is alphabetic; the target is that word.

    ``context`` holds the passage without its last word; ``target`` is " word" (lm-eval scores
    the continuation as given: the delimiter is part of it, as in lm-eval's LAMBADA).
    """
    examples = []
    for doc_id, text in chapters:
        window: list[str] = []
        for sentence in _sentences(text):
            window.append(sentence)
            words = " ".join(window).split()
            if len(words) < 25:
                continue
            if len(words) <= 60:
                last = words[-1].rstrip(".!?\"'\u201d\u2019),;:")
                if _WORD.match(last):
                    examples.append({"id": f"{doc_id}/{len(examples)}", "context": " ".join(words[:-1]),
                                     "target": " " + last})
            window = []
    return examples


def cloze_examples(chapters: list[tuple[str, str]]) -> list[dict]:
    """A sentence (8-40 words) and four candidates for the next one: the true one and three others of
    the held-out chapters, drawn with a fixed seed; ``label`` is the true one's index."""
    rng = random.Random(SEED)
    pairs = []
    for doc_id, text in chapters:
        sentences = _sentences(text)
        for a, b in zip(sentences, sentences[1:]):
            if 8 <= len(a.split()) <= 40 and 4 <= len(b.split()) <= 30:
                pairs.append((doc_id, a, b))
    pool = sorted({b for _, _, b in pairs})
    examples = []
    for i, (doc_id, a, b) in enumerate(pairs[::2]):  # every other pair, so contexts do not chain
        others = rng.sample([s for s in pool if s != b], 3)
        label = rng.randrange(4)
        choices = others[:label] + [b] + others[label:]
        examples.append({"id": f"{doc_id}/{i}", "context": a, "choices": choices, "label": label})
    return examples


BUILDERS = {"pretrain_lastword": lastword_examples, "pretrain_cloze": cloze_examples}


def _cache_dir() -> Path:
    import os

    from pretrain.data.corpus import get_builtin

    files = get_builtin("austen").files()
    stamp = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    root = Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))
    return root / "eval_tasks" / make_key("eval-tasks", VERSION, HELD_OUT_CHAPTERS, FEWSHOT, SEED, stamp)


def splits(task: str) -> dict[str, list[dict]]:
    """{"train": few-shot examples, "test": the rest} of a shipped task, cached after the first call."""
    if task not in BUILDERS:
        raise KeyError(f"{task!r} is not a shipped task; they are {', '.join(TASKS)}")
    path = _cache_dir() / f"{task}.jsonl"
    if not path.is_file():
        chapters = held_out_chapters()
        for name, build in BUILDERS.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path.parent / f"{name}.jsonl", "".join(json.dumps(e) + "\n" for e in build(chapters)))
    examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"train": examples[:FEWSHOT], "test": examples[FEWSHOT:]}


def check_config(cfg) -> list[str]:
    """Problems with the ``trainer.eval_tasks*`` keys of a composed training config (validate.py)."""
    tr = cfg.trainer
    if not tr.get("eval_tasks"):
        return []
    problems = []
    unknown = [t for t in tr.eval_tasks if t not in TASKS]
    if unknown:
        problems.append(f"trainer.eval_tasks: {', '.join(map(str, unknown))} unknown; training runs the shipped tasks "
                        f"({', '.join(TASKS)}); any other lm-eval task: python -m pretrain.evaluate --include-path DIR")
    if cfg.data.name == "synthetic":
        problems.append("trainer.eval_tasks needs a tokenizer and data=synthetic has none: train on text data "
                        "or set trainer.eval_tasks=[]")
    if not (tr.eval_tasks_interval or tr.eval_interval):
        problems.append("trainer.eval_tasks is set but never runs: set trainer.eval_tasks_interval (or trainer.eval_interval) > 0")
    if tr.eval_tasks_interval < 0 or tr.eval_tasks_fewshot < 0 or (tr.eval_tasks_limit is not None and tr.eval_tasks_limit < 1):
        problems.append(f"trainer.eval_tasks_interval={tr.eval_tasks_interval} and trainer.eval_tasks_fewshot="
                        f"{tr.eval_tasks_fewshot} must be >= 0, trainer.eval_tasks_limit={tr.eval_tasks_limit} >= 1 or null")
    if tr.eval_tasks_fewshot > FEWSHOT:
        problems.append(f"trainer.eval_tasks_fewshot={tr.eval_tasks_fewshot}: the shipped tasks have {FEWSHOT} few-shot examples")
    return problems


def texts(task: str) -> list[str]:
    """Each test example as one text (context, then every choice or the target), for the overlap report."""
    out = []
    for e in splits(task)["test"]:
        out.append(" ".join([e["context"], e.get("target", ""), *e.get("choices", [])]))
    return out
