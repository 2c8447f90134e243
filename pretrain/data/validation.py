"""``validate_data_config``: every cheap check of a ``data`` config, before any process group starts.

Cheap means no corpus is read: source paths, globs and folders are listed and stat'ed, the
first records of a JSONL file and the schema of a Parquet file are peeked at (for
``text_field``), built-in corpora are looked up (installed or not), fixed tokenizers are loaded.
Every problem found is collected, each naming its key (``data.sources[2].path``) and the fix,
and one DataConfigError lists them all. ``prepare_data`` calls it first; the train entry point
calls it on every rank before process groups start.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.data.config import EXECUTORS, DataConfig, SourceConfig, StagesConfig
from pretrain.data.mixture import split_fractions
from pretrain.data.sources import BAD_RECORD_POLICIES, DataConfigError, source_files
from pretrain.data.tokenizer import KINDS, load_fixed

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")

# stage field -> (lowest, highest, lowest excluded); None: unbounded on that side.
_RANGES = {
    "clean.min_chars": (0, None, False),
    "clean.min_words_per_line": (0, None, False),
    "clean.min_sentences": (0, None, False),
    "clean.max_invalid_utf8_fraction": (0, 1, False),
    "clean.spans_in_memory": (1, None, False),
    "quality.alpha": (0, None, True),
    "quality.n_features": (1, None, False),
    "quality.ngram_max": (1, None, False),
    "quality.max_train_docs": (1, None, False),
    "quality.max_chars": (1, None, False),
    "clean.max_repeated_span_fraction": (0, 1, True),
    "dedup.threshold": (0, 1, True),
    "dedup.num_perm": (2, None, False),
    "dedup.shingle_words": (1, None, False),
    "dedup.docs_per_pass": (1, None, False),
    "decontam.ngram": (1, None, False),
    "decontam.window_chars": (0, None, False),
    "decontam.max_splits": (0, None, False),
    "decontam.min_fragment_chars": (0, None, False),
}


def validate_data_config(data_cfg) -> None:
    """Raise one DataConfigError listing every problem of ``data_cfg`` (DictConfig, dict or DataConfig).

    Reads no corpus and starts nothing; safe to call on every rank before process groups exist.
    """
    problems = data_config_problems(data_cfg)
    if problems:
        n = len(problems)
        raise DataConfigError(f"data config: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(f"  - {p}" for p in problems))


def data_config_problems(data_cfg) -> List[str]:
    """Every problem found, one message each (key first, then what is wrong and the fix)."""
    problems: List[str] = []
    cfg = _typed(data_cfg, problems)
    if cfg is None:
        return problems
    if cfg.name == "synthetic":  # pretrain/synthetic.py generates the tokens: nothing to read
        if not isinstance(cfg.tokenizer.vocab_size, int) or cfg.tokenizer.vocab_size < 2:
            problems.append(f"data.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: the synthetic stream needs at least 2")
        return problems
    eff = _check_sources(cfg, problems)
    _check_stages(cfg.stages, "data.stages", None, problems)
    for i, s in enumerate(cfg.sources):
        if s.overrides and s.name in eff:
            _check_stages(eff[s.name], f"data.sources[{i}].overrides", _override_fields(s.overrides), problems)
    _check_mixture(cfg, problems)
    _check_eval_and_quality(cfg, eff, problems)
    _check_tokenizer(cfg, problems)
    _check_misc(cfg, problems)
    return problems


def effective_stages(cfg: DataConfig, src: SourceConfig, key: Optional[str] = None) -> StagesConfig:
    """Global stage settings with the source's overrides applied."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.stages), src.overrides or {}))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise DataConfigError(f"{key or f'data.sources[{src.name}]'}.overrides: {msg}; use the fields of data.stages") from None


# ---- schema ---------------------------------------------------------------------------------------


def _omegaconf_problem(prefix: str, e: OmegaConfBaseException) -> str:
    full_key = getattr(e, "full_key", None)
    msg = getattr(e, "msg", None) or str(e).splitlines()[0]
    where = f"{prefix}.{full_key}" if full_key else prefix
    return f"{where}: {msg.splitlines()[0]} (see pretrain/data/config.py for the schema)"


