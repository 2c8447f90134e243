"""The driver's side of each stage: plan its tasks, run them on the executor, check and publish.

Every stage's output folder holds, per source, its part files (JSONL, ``<source>/part-NNNNN.jsonl``;
the manifest's ``docs`` lists them in order); a source a stage leaves unchanged keeps pointing at
the upstream parts. The task bodies are in stage_tasks.py.
"""

from __future__ import annotations

import importlib
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

from pretrain.data import cache
from pretrain.data.executors import run_tasks
from pretrain.data.progress import write_stage_stats
from pretrain.data.records import DataConfigError
from pretrain.data.stats import print_stage_table
from pretrain.data.tasks import array_file, chunks_of, publish

Parts = Dict[str, List[Path]]


def _kinds(counts) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))


def _rel(run, paths: List[Path]) -> List[str]:
    return [str(p.relative_to(run.root)) for p in paths]


def _context(run, **extra) -> dict:
    return {"cfg": run.cfg_dict, "root": str(run.root), **extra}


def _published_parts(run, stage: str, key: str, partial: Path, names) -> Dict[str, List[str]]:
    """The part files the tasks wrote in ``partial``, as paths under the published folder."""
    final = cache.stage_dir(run.root, stage, key)
    return {n: [str((final / p.relative_to(partial)).relative_to(run.root)) for p in sorted((partial / n).glob("part-*.jsonl"))]
            for n in names}


def _finish(run, stage: str, key: str, partial: Path, docs: Dict[str, List[str]], stats: dict, t0: float,
            extra_manifest: dict | None = None) -> Parts:
    write_stage_stats(partial, stage, stats, time.time() - t0)
    publish(partial, cache.stage_dir(run.root, stage, key), {"docs": docs, "stats": stats, **(extra_manifest or {})})
    run.stats[stage] = stats
    print_stage_table(run.console, stage, stats, note=f"{time.time() - t0:.1f}s")
    return {n: [run.root / r for r in rels] for n, rels in docs.items()}


def _sum_stats(results: List[dict]) -> Dict[str, dict]:
    """Per-source totals of the tasks' stats (several chunks of one source add up)."""
    out: Dict[str, dict] = {}
    for r in results:
        s, acc = r["stats"], out.setdefault(r["source"], {})
        for k, v in s.items():
            if k == "reasons":
                reasons = acc.setdefault("reasons", {})
                for why, n in v.items():
                    reasons[why] = reasons.get(why, 0) + n
            else:
                acc[k] = acc.get(k, 0) + v
    return out


def _size(parts) -> int:
    """Bytes of part files ({source: [paths]}) or of chunks: the progress bar's total."""
    if isinstance(parts, dict):
        return sum(p.stat().st_size for ps in parts.values() for p in ps)
    return sum(c.end - c.start for c in parts)


def _nonempty(stage: str, stats: Dict[str, dict]) -> None:
    empty = [n for n, s in stats.items() if s["docs_out"] == 0]
    if empty:
        raise DataConfigError(
            f"source(s) {empty} have no documents left after {stage}; loosen data.stages.{stage} "
            f"(or that source's overrides), or remove the source"
        )


# ---- read + clean: a task per run of a source's files, then a task per source (clean_tasks.py) ------


def _file_runs(run, index: int, src) -> List[List[int]]:
    """A source's files cut into runs of about a chunk's bytes, as [index, first, end] units for the
    clean-files tasks, a file larger than that into parts, as [index, file, file + 1, start, end]
    units (file_parts.parts: byte ranges of plain JSONL, row groups of Parquet); none (one task reads
    and cleans the source) for one run, for built-in corpora and datasets folders, and under
    max_docs (it stops the read at a document, not a file)."""
    from pretrain.data.file_parts import parts
    from pretrain.data.sources import file_size, source_files

    fmt, files = source_files(src, run.cfg.root, f"data.sources[{index}]")
    if fmt not in ("jsonl", "text", "parquet") or src.max_docs is not None:
        return []
    sizes = [file_size(f) for f in files]
    target, runs, first, acc = run.task_bytes(sum(sizes)), [], 0, 0
    for k, size in enumerate(sizes):
        cut = parts(files[k], fmt, size, target)
        if cut:
            if first < k:
                runs.append([index, first, k])
            runs += [[index, k, k + 1, a, b] for a, b in cut]
            first, acc = k + 1, 0
            continue
        acc += size
        if acc >= target or k == len(sizes) - 1:
            runs.append([index, first, k + 1])
            first, acc = k + 1, 0
    return runs if len(runs) > 1 else []


