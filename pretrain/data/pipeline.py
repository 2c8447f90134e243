"""prepare_data: sources -> clean -> quality -> dedup -> decontam -> tokenizer -> shards, cached.

Every stage's key is computed up front from the config and the inputs' fingerprints (file
sizes and mtimes), so a finished run is recognised without reading any text: the second call
(other ranks after the barrier, or a re-run) is a cheap cache hit. Called by rank 0 first.
Each stage runs as tasks on data.executor (stages.py, tasks.py, executors.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import OmegaConf

from pretrain.data import cache, slurm_jobs, stages
from pretrain.data.config import DataConfig, StagesConfig
from pretrain.data.mixture import mixture_report, print_report, write_report
from pretrain.data.progress import StageProgress
from pretrain.data.sources import DataConfigError, fingerprint
from pretrain.data.tokenizer import fixed_fingerprint
from pretrain.data.validation import check, effective_stages, to_config  # noqa: F401  (effective_stages, to_config: API)

@dataclass
class PreparedData:
    """What the trainer needs from the pipeline; ``sources`` are (name, dataset_prefix, weight)."""

    tokenizer_file: str
    vocab_size: int
    eod_id: int
    sources: List[Tuple[str, str, float]]
    shard_dir: str
    tokens: Dict[str, int] = field(default_factory=dict)  # per source, all splits, EOD included
    docs: Dict[str, int] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    stage_stats: Dict[str, dict] = field(default_factory=dict)
    cache_hit: bool = False


# ---- config ---------------------------------------------------------------------------------------


def validate(cfg) -> Dict[str, StagesConfig]:
    """Every cheap check (see validation.py); returns each source's effective stages."""
    return check(cfg)[1]


# ---- stage keys -----------------------------------------------------------------------------------


def _keys(cfg: DataConfig, eff: Dict[str, StagesConfig]) -> Dict[str, object]:
    clean = {}
    for s in cfg.sources:
        # on_bad_record decides what the read keeps (drop) or whether it finishes at all (error).
        ident = {k: getattr(s, k) for k in ("path", "format", "text_field", "max_docs", "on_bad_record")}
        rules = {k: v for k, v in asdict(eff[s.name].clean).items() if k != "spans_in_memory"}  # output does not depend on it
        clean[s.name] = cache.make_key("clean-v3", ident, fingerprint(s, cfg.root), rules)
    order = [s.name for s in cfg.sources]
    quality = cache.make_key(
        "quality-v3", order, clean, {s.name: (s.curated, asdict(eff[s.name].quality)) for s in cfg.sources}
    )
    dedup_cfg = {k: v for k, v in asdict(cfg.stages.dedup).items() if k != "docs_per_pass"}  # output does not depend on it
    dedup = cache.make_key("dedup-v3", quality, dedup_cfg, {n: e.dedup.enabled for n, e in eff.items()})
    evals = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in cfg.eval_files if os.path.isfile(f)]
    decontam = cache.make_key("decontam-v2", dedup, evals, {n: asdict(e.decontam) for n, e in eff.items()})
    tok = asdict(cfg.tokenizer)
    tokenizer = cache.make_key("tokenizer-v2", tok, decontam if cfg.tokenizer.kind == "bpe" else fixed_fingerprint(cfg.tokenizer))
    shards = cache.make_key("shards-v2", decontam, tokenizer)
    return dict(clean=clean, quality=quality, dedup=dedup, decontam=decontam, tokenizer=tokenizer, shards=shards)


# ---- helpers --------------------------------------------------------------------------------------


