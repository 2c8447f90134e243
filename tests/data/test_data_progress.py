"""Per-stage progress (documents, MB, tokens/s, ETA) and the stats JSON each stage writes."""

import io
import re

from data_synth import synth_cfg

from pretrain.data import cache
from pretrain.data.progress import StageProgress, read_stage_stats


def test_progress_counts_documents_bytes_and_tokens():
    out = io.StringIO()
    texts = ["héllo wörld " * 40, "plain ascii " * 30] * 300  # 600 documents, multi-byte characters
    sizes = [len(t.encode()) for t in texts]
    with StageProgress("tokenize+write", sum(sizes), True, tokens=True, file=out) as bar:
        bar.add(500, sum(sizes[:500]), tokens=10_000)  # two tasks finished
        bar.add(100, sum(sizes[500:]), tokens=2_345)
        assert bar.docs == 600 and bar.ntokens == 12_345
        assert bar.bar.n == bar.bar.total
        shown = str(bar.bar)
    assert re.search(r"100%", shown) and "docs=600" in shown and "tokens=12,345" in shown and "tokens_per_s=" in shown
    with StageProgress("read", None, True, file=io.StringIO()) as bar:  # total unknown: MB and rate, no ETA
        bar.add(1, 1000)
        assert bar.bar.n == 1000 and bar.docs == 1


def test_disabled_progress_draws_nothing():
    bar = StageProgress("dedup", 10, False)
    bar.add(1, 4)
    bar.close()
    assert bar.docs == 0 and not hasattr(bar, "bar")


def test_every_stage_writes_stats_json(synth_dir, tmp_path):
    from rich.console import Console

    from pretrain.data import prepare_data

    cfg = synth_cfg(synth_dir, tmp_path, stages={"dedup": {"enabled": True}})
    prepared = prepare_data(cfg, console=Console(quiet=True))
    root = tmp_path
    seen = {}
    for stage in ("clean", "dedup", "tokenizer", "shards"):
        for d in sorted((root / stage).iterdir()):
            stats = read_stage_stats(d)
            assert stats is not None and stats["stage"] == stage and stats["seconds"] >= 0, d
            seen.setdefault(stage, []).append((d, stats))
    clean = {n: s for d, st in seen["clean"] for n, s in st["sources"].items()}
    assert set(clean) == {"a", "b", "c"}
    for d, st in seen["clean"]:
        (name,) = st["sources"]
        assert cache.read_manifest(d)["stats"] == st["sources"][name]
        assert st["docs_in"] == st["sources"][name]["docs_in"] > 0 and st["mb_per_s"] > 0
    (dedup_dir, dedup), = seen["dedup"]
    assert dedup["sources"] == cache.read_manifest(dedup_dir)["stats"]
    (shards_dir, shards), = seen["shards"]
    assert shards["tokens"] == sum(prepared.tokens.values()) and shards["tokens_per_s"] > 0
    assert {n: s["tokens"] for n, s in shards["sources"].items()} == prepared.tokens
    assert {n: s["docs_in"] for n, s in shards["sources"].items()} == prepared.docs
    (_, tok), = seen["tokenizer"]
    assert tok["vocab_size"] == prepared.vocab_size and tok["kind"] == "bpe"