def _typed(data_cfg, problems: List[str]) -> Optional[DataConfig]:
    """The typed config; schema problems (unknown keys, wrong types, missing values) are collected
    per source and for the rest, so that several are reported at once."""
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    try:
        raw = OmegaConf.to_container(data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(data_cfg), resolve=True)
    except OmegaConfBaseException as e:
        problems.append(_omegaconf_problem("data", e))
        return None
    if not isinstance(raw, dict):
        problems.append("data: expected a mapping (conf/data/*.yaml)")
        return None
    sources = raw.pop("sources", None) or []
    ok = True
    try:
        top = OmegaConf.merge(OmegaConf.structured(DataConfig), {**raw, "sources": []})
        for k in sorted(OmegaConf.missing_keys(top)):
            problems.append(f"data.{k}: required (no value given)")
            ok = False
    except OmegaConfBaseException as e:
        problems.append(_omegaconf_problem("data", e))
        ok, top = False, None
    typed_sources = []
    if not isinstance(sources, list):
        problems.append("data.sources: expected a list of sources ({name, path, ...})")
        sources, ok = [], False
    for i, s in enumerate(sources):
        try:
            m = OmegaConf.merge(OmegaConf.structured(SourceConfig), s)
            missing = sorted(OmegaConf.missing_keys(m))
            if missing:
                problems.extend(f"data.sources[{i}].{k}: required (no value given)" for k in missing)
                ok = False
            else:
                typed_sources.append(m)
        except (OmegaConfBaseException, ValueError) as e:
            if isinstance(e, OmegaConfBaseException):
                problems.append(_omegaconf_problem(f"data.sources[{i}]", e))
            else:
                problems.append(f"data.sources[{i}]: expected a mapping {{name, path, ...}}")
            ok = False
    if not ok:
        return None
    top.sources = typed_sources
    return OmegaConf.to_object(top)


# ---- checks ---------------------------------------------------------------------------------------


def _check_sources(cfg: DataConfig, problems: List[str]) -> Dict[str, StagesConfig]:
    eff: Dict[str, StagesConfig] = {}
    if not cfg.sources:
        problems.append("data.sources is empty: list at least one source (name, path)")
    if cfg.root is not None and not Path(os.path.expanduser(str(cfg.root))).is_dir():
        problems.append(f"data.root={cfg.root}: not a folder; set it to the folder holding the sources' relative paths")
    first: Dict[str, int] = {}
    for i, s in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if not _NAME.match(str(s.name)):
            problems.append(f"{key}.name={s.name!r}: use letters, digits, '_', '-', '.'")
        if s.name in first:
            problems.append(f"{key}.name={s.name!r}: data.sources[{first[s.name]}] has that name too; names must be unique")
        first.setdefault(s.name, i)
        if s.on_bad_record not in BAD_RECORD_POLICIES:
            problems.append(f"{key}.on_bad_record={s.on_bad_record!r}: choose one of {'|'.join(BAD_RECORD_POLICIES)}")
        if s.max_docs is not None and s.max_docs < 1:
            problems.append(f"{key}.max_docs={s.max_docs}: must be at least 1, or null for all documents")
        if not s.text_field:
            problems.append(f"{key}.text_field is empty: name the JSONL/Parquet field holding the text")
        try:
            eff[s.name] = effective_stages(cfg, s, key)
        except DataConfigError as e:
            problems.append(str(e))
        try:
            fmt, files = source_files(s, cfg.root, key)
        except DataConfigError as e:
            problems.append(f"{e} (source {s.name!r})")
            continue
        if fmt == "builtin":
            continue
        empty = [f for f in files if f.stat().st_size == 0]
        if empty and len(empty) == len(files):
            what = str(files[0]) if len(files) == 1 else f"all {len(files)} files ({files[0]}, ...)"
            problems.append(
                f"{key}.path: {what} empty (0 bytes): source {s.name!r} has no documents; "
                f"point it at the data or remove the source"
            )
        elif empty and s.on_bad_record == "error":
            problems.append(
                f"{key}.path: {empty[0]} is empty (0 bytes){f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}; "
                f"remove the empty file(s), or set {key}.on_bad_record=drop to skip them"
            )
    return eff


