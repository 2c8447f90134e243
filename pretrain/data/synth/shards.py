"""The output of the synthetic corpus: JSONL shards, the key of what was planted, and reading both back.

``ShardWriter`` rotates ``part-NNNNN.jsonl[.gz|.zst]`` after a number of uncompressed bytes;
``Key`` is ``DIR/key.json``; ``verify`` re-reads the shards and checks them against the key.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from pretrain.data.dedup import jaccard
from pretrain.errors import UserError

KEY_FORMAT = "synth-corpus-v1"


def doc_id_at(index: int) -> str:
    """A document's id: its position in the stream, zero-padded (``000000017``)."""
    return f"{index:09d}"


@dataclass
class Key:
    """What was planted (``DIR/key.json``); documents are named by ``id`` = their position in the stream."""

    format: str
    seed: int
    target_bytes: int
    bytes: int
    documents: int
    compression: str
    shards: List[dict]
    corpora: Dict[str, dict]
    missing_corpora: Dict[str, str]
    eval_files: List[str]  # relative to DIR when generated there
    eval_files_generated: bool
    dedup: dict  # the DedupConfig the Jaccard values were measured with
    decontam_ngram: int
    plants: dict  # PlantConfig
    exact_duplicates: List[dict]  # {original, copies: [{id, variation}]}
    near_duplicates: List[dict]  # {base, variants: [{id, target}], pairs: [{a, b, target, jaccard}]}
    contamination: List[dict]  # {id, spans: [{eval_file, text_index, word_offset, words, span}]}
    totals: dict

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Key":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def eval_paths(self, out_dir) -> List[str]:
        return [f if Path(f).is_absolute() else str(Path(out_dir) / f) for f in self.eval_files]

    def near_pairs(self) -> List[dict]:
        return [p for c in self.near_duplicates for p in c["pairs"]]


class ShardWriter:
    """JSONL shards rotated after ``shard_bytes`` uncompressed bytes."""

    SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}

    def __init__(self, out_dir: Path, shard_bytes: int, compression: str):
        if compression not in self.SUFFIX:
            raise UserError(f"--compression={compression!r}: choose one of none|gzip|zstd")
        if compression == "zstd":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise UserError("--compression zstd needs the zstandard module (pip install zstandard); use gzip or none") from None
        self.dir, self.limit, self.compression = out_dir, shard_bytes, compression
        self.shards: List[dict] = []
        self.f = self.raw = None
        self.bytes = self.docs = 0

    def _open(self) -> None:
        name = f"part-{len(self.shards):05d}.jsonl{self.SUFFIX[self.compression]}"
        self.raw = open(self.dir / name, "wb")
        if self.compression == "gzip":
            self.f = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0)
        elif self.compression == "zstd":
            import zstandard

            self.f = zstandard.ZstdCompressor(level=3).stream_writer(self.raw)
        else:
            self.f = io.BufferedWriter(self.raw, 1 << 20)
        self.shards.append(dict(file=name, first_id=doc_id_at(self.docs), documents=0, bytes=0))

    def write(self, doc_id: str, text: str) -> int:
        if self.f is None:
            self._open()
        line = (json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n").encode("utf-8")
        self.f.write(line)
        sh = self.shards[-1]
        sh["documents"] += 1
        sh["bytes"] += len(line)
        self.bytes += len(line)
        self.docs += 1
        if sh["bytes"] >= self.limit:
            self.close()
        return len(line)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            if self.raw is not None and not self.raw.closed:
                self.raw.close()
            self.f = self.raw = None


def read_shards(out_dir) -> Iterator[Tuple[str, str]]:
    """(id, text) of every document, in stream order."""
    key = Key.load(Path(out_dir) / "key.json")
    for sh in key.shards:
        path = Path(out_dir) / sh["file"]
        if path.suffix == ".gz":
            f = gzip.open(path, "rt", encoding="utf-8")
        elif path.suffix == ".zst":
            import zstandard

            f = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
        else:
            f = open(path, encoding="utf-8")
        with f:
            for line in f:
                rec = json.loads(line)
                yield rec["id"], rec["text"]


def verify(out_dir) -> List[str]:
    """Problems found re-reading ``out_dir`` against its key (empty: consistent)."""
    key, problems = Key.load(Path(out_dir) / "key.json"), []
    wanted = {e["original"] for e in key.exact_duplicates} | {c["id"] for e in key.exact_duplicates for c in e["copies"]}
    wanted |= {p[x] for p in key.near_pairs() for x in "ab"} | {c["id"] for c in key.contamination}
    texts, n, size = {}, 0, 0
    for doc_id, text in read_shards(out_dir):
        if doc_id != doc_id_at(n):
            problems.append(f"document {n} has id {doc_id}")
        n += 1
        size += len((json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n").encode())
        if doc_id in wanted:
            texts[doc_id] = text
    if (n, size) != (key.documents, key.bytes):
        problems.append(f"read {n} documents, {size} bytes; the key says {key.documents}, {key.bytes}")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731  (dedup.py's exact key)
    for e in key.exact_duplicates:
        for c in e["copies"]:
            if norm(texts[c["id"]]) != norm(texts[e["original"]]):
                problems.append(f"exact duplicate {c['id']} differs from {e['original']}")
    for p in key.near_pairs():
        j = jaccard(texts[p["a"]], texts[p["b"]], key.dedup["shingle_words"])
        if abs(j - p["jaccard"]) > 1e-6:
            problems.append(f"near-duplicate pair {p['a']}/{p['b']}: Jaccard {j:.6f}, key {p['jaccard']}")
    for c in key.contamination:
        for sp in c["spans"]:
            if sp["span"] not in texts[c["id"]]:
                problems.append(f"contamination span of {c['id']} not found verbatim")
    return problems
