"""prepare_data: sources -> clean -> quality -> dedup -> decontam -> tokenizer -> shards, cached.

Every stage's key is computed up front from the config and the inputs' fingerprints (file
sizes and mtimes), so a finished run is recognised without reading any text: the second call
(other ranks after the barrier, or a re-run) is a cheap cache hit. Called by rank 0 first.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.data import cache
from pretrain.data.config import DataConfig, StagesConfig
from pretrain.data.mixture import mixture_report, print_report, write_report
from pretrain.data.progress import StageProgress, write_stage_stats
from pretrain.data.sources import BadRecords, DataConfigError, fingerprint, read_source
from pretrain.data.stats import nbytes, print_stage_table, stage_stats
from pretrain.data.tokenizer import eod_id, fixed_fingerprint, load_fixed, sample_for_training, train_bpe
from pretrain.data.validation import check, effective_stages  # noqa: F401  (effective_stages: API)

Docs = Dict[str, List[Tuple[str, str]]]


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


def validate(cfg) -> Dict[str, StagesConfig]:
    """Every cheap check (see validation.py); returns each source's effective stages."""
    return check(cfg)[1]


# ---- stage keys -----------------------------------------------------------------------------------


def _keys(cfg: DataConfig, eff: Dict[str, StagesConfig]) -> Dict[str, object]:
    clean = {}
    for s in cfg.sources:
        # on_bad_record decides what the read keeps (drop) or whether it finishes at all (error).
        ident = {k: getattr(s, k) for k in ("path", "format", "text_field", "max_docs", "on_bad_record")}
        clean[s.name] = cache.make_key("clean-v2", ident, fingerprint(s, cfg.root), asdict(eff[s.name].clean))
    order = [s.name for s in cfg.sources]
    quality = cache.make_key(
        "quality-v1", order, clean, {s.name: (s.curated, asdict(eff[s.name].quality)) for s in cfg.sources}
    )
    dedup = cache.make_key("dedup-v1", quality, asdict(cfg.stages.dedup), {n: e.dedup.enabled for n, e in eff.items()})
    evals = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in cfg.eval_files if os.path.isfile(f)]
    decontam = cache.make_key("decontam-v1", dedup, evals, {n: asdict(e.decontam) for n, e in eff.items()})
    tok = asdict(cfg.tokenizer)
    tokenizer = cache.make_key("tokenizer-v1", tok, decontam if cfg.tokenizer.kind == "bpe" else fixed_fingerprint(cfg.tokenizer))
    shards = cache.make_key("shards-v1", decontam, tokenizer)
    return dict(clean=clean, quality=quality, dedup=dedup, decontam=decontam, tokenizer=tokenizer, shards=shards)


# ---- helpers --------------------------------------------------------------------------------------


class _Run:
    """State of one prepare_data call: config, console, and the documents of the latest stage."""

    def __init__(self, cfg: DataConfig, eff: Dict[str, StagesConfig], console):
        self.cfg, self.eff, self.console = cfg, eff, console
        self.root = Path(os.path.expanduser(cfg.cache_dir))
        self.stats: Dict[str, dict] = {}

    def progress(self, desc: str, total_bytes=None, tokens: bool = False) -> StageProgress:
        """A stage's progress bar (data.progress, on a terminal): docs, MB, MB/s, ETA, tokens/s."""
        import sys

        return StageProgress(desc, total_bytes, bool(self.cfg.progress) and sys.stderr.isatty(), tokens)

    def docs_files(self, stage: str, key: str) -> Dict[str, Path]:
        m = cache.read_manifest(cache.stage_dir(self.root, stage, key))
        self.stats[stage] = m.get("stats", {})
        return {n: self.root / rel for n, rel in m["docs"].items()}

    def check_nonempty(self, stage: str, docs: Docs) -> None:
        empty = [n for n, d in docs.items() if not d]
        if empty:
            raise DataConfigError(
                f"source(s) {empty} have no documents left after {stage}; loosen data.stages.{stage} "
                f"(or that source's overrides), or remove the source"
            )


def _kinds(counts) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))


def _ticking(docs, bar: StageProgress):
    for doc in docs:
        bar.doc(doc[1])
        yield doc


def _load(files: Dict[str, Path]) -> Docs:
    return {n: cache.read_docs(p) for n, p in files.items()}