def clean(run, keys) -> Parts:
    t0, cfg = time.time(), run.cfg
    todo = [(i, s) for i, s in enumerate(cfg.sources) if not cache.is_done(cache.stage_dir(run.root, "clean", keys["clean"][s.name]))]
    stats = {}
    if todo:
        job = cache.make_key("clean-job", [keys["clean"][s.name] for _, s in todo])
        units = [u for i, s in todo for u in _file_runs(run, i, s)]
        pre, pre_dir, pre_wall = {}, None, 0.0
        if units:
            pre_wall = time.time()
            pre_dir, pre_results = run_tasks(run, "clean-files", job, units, _context(run), "read + clean: files", None)
            for i, s in todo:
                ranks = [r for r, u in enumerate(units) if u[0] == i]
                if ranks:
                    pre[s.name] = {"dir": str((pre_dir / s.name).relative_to(run.root)), "ranks": ranks,
                                   "results": [{k: pre_results[r].get(k) for k in ("records", "bytes", "why", "bad", "lines")}
                                               | {"file": units[r][1]} for r in ranks]}
            pre_wall = time.time() - pre_wall
        desc = "read + clean: repeated spans" if len(pre) == len(todo) else "read + clean"
        partial, results = run_tasks(run, "clean", job, [i for i, _ in todo], _context(run, pre=pre), desc, None)
        for (i, s), res in zip(todo, results):
            st, key = res["stats"], f"data.sources[{i}]"
            if st["docs_in"] == 0:
                dropped = f" ({st['bad_records']} bad records dropped: {_kinds(st['bad_record_kinds'])})" if st.get("bad_records") else ""
                raise DataConfigError(f"{key} (source {s.name!r}): no documents in {key}.path={s.path}{dropped}; "
                                      f"point it at the data or remove the source")
        for (i, s), res in zip(todo, results):
            st = res["stats"]
            if st.get("bad_records"):
                run.console.print(f"[yellow]warning:[/yellow] {s.name}: dropped {st['bad_records']:,} bad records "
                                  f"({_kinds(st['bad_record_kinds'])}), e.g. {st['bad_record_examples'][0]}")
            _nonempty("clean", {s.name: st})
        for (i, s), res in zip(todo, results):
            final = cache.stage_dir(run.root, "clean", keys["clean"][s.name])
            sub = partial / s.name
            # A split source's seconds: its span pass, and the file runs' wall time (shared by every split source).
            write_stage_stats(sub, "clean", {s.name: res["stats"]}, res["seconds"] + (pre_wall if s.name in pre else 0.0),
                              span_record=res.get("span_record", {}))
            rel = [str((final / p.name).relative_to(run.root)) for p in sorted(sub.glob("part-*.jsonl"))]
            publish(sub, final, {"docs": {s.name: rel}, "stats": res["stats"]})
        shutil.rmtree(partial, ignore_errors=True)
        if pre_dir:
            shutil.rmtree(pre_dir, ignore_errors=True)
    files = {}
    for s in cfg.sources:
        m = cache.read_manifest(cache.stage_dir(run.root, "clean", keys["clean"][s.name]))
        stats[s.name] = m["stats"]
        files[s.name] = [run.root / r for r in m["docs"][s.name]]
    run.stats["clean"] = stats
    print_stage_table(run.console, "read + clean", stats, note=f"{time.time() - t0:.1f}s")
    return files


# ---- quality: the classifier, then one task per chunk; dedup: one task over every source ------------


