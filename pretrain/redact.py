"""Keeping credentials out of what a run writes (config.yaml, W&B, sbatch scripts).

A name "looks secret" when one of its words (split at ``_ - . /`` and camelCase) is, or ends in,
KEY, TOKEN, SECRET or PASSWORD (case-insensitive): ``WANDB_API_KEY``, ``HF_TOKEN``, ``apiKey``,
``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``. Whole words, so that ``TOKENIZERS_PARALLELISM``,
``data.tokenizer`` and ``optim.warmup_tokens`` do not.

``redacted_config(cfg)`` is the config as a plain dict, safe to write or upload:

- an interpolation that reads the environment (``${oc.env:WANDB_API_KEY}``), or whose value contains
  something read from it, is kept as written, unresolved; every other interpolation is resolved;
- a string under a secret-looking key is replaced by ``REDACTED`` (except the tokenizer's special
  token strings such as ``eod_token``), and so is any string holding the value of a secret-looking
  environment variable.

The result loads back with ``OmegaConf.load`` (the kept interpolations resolve again from the
reader's environment, if ever accessed) and has the same model, parallel and trainer sections.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REDACTED = "REDACTED"
SECRET_WORDS = ("key", "token", "secret", "password")
# Settings whose names contain a secret word but hold no credential.
NOT_SECRET = frozenset({"eod_token", "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "mask_token"})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_ENV_REF = re.compile(r"oc\.env\s*:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")
# Environment values shorter than this are not searched for in literals ("1", "true", a user name).
MIN_SECRET_LEN = 8


def is_secret_name(name: str) -> bool:
    """True when a config key or environment variable name looks like it holds a credential."""
    if str(name).lower() in NOT_SECRET:
        return False
    return any(word.lower().endswith(SECRET_WORDS) for word in _WORD.findall(str(name)))


def secret_env_values(environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """Values of the environment variables whose names look secret (long enough to search for)."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}


def _env_refs(cfg: Any) -> set[str]:
    """Names of the environment variables that ``${oc.env:NAME}`` interpolations in cfg read."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    names: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            names.update(_ENV_REF.findall(value))

    walk(raw)
    return names


def _contains(value: Any, needles: Iterable[str]) -> bool:
    if isinstance(value, dict):
        return any(_contains(v, needles) for v in value.values())
    if isinstance(value, list):
        return any(_contains(v, needles) for v in value)
    return isinstance(value, str) and any(n in value for n in needles)


def _redact_plain(name: Any, value: Any, secrets: set[str]) -> Any:
    """A resolved value, with strings under secret-looking keys or holding secrets redacted."""
    if isinstance(value, dict):
        return {k: _redact_plain(k, v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_plain(name, v, secrets) for v in value]
    if isinstance(value, str) and value and (is_secret_name(name) or _contains(value, secrets)):
        return REDACTED
    return value


def _node(parent: Any, key: Any, name: Any, secrets: set[str], from_env: set[str]) -> Any:
    if OmegaConf.is_interpolation(parent, key):
        raw = parent._get_node(key)._value()
        if _ENV_REF.search(str(raw)):
            return raw
        try:
            value = parent[key]
        except OmegaConfBaseException:
            return raw  # not resolvable here (a resolver of the writing app): keep as written
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if _contains(value, from_env):
            return raw
        return _redact_plain(name, value, secrets)
    try:
        value = parent[key]
    except OmegaConfBaseException:
        return "???"  # a missing mandatory value
    if isinstance(value, (DictConfig, ListConfig)):
        return _walk(value, name, secrets, from_env)
    return _redact_plain(name, value, secrets)


def _walk(cfg: Any, name: Any, secrets: set[str], from_env: set[str]) -> Any:
    if isinstance(cfg, DictConfig):
        if cfg._is_none():
            return None
        return {key: _node(cfg, key, key, secrets, from_env) for key in cfg.keys()}
    if isinstance(cfg, ListConfig):
        if cfg._is_none():
            return None
        return [_node(cfg, i, name, secrets, from_env) for i in range(len(cfg))]
    return _redact_plain(name, cfg, secrets)


def redacted_config(cfg: DictConfig, environ: Optional[Mapping[str, str]] = None) -> dict:
    """The config as a plain dict with no credential in it (see the module docstring)."""
    environ = os.environ if environ is None else environ
    secrets = secret_env_values(environ)
    from_env = {environ[n] for n in _env_refs(cfg) if len(environ.get(n) or "") >= 4}
    return _walk(cfg, None, secrets, from_env | secrets)


def redacted_yaml(cfg: DictConfig, environ: Optional[Mapping[str, str]] = None) -> str:
    """``redacted_config`` as YAML (what ``config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted_config(cfg, environ)))