def _save_stage(
    run: _Run, stage: str, key: str, docs: Docs, changed: set, upstream: Dict[str, Path], stats: dict, t0: float
) -> Dict[str, Path]:
    """Write changed sources' documents; unchanged ones keep pointing at the upstream file."""
    path = cache.stage_dir(run.root, stage, key)
    with cache.building(path) as (tmp, manifest):
        rel = {}
        for n in docs:
            if n in changed:
                cache.write_docs(tmp / f"{n}.jsonl", docs[n])
                rel[n] = str((path / f"{n}.jsonl").relative_to(run.root))
            else:
                rel[n] = str(upstream[n].relative_to(run.root))
        manifest.update(docs=rel, stats=stats)
        write_stage_stats(tmp, stage, stats, time.time() - t0)
    run.stats[stage] = stats
    print_stage_table(run.console, stage, stats, note=f"{time.time() - t0:.1f}s")
    return {n: run.root / r for n, r in rel.items()}


# ---- stages ---------------------------------------------------------------------------------------


def _stage_clean(run: _Run, keys) -> Dict[str, Path]:
    from pretrain.data.clean import clean_documents

    files, stats, t0 = {}, {}, time.time()
    for i, s in enumerate(run.cfg.sources):
        path = cache.stage_dir(run.root, "clean", keys["clean"][s.name])
        if cache.is_done(path):
            stats[s.name] = cache.read_manifest(path)["stats"]
        else:
            with cache.building(path) as (tmp, manifest):
                raw, cfg, key = [], run.eff[s.name].clean, f"data.sources[{i}]"
                bad = BadRecords(s, key)

                def reading(bar):
                    for doc in read_source(s, run.cfg.root, key=key, bad=bad, max_invalid_utf8_fraction=cfg.max_invalid_utf8_fraction):
                        raw.append(doc)
                        bar.doc(doc[1])
                        yield doc

                t_source = time.time()
                with run.progress(f"read + clean {s.name}") as bar:
                    kept, why = clean_documents(reading(bar), cfg) if cfg.enabled else (list(reading(bar)), {})
                if not raw:
                    dropped = f" ({bad.total} bad records dropped: {_kinds(bad.counts)})" if bad.total else ""
                    raise DataConfigError(
                        f"{key} (source {s.name!r}): no documents in {key}.path={s.path}{dropped}; "
                        f"point it at the data or remove the source"
                    )
                if bad.total:
                    run.console.print(
                        f"[yellow]warning:[/yellow] {s.name}: dropped {bad.total:,} bad records ({_kinds(bad.counts)}), "
                        f"e.g. {bad.examples[0]}"
                    )
                run.check_nonempty("clean", {s.name: kept})
                cache.write_docs(tmp / "docs.jsonl", kept)
                manifest["stats"] = stats[s.name] = {**stage_stats(raw, kept, why), **bad.summary()}
                write_stage_stats(tmp, "clean", {s.name: stats[s.name]}, time.time() - t_source)
        files[s.name] = path / "docs.jsonl"
    run.stats["clean"] = stats
    print_stage_table(run.console, "read + clean", stats, note=f"{time.time() - t0:.1f}s")
    return files


def _stage_quality(run: _Run, keys, upstream: Dict[str, Path]) -> Dict[str, Path]:
    from pretrain.data.quality import quality_filter

    cfgs = {s.name: run.eff[s.name].quality for s in run.cfg.sources}
    targets = [s.name for s in run.cfg.sources if cfgs[s.name].enabled and not s.curated]
    if not targets:
        return upstream
    t0 = time.time()
    docs = _load(upstream)
    curated = {s.name: docs[s.name] for s in run.cfg.sources if s.curated}
    kept, why = quality_filter(curated, {n: docs[n] for n in targets}, cfgs[targets[0]])
    run.check_nonempty("quality", kept)
    stats = {n: stage_stats(docs[n], kept[n], why[n]) for n in targets}
    return _save_stage(run, "quality", keys["quality"], {**docs, **kept}, set(targets), upstream, stats, t0)


def _stage_dedup(run: _Run, keys, upstream: Dict[str, Path]) -> Dict[str, Path]:
    from pretrain.data.dedup import deduplicate

    cfg = run.cfg.stages.dedup
    targets = [s for s in run.cfg.sources if run.eff[s.name].dedup.enabled]
    if not cfg.enabled or not targets:
        return upstream
    t0 = time.time()
    docs = _load(upstream)
    order = [s.name for s in sorted(targets, key=lambda s: not s.curated)]  # curated first
    with run.progress("dedup", sum(nbytes(docs[n]) for n in order)) as bar:
        kept, why = deduplicate({n: docs[n] for n in order}, cfg, progress=bar.doc)
    run.check_nonempty("dedup", kept)
    stats = {n: stage_stats(docs[n], kept[n], why[n]) for n in order}
    return _save_stage(run, "dedup", keys["dedup"], {**docs, **kept}, set(order), upstream, stats, t0)