def quality(run, keys, upstream: Parts) -> Parts:
    """The classifier (one task, bounded samples), then the filter (one task per chunk)."""
    from pretrain.data.quality import mean_score

    cfgs = {s.name: run.eff[s.name].quality for s in run.cfg.sources}
    targets = [s.name for s in run.cfg.sources if cfgs[s.name].enabled and not s.curated]
    if not targets:
        return upstream
    t0, qcfg = time.time(), asdict(cfgs[targets[0]])
    curated = [s.name for s in run.cfg.sources if s.curated]
    ctx = _context(run, parts={n: _rel(run, upstream[n]) for n in curated + targets}, targets=targets, curated=curated,
                   quality=qcfg)
    fit_partial, (fit,) = run_tasks(run, "quality-fit", keys["quality"], [0], ctx, "quality: classifier", None)
    filtered = {n: upstream[n] for n in targets}
    chunks = chunks_of(run.root, filtered, run.chunk_bytes(filtered))
    model = fit_partial / "model.npz"
    ctx = _context(run, model=str(model.relative_to(run.root)), quality=qcfg)
    partial, results = run_tasks(run, "quality", keys["quality"], chunks, ctx, "quality", _size(chunks))
    stats = _sum_stats(results)
    for st in stats.values():
        st["reasons"] = dict(mean_score(Counter(st["reasons"]), st["docs_in"]))
    _nonempty("quality", stats)
    shutil.copyfile(model, partial / "model.npz")
    docs = {n: _rel(run, p) for n, p in upstream.items()} | _published_parts(run, "quality", keys["quality"], partial, targets)
    out = _finish(run, "quality", keys["quality"], partial, docs, stats, t0, {"classifier_sample": fit["sample"]})
    shutil.rmtree(fit_partial, ignore_errors=True)
    return out


def dedup(run, keys, upstream: Parts) -> Parts:
    """Signatures (a task per chunk), verified LSH pairs (a task per band), the greedy pass in
    document order (here, into a memory-mapped file of a byte per document), then the filter (a task
    per chunk)."""
    import numpy as np

    from pretrain.data.dedup import ChunkArrays, bands, exact_mask_in_passes, select_in_ranges, source_keys

    targets = [s for s in run.cfg.sources if run.eff[s.name].dedup.enabled]
    if not run.cfg.stages.dedup.enabled or not targets:
        return upstream
    t0, cfg, key = time.time(), run.cfg.stages.dedup, keys["dedup"]
    order = [s.name for s in sorted(targets, key=lambda s: not s.curated)]  # curated first
    parts = {n: upstream[n] for n in order}
    chunks = chunks_of(run.root, parts, run.chunk_bytes(parts))
    sig_dir, sigs = run_tasks(run, "dedup-sig", key, chunks, _context(run), "dedup: signatures", _size(chunks))
    skey = source_keys(order, cfg)
    counts, chunk_sources = [r["docs"] for r in sigs], [skey[c.source] for c in chunks]
    with array_file(sig_dir / "exact.npy", sum(counts), bool) as exact:  # the band tasks skip these documents
        exact_mask_in_passes(ChunkArrays(sig_dir, counts, chunk_sources).key_block, sum(counts), cfg, cfg.docs_per_pass, exact)
    exact = np.load(sig_dir / "exact.npy", mmap_mode="r")
    ctx = _context(run, sig_dir=str(sig_dir.relative_to(run.root)), counts=counts, chunk_sources=chunk_sources,
                   num_perm=cfg.num_perm)
    pairs_dir, _ = run_tasks(run, "dedup-pairs", key, list(range(bands(cfg)[0])), ctx, "dedup: candidate pairs", None)
    pairs = [np.load(p, mmap_mode="r") for p in sorted(pairs_dir.glob("pairs-*.npy"))]
    with array_file(pairs_dir / "fate.npy", len(exact), np.uint8) as fate:
        select_in_ranges(exact, pairs, cfg.docs_per_pass, fate)
    offsets = np.r_[0, np.cumsum(ctx["counts"])][:-1].tolist()
    ctx = ctx | {"fate": str((pairs_dir / "fate.npy").relative_to(run.root)), "offsets": offsets}
    partial, results = run_tasks(run, "dedup", key, chunks, ctx, "dedup", _size(chunks))
    stats = _sum_stats(results)
    _nonempty("dedup", stats)
    docs = {n: _rel(run, p) for n, p in upstream.items()} | _published_parts(run, "dedup", key, partial, order)
    out = _finish(run, "dedup", key, partial, docs, stats, t0)
    shutil.rmtree(sig_dir, ignore_errors=True)
    shutil.rmtree(pairs_dir, ignore_errors=True)
    return out


# ---- decontam: one task per chunk --------------------------------------------------------------------


