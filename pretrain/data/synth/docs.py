"""The documents of the synthetic corpus: base documents and the plants made from them.

A base document is sentences drawn from one pool; a near-duplicate variant replaces whole sentences
and then single words until its Jaccard with the base over dedup.py's shingles lands on a target;
an exact copy differs only in what dedup.py's exact key normalises away; a contaminated document has
spans of evaluation text inserted between its sentences.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import List, Tuple

from pretrain.data.decontam import read_eval_texts
from pretrain.data.synth.pool import BANNED, Pool
from pretrain.errors import UserError

_WORD = re.compile(r"\w+")  # dedup.py's shingle words

Paras = List[List[str]]


def render(paras: Paras) -> str:
    """Sentences joined by spaces, paragraphs by blank lines (the clean stage keeps both)."""
    return "\n\n".join(" ".join(p) for p in paras)


def base_doc(rng: random.Random, pool: Pool, words: int) -> Tuple[Paras, List[int]]:
    """Sentences drawn at random from one corpus, in paragraphs of 1-7; at least 6 sentences.

    Returns the paragraphs and the sentences' pool indices in text order.
    """
    paras, para, total, used, order = [], [], 0, set(), []
    size = rng.randint(1, 7)
    while total < words or len(used) < 6:
        i = rng.randrange(len(pool.sentences))
        if i in used:
            continue
        used.add(i)
        order.append(i)
        s = pool.sentences[i]
        para.append(s)
        total += s.count(" ") + 1
        if len(para) >= size:
            paras.append(para)
            para, size = [], rng.randint(1, 7)
    if para:
        paras.append(para)
    return paras, order


def _grams(words: List[str], k: int) -> set:
    if len(words) < k:
        return {tuple(words)}
    return set(zip(*(words[i:] for i in range(k))))


def _jaccard_sets(a: set, b: set) -> float:
    inter = len(a & b)
    return inter / max(len(a) + len(b) - inter, 1)


def variant(rng: random.Random, paras: Paras, pool: Pool, target: float, k: int) -> Paras:
    """A copy of ``paras`` whose shingle Jaccard with it is as close to ``target`` as one word allows."""
    layout = [len(p) for p in paras]
    base = [s for p in paras for s in p]
    base_words = [_WORD.findall(s.lower()) for s in base]
    base_set = _grams([w for ws in base_words for w in ws], k)
    # Whole sentences first (a third of the way to the target, at most), then single words.
    sent_order = rng.sample(range(len(base)), len(base))
    replacements = {si: pool.sentences[rng.randrange(len(pool.sentences))] for si in sent_order}
    rep_words = {si: _WORD.findall(s.lower()) for si, s in replacements.items()}

    def build(n_sent: int, subs) -> Tuple[List[List[str]], float]:
        """Sentences as token lists (None: unchanged) and their Jaccard with the base."""
        words, toks = list(base_words), [None] * len(base)
        for si in sent_order[:n_sent]:
            words[si] = rep_words[si]
        for si, ti, wi, word in subs:  # an alphabetic token is one \w+ word: edit both in place
            if toks[si] is None:
                toks[si], words[si] = base[si].split(" "), list(words[si])
            toks[si][ti] = word.capitalize() if toks[si][ti][0].isupper() else word
            words[si][wi] = word
        return toks, _jaccard_sets(base_set, _grams([w for ws in words for w in ws], k))

    n_sent = int(len(base) * (1 - target) * 0.3)
    while n_sent > 0 and build(n_sent, [])[1] < target + 0.02:
        n_sent -= 1
    touched = set(sent_order[:n_sent])
    slots = []
    for si, s in enumerate(base):
        if si in touched:
            continue
        wi = 0
        for ti, t in enumerate(s.split(" ")):
            if t.isalpha() and t.isascii() and ti < s.count(" "):
                slots.append((si, ti, wi))
            wi += len(_WORD.findall(t.lower()))
    rng.shuffle(slots)
    subs = []
    for si, ti, wi in slots:
        w = pool.vocab[rng.randrange(len(pool.vocab))]
        subs.append((si, ti, wi, w if w != base_words[si][wi] else w + "s"))
    # J(prefix) is non-increasing in the prefix: find the first below target. Each spaced
    # substitution swaps ~k shingles, so J(m) ~ (N - km) / (N + km) brackets the search.
    lo, hi = 0, len(subs)
    guess = int(len(base_set) * (1 - target) / (k * (1 + target))) * 3 + 8
    if guess < hi and build(n_sent, subs[:guess])[1] < target:
        hi = guess
    while lo < hi:
        mid = (lo + hi) // 2
        if build(n_sent, subs[:mid])[1] < target:
            hi = mid
        else:
            lo = mid + 1
    toks = min((build(n_sent, subs[:m]) for m in {max(lo - 1, 0), lo}), key=lambda r: abs(r[1] - target))[0]
    sents = [replacements[si] if si in touched else " ".join(toks[si]) if toks[si] else s for si, s in enumerate(base)]
    out, pos = [], 0
    for n in layout:
        out.append(sents[pos : pos + n])
        pos += n
    return out


def exact_copy(rng: random.Random, text: str) -> Tuple[str, str]:
    """A copy that dedup.py's exact key (lower-case, whitespace split/join) cannot tell from ``text``."""
    kind = rng.choice(["verbatim", "whitespace", "case"])
    if kind == "case":
        v = text.upper() if rng.random() < 0.5 else text.lower()
        if " ".join(v.lower().split()) == " ".join(text.lower().split()) and unicodedata.is_normalized("NFC", v):
            return v, kind
        kind = "whitespace"
    if kind == "whitespace":  # doubled spaces, indented or space-trailed paragraphs, extra blank lines
        paras = []
        for p in text.split("\n\n"):
            toks = p.split(" ")
            for i in rng.sample(range(len(toks) - 1), min(len(toks) - 1, 3)):
                toks[i] += " " * rng.randint(1, 2)
            paras.append(" " * rng.randint(0, 2) + " ".join(toks) + " " * rng.randint(0, 2))
        return "".join(p + rng.choice(["\n\n", "\n\n\n", "\n \n"]) for p in paras).rstrip("\n "), kind
    return text, kind


