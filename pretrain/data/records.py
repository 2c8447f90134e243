"""What a record that cannot be a document is, and what happens to it (``SourceConfig.on_bad_record``).

``BadRecords`` refuses one (policy ``error``: a DataConfigError naming the file, the line or row,
what is wrong and the fix) or counts, logs and drops it (``drop``). ``decode`` and ``checked_text``
tell a readable text from invalid UTF-8 and from null, non-string or empty values.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import List, Optional

from pretrain.data.config import SourceConfig
from pretrain.errors import UserError

log = logging.getLogger("pretrain.data")

BAD_RECORD_POLICIES = ("error", "drop")
LOGGED_BAD_RECORDS = 20  # per source; the rest are counted only


class DataConfigError(UserError):
    """A data config or its input is wrong; the message names the key and the fix."""


def source_key(src: SourceConfig, key: Optional[str]) -> str:
    """How messages name a source: its config key (``data.sources[2]``), else by name."""
    return key or f"data.sources[{src.name}]"


class BadRecords:
    """The bad records of one source: refused (policy ``error``) or counted and logged (``drop``)."""

    def __init__(self, src: SourceConfig, key: Optional[str] = None, part=None):
        """``part``: the records are a JSONL part's (file_parts.JsonlPart), lines numbered from its
        start: an error counts the lines before it to name the file's line, and summary() leaves
        the dropped records' lines relative (``bad_record_lines``) for the span pass to place."""
        self.name, self.key, self.policy = src.name, source_key(src, key), src.on_bad_record
        if self.policy not in BAD_RECORD_POLICIES:
            raise DataConfigError(f"{self.key}.on_bad_record={self.policy!r}: choose one of {'|'.join(BAD_RECORD_POLICIES)}")
        self.counts: Counter = Counter()
        self.part = part
        self._examples: List[list] = []  # [file, line, unit, kind]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, file: Path, line: int, kind: str, what: str, unit: str = "line") -> None:
        where = where_in(file, line, unit)
        if self.policy == "error":
            if self.part is not None and line:
                where = where_in(file, line + self.part.lines_before(), unit)
            raise DataConfigError(
                f"{self.key} (source {self.name!r}): {where}: {what}. Fix or remove that record, or set "
                f"{self.key}.on_bad_record=drop to skip bad records (each is counted and logged)"
            )
        if self.part is not None and line:
            where += f" of the part from byte {self.part.start}"
        self.counts[kind] += 1
        if len(self._examples) < 10:
            self._examples.append([str(file), line, unit, kind])
        if self.total <= LOGGED_BAD_RECORDS:
            log.warning("%s (source %r): dropped %s: %s", self.key, self.name, where, what)
        elif self.total == LOGGED_BAD_RECORDS + 1:
            log.warning("%s (source %r): more bad records; they are counted, not logged", self.key, self.name)

    def summary(self) -> dict:
        out = {"bad_records": self.total, "bad_record_kinds": dict(sorted(self.counts.items()))}
        if self.part is not None:
            return {**out, "bad_record_examples": [], "bad_record_lines": self._examples}
        return {**out, "bad_record_examples": [example(*e) for e in self._examples]}


def where_in(file, line: int, unit: str = "line") -> str:
    return f"{file} {unit} {line}" if line else str(file)


def example(file, line: int, unit: str, kind: str, lines_before: int = 0) -> str:
    """A bad record as the stats list it: where, and its kind."""
    return f"{where_in(file, line + lines_before if line else 0, unit)}: {kind}"


def decode(raw: bytes, tolerance: float):
    """(text, None), or (None, why) for invalid UTF-8 beyond ``tolerance`` (a fraction of characters)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd")
        if bad <= tolerance * max(len(text), 1):
            return text, None
        return None, (
            e.start,
            f"invalid UTF-8 ({bad} bad byte sequence(s) in {len(text)} characters, the first at byte {e.start}; "
            f"more than stages.clean.max_invalid_utf8_fraction={tolerance:g} of the text)",
        )


def json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def checked_text(v, field: str):
    """(text, None) or (None, (kind, why)) for a record's text value."""
    if v is None:
        return None, ("null_text", f"field {field!r} is null")
    if not isinstance(v, str):
        return None, ("text_not_string", f"field {field!r} is a {json_type(v)}, not a string")
    if not v.strip():
        return None, ("empty_text", f"field {field!r} is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, ("invalid_utf8", f"field {field!r} holds an unpaired surrogate (\\u{ord(v[e.start]):04x}), not valid Unicode")
    return v, None