def _override_fields(overrides) -> set:
    out = set()
    if isinstance(overrides, dict) or OmegaConf.is_dict(overrides):
        for stage, fields in dict(overrides).items():
            if isinstance(fields, dict) or OmegaConf.is_dict(fields):
                out.update(f"{stage}.{f}" for f in dict(fields))
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_stages(stages: StagesConfig, prefix: str, only: Optional[set], problems: List[str]) -> None:
    for name, (lo, hi, open_lo) in _RANGES.items():
        if only is not None and name not in only:
            continue
        stage, fld = name.split(".")
        v = getattr(getattr(stages, stage), fld)
        bad = not _number(v) or (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi)
        if bad:
            lo_s = "" if lo is None else f"{'>' if open_lo else '>='} {lo:g}"
            hi_s = "" if hi is None else f"<= {hi:g}"
            problems.append(f"{prefix}.{name}={v}: must be {' and '.join(x for x in (lo_s, hi_s) if x)}")
    if only is None or "dedup.lsh_weights" in only:
        w = stages.dedup.lsh_weights
        if len(w) != 2 or not all(_number(x) and 0 <= x <= 1 for x in w) or abs(sum(w) - 1) > 1e-6:
            problems.append(f"{prefix}.dedup.lsh_weights={list(w)}: give two weights in [0, 1] summing to 1, "
                            "(false positives, false negatives), e.g. [0.05, 0.95]")
    if only is None or "clean.unicode_form" in only:
        form = stages.clean.unicode_form
        if str(form).upper() not in {f.upper() for f in UNICODE_FORMS}:
            problems.append(f"{prefix}.clean.unicode_form={form!r}: choose one of {'|'.join(UNICODE_FORMS)}")


def _check_mixture(cfg: DataConfig, problems: List[str]) -> None:
    valid = True
    for i, s in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if s.weight is not None and s.epochs is not None:
            problems.append(f"{key}: give weight or epochs, not both")
            valid = False
        if s.weight is not None and (not _number(s.weight) or s.weight < 0):
            what = "is negative" if _number(s.weight) else "is not a finite number"
            problems.append(f"{key}.weight={s.weight} {what}: give a share of training samples >= 0 (0: prepared, never sampled)")
            valid = False
        if s.epochs is not None and (not _number(s.epochs) or s.epochs <= 0):
            problems.append(f"{key}.epochs={s.epochs}: must be positive (passes over the source), or give a weight")
            valid = False
    given = [s for s in cfg.sources if s.weight is not None or s.epochs is not None]
    if given and len(given) != len(cfg.sources):
        missing = [f"data.sources[{i}]" for i, s in enumerate(cfg.sources) if s.weight is None and s.epochs is None]
        problems.append(f"{', '.join(missing)}: give every source a weight or epochs, or none of them (weights then follow size)")
    elif valid and given and all(s.epochs is None for s in cfg.sources) and sum(s.weight for s in cfg.sources) <= 0:
        problems.append("data.sources[*].weight: the weights sum to zero; give at least one positive weight")
    try:
        if split_fractions(cfg.split)[0] <= 0:
            problems.append(f"data.split={cfg.split!r}: the train share is 0; give it a positive first number")
    except DataConfigError as e:
        problems.append(str(e))
    if cfg.token_budget is not None and (not _number(cfg.token_budget) or cfg.token_budget <= 0):
        problems.append(f"data.token_budget={cfg.token_budget}: must be positive, or null for the sum of source tokens")
    if not _number(cfg.max_epochs_warning) or cfg.max_epochs_warning <= 0:
        problems.append(f"data.max_epochs_warning={cfg.max_epochs_warning}: must be positive")


def _check_eval_and_quality(cfg: DataConfig, eff: Dict[str, StagesConfig], problems: List[str]) -> None:
    if any(e.decontam.enabled for e in eff.values()):
        for j, f in enumerate(cfg.eval_files):
            if not Path(os.path.expanduser(str(f))).is_file():
                problems.append(f"data.eval_files[{j}]: {f} does not exist; fix the path, remove it, or disable data.stages.decontam")
    filtered = [f"data.sources[{i}]" for i, s in enumerate(cfg.sources) if s.name in eff and eff[s.name].quality.enabled and not s.curated]
    if cfg.sources and filtered and not any(s.curated for s in cfg.sources):
        problems.append(
            f"{', '.join(filtered)}: quality-filtered but no source is curated; mark the reference sources "
            f"`curated: true`, or set data.stages.quality.enabled=false"
        )