def decontam(run, keys, upstream: Parts) -> Parts:
    targets = [s.name for s in run.cfg.sources if run.eff[s.name].decontam.enabled]
    if not targets or not run.cfg.eval_files:
        return upstream
    t0 = time.time()
    chunks = chunks_of(run.root, {n: upstream[n] for n in targets}, run.chunk_bytes(upstream))
    partial, results = run_tasks(run, "decontam", keys["decontam"], chunks, _context(run), "decontam", _size(chunks))
    stats = _sum_stats(results)
    _nonempty("decontam", stats)
    docs = {n: _rel(run, p) for n, p in upstream.items()} | _published_parts(run, "decontam", keys["decontam"], partial, targets)
    return _finish(run, "decontam", keys["decontam"], partial, docs, stats, t0)


# ---- the tokenizer: one task -------------------------------------------------------------------------


def tokenizer(run, keys, upstream: Parts) -> Path:
    path = cache.stage_dir(run.root, "tokenizer", keys["tokenizer"])
    if cache.is_done(path):
        return path / "tokenizer.json"
    t0 = time.time()
    sizes = {n: sum(p.stat().st_size for p in ps) for n, ps in upstream.items()}
    ctx = _context(run, parts={n: _rel(run, p) for n, p in upstream.items()}, bytes=sizes)
    partial, (res,) = run_tasks(run, "tokenizer", keys["tokenizer"], [0], ctx, "tokenizer", None)
    write_stage_stats(partial, "tokenizer", {}, time.time() - t0, kind=run.cfg.tokenizer.kind, vocab_size=res["vocab_size"])
    publish(partial, path, {"vocab_size": res["vocab_size"], "eod_id": res["eod_id"]})
    run.console.print(f"tokenizer: {res['what']} in {time.time() - t0:.1f}s")
    return path / "tokenizer.json"


# ---- tokenize+write: one task per chunk, then each source's partials concatenated --------------------


def shards(run, keys, upstream: Parts, tokenizer_file: Path) -> Path:
    import numpy as np

    from pretrain.data.shard_merge import merge_parts

    path = cache.stage_dir(run.root, "shards", keys["shards"])
    tm = cache.read_manifest(tokenizer_file.parent)
    t0 = time.time()
    # The merge needs megatron-core (and torch: seconds to import); import it while the tasks run.
    importer = threading.Thread(target=importlib.import_module, args=("megatron.core.datasets.indexed_dataset",), daemon=True)
    importer.start()
    chunks = chunks_of(run.root, upstream, run.chunk_bytes(upstream))
    ctx = _context(run, tokenizer_file=str(tokenizer_file), eod_id=tm["eod_id"], vocab_size=tm["vocab_size"],
                   single_thread=run.workers(len(chunks)) > 1)
    partial, results = run_tasks(run, "shards", keys["shards"], chunks, ctx, "tokenize+write", _size(chunks), tokens=True)
    token_size = 2 if tm["vocab_size"] <= np.iinfo(np.uint16).max + 1 else 4
    importer.join()
    sources = {}
    for n in upstream:
        ranks = [r for r, c in enumerate(chunks) if c.source == n]
        merge_parts(partial, n, ranks, token_size)
        sources[n] = {"docs": sum(results[r]["docs"] for r in ranks), "tokens": sum(results[r]["tokens"] for r in ranks),
                      "docs_in": sum(results[r]["docs"] for r in ranks), "bytes_in": sum(results[r]["bytes"] for r in ranks)}
    shutil.rmtree(partial / "_parts")
    ntok, dt = sum(s["tokens"] for s in sources.values()), time.time() - t0
    write_stage_stats(partial, "shards", {n: {"docs_in": s["docs_in"], "bytes_in": s["bytes_in"], "tokens": s["tokens"]}
                                          for n, s in sources.items()}, dt, tokens=ntok, tokens_per_s=round(ntok / max(dt, 1e-9)))
    publish(partial, path, {"tokenizer_key": keys["tokenizer"], "sources": {n: {"docs": s["docs"], "tokens": s["tokens"]}
                                                                              for n, s in sources.items()}, "stats": run.stats})
    run.console.print(f"tokenize+write: {ntok:,} tokens in {dt:.1f}s ({ntok / max(dt, 1e-9):,.0f} tokens/s)")
    return path