class _Run:
    """State of one prepare_data call: config, console, and each finished stage's stats."""

    def __init__(self, cfg: DataConfig, eff: Dict[str, StagesConfig], console):
        self.cfg, self.eff, self.console = cfg, eff, console
        self.root = Path(os.path.expanduser(cfg.cache_dir))
        self.stats: Dict[str, dict] = {}
        # The tasks' copy of the config: plain data, interpolations resolved.
        self.cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def progress(self, desc: str, total_bytes=None, tokens: bool = False) -> StageProgress:
        """A stage's progress bar (data.progress, on a terminal): docs, MB, MB/s, ETA, tokens/s."""
        import sys

        return StageProgress(desc, total_bytes, bool(self.cfg.progress) and sys.stderr.isatty(), tokens)

    def workers(self, tasks: int) -> int:
        """Processes the local executor runs at once for a stage of ``tasks`` tasks."""
        return max(1, min(self.cfg.num_workers or len(os.sched_getaffinity(0)), tasks))

    def chunk_bytes(self, parts: Dict[str, List[Path]]) -> int:
        """Bytes per task of a chunked stage: a 32nd of its input (so that workers finish together),
        at least 256 kB, at most data.task_bytes; never the worker count, so that the stage's output
        is the same on any executor."""
        return self.task_bytes(sum(p.stat().st_size for ps in parts.values() for p in ps))

    def task_bytes(self, total: int) -> int:
        """A 32nd of ``total`` bytes, at least 256 kB, at most data.task_bytes."""
        return int(min(self.cfg.task_bytes, max(256_000, total // 32)))

    def docs_files(self, stage: str, key: str) -> Dict[str, List[Path]]:
        m = cache.read_manifest(cache.stage_dir(self.root, stage, key))
        self.stats[stage] = m.get("stats", {})
        return {n: [self.root / r for r in rels] for n, rels in m["docs"].items()}


# ---- entry ----------------------------------------------------------------------------------------


def prepare_data(data_cfg, console=None) -> PreparedData:
    """Run (or reuse from ``data_cfg.cache_dir``) every stage up to the shards; rank 0 calls it first.

    Raises DataConfigError for bad input before any work starts (and for a source left empty by
    a filter, when that stage runs).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    cfg, eff = check(data_cfg)  # validate_data_config first: every cheap problem at once
    if cfg.name == "synthetic":
        raise DataConfigError("data=synthetic has nothing to prepare: pretrain/synthetic.py generates its tokens")
    keys = _keys(cfg, eff)
    run = _Run(cfg, eff, console)
    shard_path = cache.stage_dir(run.root, "shards", keys["shards"])
    hit = cache.is_done(shard_path)
    t0 = time.time()
    if hit:
        console.print(f"data [bold]{cfg.name}[/bold]: reusing prepared shards {shard_path}")
    else:
        console.print(f"data [bold]{cfg.name}[/bold]: preparing {len(cfg.sources)} sources into {run.root} "
                      f"(executor {cfg.executor})")
        if cfg.executor == "slurm" and cfg.slurm.chain and not slurm_jobs.in_step():
            slurm_jobs.run(cfg, run.cfg_dict, slurm_jobs.folder(run.root, keys["shards"]), shard_path, console)
        else:
            _run_stages(run, keys)
        console.print(f"data prepared in {time.time() - t0:.1f}s")
    return _prepared(cfg, run.root, keys, shard_path, console, hit)


def _run_stages(run: _Run, keys) -> None:
    from pretrain.data.executors import shutdown, start_local_workers

    if run.cfg.executor == "local" and run.workers(1 << 30) > 1:
        start_local_workers()  # their imports overlap the first stage
    try:
        files = stages.clean(run, keys)
        for stage, fn in (("quality", stages.quality), ("dedup", stages.dedup), ("decontam", stages.decontam)):
            if cache.is_done(cache.stage_dir(run.root, stage, keys[stage])):
                files = run.docs_files(stage, keys[stage])
                run.console.print(f"{stage}: reusing cached output")
            else:
                files = fn(run, keys, files)
        tok_file = stages.tokenizer(run, keys, files)
        stages.shards(run, keys, files, tok_file)
    finally:
        shutdown()  # a local Ray started for this job


def _prepared(cfg: DataConfig, root: Path, keys, shard_path: Path, console, hit: bool) -> PreparedData:
    m = cache.read_manifest(shard_path)
    tok_dir = cache.stage_dir(root, "tokenizer", keys["tokenizer"])
    tm = cache.read_manifest(tok_dir)
    tokens = {n: s["tokens"] for n, s in m["sources"].items()}
    clean_stats = m.get("stats", {}).get("clean", {})
    bad = {n: clean_stats.get(n, {}).get("bad_records", 0) for n in tokens}
    report = mixture_report(cfg.sources, tokens, cfg.split, cfg.token_budget, cfg.max_epochs_warning, bad_records=bad)
    print_report(console, report)
    write_report(shard_path / "mixture_report.json", report)
    weights = {r["source"]: r["weight"] for r in report["sources"]}
    return PreparedData(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        vocab_size=tm["vocab_size"],
        eod_id=tm["eod_id"],
        sources=[(s.name, str(shard_path / s.name), weights[s.name]) for s in cfg.sources if weights[s.name] > 0],
        shard_dir=str(shard_path),
        tokens=tokens,
        docs={n: s["docs"] for n, s in m["sources"].items()},
        report=report,
        stage_stats=m.get("stats", {}),
        cache_hit=hit,
    )
