"""Inputs on any fsspec filesystem: a source ``path`` with a protocol (``s3://bucket/crawl/*.jsonl.zst``,
``gs://``, ``hf://datasets/...``, ``https://``, ``file://``, or a chained URL such as
``zip://*.jsonl::file:///data/dump.zip``). The filesystem's own package (s3fs, gcsfs, ...) and its
credentials are the user's; fsspec finds both.

A file is identified for the cache by its URL, its size and a hash of what the store says about it
(ETag, Last-Modified, mtime, checksums: whatever its ``info`` holds), so a changed file is read again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import SimpleNamespace
from typing import List

from pretrain.data.records import DataConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|::")


def is_url(path) -> bool:
    """True for a path that names a filesystem (``s3://...``, ``file://...``, ``a::b``)."""
    return bool(_URL.search(str(path)))


def _filesystem(url: str, key: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # a known protocol whose package is not installed
        raise DataConfigError(f"{key}.path={url!r}: {e}; install the filesystem's package (e.g. s3fs, gcsfs)") from None
    except ValueError as e:  # an unknown protocol, or a store that cannot serve the file this way
        raise DataConfigError(f"{key}.path={url!r}: {e}; fix the URL") from None


@dataclass(frozen=True)
class RemoteFile:
    """A file of an fsspec filesystem, with the parts of ``pathlib.Path`` the readers use."""

    url: str
    size: int
    version: str

    @property
    def _path(self) -> PurePosixPath:
        return PurePosixPath(self.url.split("::")[0].split("://")[-1])

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def suffixes(self) -> List[str]:
        return self._path.suffixes

    def stat(self):
        return SimpleNamespace(st_size=self.size)

    def open(self, mode: str = "rb"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url)
        f = fs.open(path, mode)
        f.filesystem = fs  # a zip:// file reads through its filesystem's handle on the archive: keep it open
        return f

    def __str__(self) -> str:
        return self.url


def list_files(url: str, glob: bool, key: str) -> List[RemoteFile]:
    """The files a URL names: the glob's matches, everything under a folder, or the one file."""
    fs, path = _filesystem(url, key)
    fs.invalidate_cache()  # listings cached by an earlier call in this process may be stale
    try:
        if glob:
            listed = fs.glob(path, detail=True)
        elif fs.isdir(path):
            listed = fs.find(path, detail=True)
        elif fs.exists(path):
            listed = {path: fs.info(path)}
        else:
            raise DataConfigError(f"{key}.path: {url} does not exist; fix the URL or remove the source")
        # One listing gives most stores' sizes and versions; a store that lists names only (HTTP) is asked per file.
        infos = [(n, i if i.get("size") is not None else fs.info(n)) for n, i in sorted(listed.items())]
    except OSError as e:  # PermissionError, FileNotFoundError, a store's own errors
        raise DataConfigError(f"{key}.path: cannot list {url} ({e}); check the URL and the store's credentials") from None
    chained = url.split("::", 1)[1] if "::" in url else None  # keep the outer filesystems of a chained URL
    return [
        RemoteFile(fs.unstrip_protocol(n) + (f"::{chained}" if chained else ""), int(info.get("size") or 0), _version(info))
        for n, info in infos
        if info.get("type", "file") == "file"
    ]



def _version(info: dict) -> str:
    """A hash of what the store says about a file (size, ETag, Last-Modified, mtime, checksums...).
    Not ``fs.ukey``: for some filesystems (HTTP) that hashes the URL alone."""
    import hashlib

    meta = sorted((k, str(v)) for k, v in info.items() if k not in ("name", "url"))
    return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()