def _stage_decontam(run: _Run, keys, upstream: Dict[str, Path]) -> Dict[str, Path]:
    from pretrain.data.decontam import build_eval_ngrams, decontaminate

    targets = [s.name for s in run.cfg.sources if run.eff[s.name].decontam.enabled]
    if not targets or not run.cfg.eval_files:
        return upstream
    t0 = time.time()
    docs = _load(upstream)
    kept, stats = {}, {}
    grams_by_n = {}
    for n in targets:
        c = run.eff[n].decontam
        if c.ngram not in grams_by_n:
            grams_by_n[c.ngram] = build_eval_ngrams(run.cfg.eval_files, c.ngram)
        with run.progress(f"decontam {n}", nbytes(docs[n])) as bar:
            kept[n], why = decontaminate(_ticking(docs[n], bar), grams_by_n[c.ngram], c)
        stats[n] = stage_stats(docs[n], kept[n], why)
    run.check_nonempty("decontam", kept)
    return _save_stage(run, "decontam", keys["decontam"], {**docs, **kept}, set(targets), upstream, stats, t0)


def _stage_tokenizer(run: _Run, keys, upstream: Dict[str, Path]) -> Path:
    path = cache.stage_dir(run.root, "tokenizer", keys["tokenizer"])
    if cache.is_done(path):
        return path / "tokenizer.json"
    tc = run.cfg.tokenizer
    with cache.building(path) as (tmp, manifest):
        t0 = time.time()
        if tc.kind == "bpe":
            docs = _load(upstream)
            texts = {n: [t for _, t in d] for n, d in docs.items()}
            tok = train_bpe(sample_for_training(texts, tc.train_bytes), tc)
            what = f"trained a byte-level BPE, vocab {tok.get_vocab_size():,}"
        else:
            tok = load_fixed(tc)
            what = f"loaded the {tc.kind} tokenizer, vocab {tok.get_vocab_size():,}"
        tok.save(str(tmp / "tokenizer.json"))
        manifest.update(vocab_size=tok.get_vocab_size(), eod_id=eod_id(tok, tc.eod_token))
        write_stage_stats(tmp, "tokenizer", {}, time.time() - t0, kind=tc.kind, vocab_size=tok.get_vocab_size())
    run.console.print(f"tokenizer: {what} in {time.time() - t0:.1f}s")
    return path / "tokenizer.json"


def _stage_shards(run: _Run, keys, upstream: Dict[str, Path], tokenizer_file: Path) -> Path:
    from pretrain.data.shards import write_shards

    path = cache.stage_dir(run.root, "shards", keys["shards"])
    tok_manifest = cache.read_manifest(tokenizer_file.parent)
    docs = _load(upstream)
    texts = {n: [t for _, t in d] for n, d in docs.items()}
    in_stats = {n: {"docs_in": len(d), "bytes_in": nbytes(d)} for n, d in docs.items()}
    t0 = time.time()
    total = sum(s["bytes_in"] for s in in_stats.values())
    with cache.building(path) as (tmp, manifest), run.progress("tokenize+write", total, tokens=True) as bar:
        out = write_shards(
            texts, str(tokenizer_file), tok_manifest["eod_id"], tok_manifest["vocab_size"], tmp,
            num_workers=run.cfg.num_workers, on_chunk=bar.add,
        )
        manifest.update(
            tokenizer_key=keys["tokenizer"],
            sources={n: {"docs": o["docs"], "tokens": o["tokens"]} for n, o in out.items()},
            stats=run.stats,
        )
        ntok, dt = sum(o["tokens"] for o in out.values()), time.time() - t0
        for n, o in out.items():
            in_stats[n].update(tokens=o["tokens"])
        write_stage_stats(tmp, "shards", in_stats, dt, tokens=ntok, tokens_per_s=round(ntok / max(dt, 1e-9)))
    run.console.print(f"tokenize+write: {ntok:,} tokens in {dt:.1f}s ({ntok / max(dt, 1e-9):,.0f} tokens/s)")
    return path


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
        console.print(f"data [bold]{cfg.name}[/bold]: preparing {len(cfg.sources)} sources into {run.root}")
        if (cfg.num_workers or len(os.sched_getaffinity(0))) > 1:  # write_shards' worker count
            from pretrain.data.shards import start_worker_server

            start_worker_server()  # its imports overlap the stages before tokenize+write
        files = _stage_clean(run, keys)
        for stage, fn in (("quality", _stage_quality), ("dedup", _stage_dedup), ("decontam", _stage_decontam)):
            if cache.is_done(cache.stage_dir(run.root, stage, keys[stage])):
                files = run.docs_files(stage, keys[stage])
                console.print(f"{stage}: reusing cached output")
            else:
                files = fn(run, keys, files)
        tok_file = _stage_tokenizer(run, keys, files)
        _stage_shards(run, keys, files, tok_file)
        console.print(f"data prepared in {time.time() - t0:.1f}s")
    return _prepared(cfg, run.root, keys, shard_path, console, hit)


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