def _check_tokenizer(cfg: DataConfig, problems: List[str]) -> None:
    tok = cfg.tokenizer
    if tok.kind not in KINDS:
        problems.append(f"data.tokenizer.kind={tok.kind!r}: choose one of {'|'.join(KINDS)}")
        return
    if not tok.eod_token:
        problems.append("data.tokenizer.eod_token is empty: set it (GPT-2's is <|endoftext|>)")
        return
    if tok.kind == "bpe":
        if not isinstance(tok.vocab_size, int) or tok.vocab_size < 257:
            problems.append(f"data.tokenizer.vocab_size={tok.vocab_size}: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")
        if tok.min_frequency < 1:
            problems.append(f"data.tokenizer.min_frequency={tok.min_frequency}: must be at least 1")
        if tok.train_bytes < 1:
            problems.append(f"data.tokenizer.train_bytes={tok.train_bytes}: must be positive")
        return
    try:
        load_fixed(tok)
    except (FileNotFoundError, ValueError) as e:
        problems.append(str(e))
    except Exception as e:  # a tokenizer JSON that tokenizers cannot parse
        problems.append(f"data.tokenizer.path={tok.path!r}: cannot load it as a tokenizers JSON ({str(e).splitlines()[0]})")


def _check_misc(cfg: DataConfig, problems: List[str]) -> None:
    if cfg.executor not in EXECUTORS:
        problems.append(f"data.executor={cfg.executor!r}: choose one of {'|'.join(EXECUTORS)}")
    elif cfg.executor == "slurm":
        _check_slurm(cfg, problems)
    elif cfg.executor == "ray":
        _check_ray(cfg, problems)
    if cfg.task_bytes < 100_000:
        problems.append(f"data.task_bytes={cfg.task_bytes}: must be at least 100000 (bytes per task of a chunked stage)")
    if cfg.num_workers is not None and cfg.num_workers < 1:
        problems.append(f"data.num_workers={cfg.num_workers}: must be at least 1, or null for all cores")
    cache = Path(os.path.expanduser(str(cfg.cache_dir)))
    if cache.exists() and not cache.is_dir():
        problems.append(f"data.cache_dir={cfg.cache_dir}: exists and is not a folder; choose another path")
    else:
        parent = cache
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"data.cache_dir={cfg.cache_dir}: {parent} is not writable; choose a writable folder (or set PRETRAIN_CACHE)")


def _check_slurm(cfg: DataConfig, problems: List[str]) -> None:
    import shutil

    from pretrain.errors import UserError
    from pretrain.launch.cluster import load_cluster

    sc = cfg.slurm
    try:
        load_cluster(sc.cluster, list(sc.overrides))
    except UserError as e:
        problems.append(f"data.slurm.cluster={sc.cluster!r}: {e}".replace("\n", "; "))
    missing = [b for b in ("sbatch", "squeue") if shutil.which(b) is None]
    if missing:
        problems.append(f"data.executor=slurm: {' and '.join(missing)} not found on PATH; run on a Slurm login node, "
                        f"or choose data.executor=local|ray")
    for name, value, low in (("cpus_per_task", sc.cpus_per_task, 1), ("max_parallel", sc.max_parallel, 1)):
        if value is not None and value < low:
            problems.append(f"data.slurm.{name}={value}: must be at least {low}")
    if not sc.poll_seconds > 0:
        problems.append(f"data.slurm.poll_seconds={sc.poll_seconds}: must be positive")


def _check_ray(cfg: DataConfig, problems: List[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        problems.append("data.executor=ray needs the ray package: pip install 'pretrain[ray]' (or choose data.executor=local)")
    if cfg.ray.cpus_per_task < 1:
        problems.append(f"data.ray.cpus_per_task={cfg.ray.cpus_per_task}: must be at least 1")
    if not cfg.ray.mem_per_cpu_gb > 0:
        problems.append(f"data.ray.mem_per_cpu_gb={cfg.ray.mem_per_cpu_gb}: must be positive")


def to_config(data_cfg) -> DataConfig:
    """The typed DataConfig of a composed ``data`` section (DictConfig, dict or DataConfig)."""
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise DataConfigError(f"data config: set {', '.join('data.' + k for k in missing)} (no value given)")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise DataConfigError(f"data config: {e}".replace("\n", "; ")) from None


def check(data_cfg) -> Tuple[DataConfig, Dict[str, StagesConfig]]:
    """validate_data_config, then the typed config and each source's effective stages."""
    validate_data_config(data_cfg)
    cfg = _typed(data_cfg, [])
    return cfg, {s.name: effective_stages(cfg, s) for s in cfg.sources}