# ---- evaluation spans -----------------------------------------------------------------------------


class EvalSpans:
    """Spans of whitespace-separated words of the evaluation texts that the clean stage keeps."""

    def __init__(self, files: List[str], names: List[str], n: int):
        self.n, self.texts = n, []  # (file name, text index, tokens, good-run end per token)
        for f, name in zip(files, names):
            for ti, text in enumerate(read_eval_texts([f])):
                toks = text.split()
                good = [
                    any(c.isalnum() for c in t) and not BANNED.intersection(t) and t.isprintable() and unicodedata.is_normalized("NFC", t)
                    for t in toks
                ]
                run, end = 0, [0] * len(toks)  # end[i]: good tokens from i onwards
                for i in range(len(toks) - 1, -1, -1):
                    run = run + 1 if good[i] else 0
                    end[i] = run
                starts = [i for i in range(len(toks)) if end[i] >= n]
                if starts:
                    self.texts.append((name, ti, toks, end, starts))
        if not self.texts:
            raise UserError(f"the evaluation files {files} hold no run of {n} plain words to plant as contamination")

    def sample(self, rng: random.Random) -> dict:
        for _ in range(100):
            name, ti, toks, end, starts = self.texts[rng.randrange(len(self.texts))]
            i = starts[rng.randrange(len(starts))]
            words = min(end[i], rng.randint(self.n, 40))
            span = " ".join(toks[i : i + words])
            low = span.lower()
            if "javascript" not in low and "lorem ipsum" not in low:
                return dict(eval_file=name, text_index=ti, word_offset=i, words=words, span=span)
        raise UserError("could not find a plantable evaluation span (every candidate mentions javascript/lorem ipsum)")


def contaminate(rng: random.Random, paras: Paras, spans: List[dict]) -> Paras:
    """Insert each span between two sentences (or before the first) of a random paragraph."""
    paras = [list(p) for p in paras]
    for sp in spans:
        p = paras[rng.randrange(len(paras))]
        p.insert(rng.randrange(len(p)), sp["span"])
    return paras

