"""The sentence pool of the synthetic corpus: clean-stage-safe sentences of the built-in prose corpora.

Sentences holding an evaluation n-gram (decontam.py's, the same hashes) are left out of the pool,
and each sentence's word hashes are kept so that a drawn document is checked for n-grams across
sentence boundaries without re-reading its text. Also the evaluation files: the built-in config's,
or a small generated set of held-out sentences.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from pretrain.data.decontam import hits, ngram_hashes, normalized_words, word_hashes
from pretrain.errors import UserError

PROSE_CORPORA = ("austen", "kjv", "shakespeare", "pydocs", "jargon")
_BUILTIN_YAML = Path(__file__).resolve().parents[2] / "conf" / "data" / "builtin.yaml"

_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019])\s+")
_ENDS = re.compile(r"[.!?][\"'\u201d\u2019]?$")
BANNED = set("{}[]<>|\\*=_#@^~`$%+")  # code, markup and the end-of-text literal stay out
_ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`_+")


def _rst_to_prose(text: str) -> str:
    """Prose paragraphs of a reST page: no directives, headings, code blocks or lists; roles unwrapped."""
    paras = []
    for p in re.split(r"\n\s*\n", text):
        lines = p.splitlines()
        if not lines or lines[0][:1].isspace() or lines[0].lstrip().startswith(("..", "*", "-", ">>>", "|", "+", "=", "#")):
            continue
        p = " ".join(ln.strip() for ln in lines)
        paras.append(_LINK.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", p))).replace("\\ ", ""))
    return "\n\n".join(paras)


def _sentences(text: str) -> Iterator[str]:
    """Clean-stage-safe sentences: 4-60 words, capitalised, terminal punctuation, no code or markup."""
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if len(lines) > 1 and len(lines[0].split()) <= 3:
            lines = lines[1:]  # a speaker or title line
        for s in _SPLIT.split(" ".join(lines)):
            s = unicodedata.normalize("NFC", " ".join(s.split()))
            n = s.count(" ") + 1
            if not 4 <= n <= 60 or not _ENDS.search(s) or not (s[0].isupper() or (s[0] in "\"'\u201c\u2018" and s[1:2].isupper())):
                continue
            low = s.lower()
            if BANNED.intersection(s) or "javascript" in low or "lorem ipsum" in low or not s.isprintable():
                continue
            yield s


@dataclass
class Pool:
    """One corpus's sentences (unique, none holding an evaluation n-gram) and its substitution words."""

    name: str
    sentences: List[str]
    vocab: List[str]  # lower-case alphabetic words for substitutions
    # decontam.py's word hashes of every sentence, flat; sentence i is hashes[offsets[i]:offsets[i + 1]].
    hashes: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None

    def index_words(self) -> None:
        per = [normalized_words(s) for s in self.sentences]
        self.offsets = np.cumsum([0] + [len(w) for w in per])
        self.hashes = word_hashes([w for ws in per for w in ws])

    def word_hashes_of(self, order: Sequence[int]) -> np.ndarray:
        """The word hashes of these sentences joined in this order (those of the text they make)."""
        return np.concatenate([self.hashes[self.offsets[i] : self.offsets[i + 1]] for i in order])


_POOLS: Dict[tuple, Tuple[List[Pool], Dict[str, str]]] = {}  # per process: tests generate several corpora


def load_pools(corpora: Sequence[str], files: List[str], eval_ngrams: np.ndarray, n: int) -> Tuple[List[Pool], Dict[str, str]]:
    """Fresh copies of the (cached) pools for these corpora and evaluation files."""
    ident = (tuple(corpora), tuple((f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files), n)
    if ident not in _POOLS:
        pools, missing = _build_pools(corpora, eval_ngrams, {str(Path(f).resolve()) for f in files}, n)
        for p in pools:
            p.index_words()
        _POOLS[ident] = pools, missing
    pools, missing = _POOLS[ident]
    return [Pool(p.name, list(p.sentences), p.vocab, p.hashes, p.offsets) for p in pools], dict(missing)


def _build_pools(corpora: Sequence[str], eval_ngrams: np.ndarray, eval_abs: set, n: int) -> Tuple[List[Pool], Dict[str, str]]:
    from pretrain.data.corpus import CorpusNotInstalled, get_builtin

    pools, missing = [], {}
    for name in corpora:
        corpus = get_builtin(name)
        try:
            docs = list(corpus.read())
        except (CorpusNotInstalled, OSError, subprocess.CalledProcessError) as e:
            missing[name] = str(e)
            continue
        sents, seen = [], set()
        for doc_id, text in docs:
            if name == "pydocs":
                if any(f.endswith("/" + doc_id) for f in eval_abs):
                    continue  # the default evaluation pages live in this corpus
                text = _rst_to_prose(text)
            for s in _sentences(text):
                if s not in seen:
                    seen.add(s)
                    sents.append(s)
        if len(eval_ngrams):
            sents = _without_eval_ngrams(sents, eval_ngrams, n)
        vocab = sorted({w for s in sents[::4] for w in s.lower().split() if w.isalpha() and w.isascii() and len(w) >= 3})
        if len(sents) >= 100:
            pools.append(Pool(name, sents, vocab))
        else:
            missing[name] = f"only {len(sents)} usable sentences"
    if not pools:
        raise UserError(f"no built-in prose corpus is installed ({missing}); run `bash pretrain/data/install_corpus.sh` (as root)")
    return pools, missing


def _without_eval_ngrams(sents: List[str], eval_ngrams: np.ndarray, n: int) -> List[str]:
    """The sentences holding no evaluation n-gram (one pass over them all, joined by a separator word)."""
    sep = "qqsynthsepqq"  # in no evaluation file, so no n-gram that matches crosses a sentence boundary
    words = normalized_words(f" {sep} ".join(sents))
    hit = np.flatnonzero(hits(ngram_hashes(words, n), eval_ngrams))
    if not len(hit):
        return sents
    seps = np.array([i for i, w in enumerate(words) if w == sep])
    bad = set(np.searchsorted(seps, hit).tolist())  # sentence index of each hit
    return [s for i, s in enumerate(sents) if i not in bad]


def default_eval_files() -> List[str]:
    """The built-in data config's evaluation files that exist (none: generate() writes a set with write_eval_file)."""
    try:
        from omegaconf import OmegaConf

        return [f for f in OmegaConf.load(_BUILTIN_YAML).get("eval_files", []) if Path(f).is_file()]
    except Exception:  # no readable config: generate an eval file instead
        return []


def write_eval_file(path: Path, rng: random.Random, pools: List[Pool], n: int) -> None:
    """A small evaluation set (50 passages of held-out sentences); those sentences leave the pool."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in range(50):
            pool = pools[q % len(pools)]
            picks = sorted({rng.randrange(len(pool.sentences)) for _ in range(4)}, reverse=True)
            text = " ".join(pool.sentences[i] for i in picks)
            for i in picks:
                pool.sentences[i] = pool.sentences[-1]
                pool.sentences.pop()
            f.write(json.dumps({"id": f"q{q}", "text": text}, ensure_ascii=False) + "\n")

