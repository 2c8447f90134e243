"""Downstream evaluation (pretrain/evaluate): lm-eval on an exported model agrees with the framework's
own scorer on the shipped tasks; in-loop task evaluation gives the same results at tp2 and pp2 as at
single; the evaluation report gives each task's 13-gram overlap with the training data.

One module-scoped fixture trains a tiny GPT-2-style model on data=tiny for 4 steps at single, tp2 and
pp2, scoring the first 24 examples of both shipped tasks in the loop at steps 2 and 4.
"""

import json
import math

import pytest

from harness import FAST, run_jobs

TASKS = ["pretrain_lastword", "pretrain_cloze"]
LIMIT = 24
COMMON = [o for o in FAST if o != "logging.plot=false"] + [
    "model=tiny-gpt", "model.hidden_size=64", "data=tiny", "trainer.max_steps=4", "trainer.seq_length=64",
    "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "optim.warmup_tokens=0", "optim.lr=3e-3",
    "trainer.seed=7", f"trainer.eval_tasks=[{','.join(TASKS)}]", "trainer.eval_tasks_interval=2",
    f"trainer.eval_tasks_limit={LIMIT}",
]
LAYOUTS = {"single": (1, ["parallel=single", "checkpoint.save_final=true"]),
           "tp2": (2, ["parallel=tp2"]), "pp2": (2, ["parallel=pp2"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{layout: (run dir, [eval records])}: the eval/* metrics of each evaluated step."""
    out = {}
    for world in (1, 2):
        jobs = {name: COMMON + args for name, (size, args) in LAYOUTS.items() if size == world}
        workdir = tmp_path_factory.mktemp(f"evaluate{world}")
        for name, records in run_jobs(world, jobs, workdir).items():
            evals = [{k: v for k, v in r.items() if k.startswith("eval/") or k in ("step", "tokens")}
                     for r in records if any(k.startswith("eval/") for k in r)]
            out[name] = (workdir / name, evals)
    return out


@pytest.mark.distributed
def test_in_loop_tasks_agree_across_layouts(runs):
    _, single = runs["single"]
    assert [r["step"] for r in single] == [2, 4]
    assert set(single[0]) >= {f"eval/{t}/acc" for t in TASKS} | {"eval/pretrain_lastword/perplexity"}
    assert single[0]["eval/pretrain_lastword/perplexity"] != single[1]["eval/pretrain_lastword/perplexity"]
    for layout in ("tp2", "pp2"):
        _, records = runs[layout]
        assert [r["step"] for r in records] == [2, 4], layout
        for ref, got in zip(single, records):
            for key, value in ref.items():
                if key.endswith("/perplexity"):
                    assert math.isclose(got[key], value, rel_tol=1e-4), (layout, key, got[key], value)
                else:
                    assert got[key] == value, (layout, key, got[key], value)
    assert (runs["single"][0] / "tasks.png").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("fewshot", [0, 1])
def test_lm_eval_on_exported_model_matches_our_scorer(runs, tmp_path, fewshot):
    from pretrain.evaluate import lmeval, models
    from pretrain.evaluate.scorer import score_tasks
    from pretrain.interop.export import export

    run_dir, _ = runs["single"]
    hf_dir = export(str(run_dir), str(tmp_path / "hf"))
    theirs = lmeval.run_tasks(lmeval.hf_lm(str(hf_dir)), TASKS, num_fewshot=fewshot, limit=LIMIT)
    loaded = models.load(str(run_dir))
    ours = score_tasks(models.scorer_for(loaded.model, loaded.tokenizer, loaded.model_cfg.max_position_embeddings),
                       TASKS, fewshot, LIMIT)
    for task in TASKS:
        assert ours[task]["examples"] == LIMIT
        for metric, value in theirs[task].items():
            if metric == "perplexity":
                assert math.isclose(ours[task][metric], value, rel_tol=1e-5), (task, metric, ours[task][metric], value)
            else:
                assert ours[task][metric] == value, (task, metric, ours[task][metric], value)
    assert set(theirs["pretrain_cloze"]) == {"acc", "acc_norm"}


@pytest.mark.distributed
def test_report_lists_each_tasks_overlap_with_the_training_data(runs, tmp_path, capsys):
    from pretrain.evaluate.__main__ import main

    run_dir, _ = runs["single"]
    main([str(run_dir), "--scorer", "pretrain", "--limit", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "report.md").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    overlap = report["contamination"]
    assert overlap["ngram"] == 13 and set(overlap["training_documents"]) == {"austen", "shakespeare", "pydocs", "stdlib"}
    assert overlap["training_ngrams"] > 10_000
    for task in TASKS:
        counted = overlap["tasks"][task]
        assert counted["examples"] > 200 and counted["ngrams"] > 5000
        assert counted["contaminated_examples"] == 0  # data=tiny reads Austen's first 40 chapters only
        assert report["results"][task]["examples"] == 4
        row = next(line for line in printed.splitlines() if line.startswith(f"| {task} | "))
        assert f"0 / {counted['examples']} (0.0%)" in row and f"of {counted['ngrams']}" in row


@pytest.mark.distributed
def test_training_ngrams_come_from_the_trained_shards(runs):
    """Positive control: paragraphs of chapters data=tiny trains on are found in full, the held-out ones not."""
    from omegaconf import OmegaConf

    from pretrain.data.corpus import get_builtin
    from pretrain.evaluate.contamination import overlap, training_ngrams

    run_dir, _ = runs["single"]
    grams, documents = training_ngrams(OmegaConf.load(run_dir / "config.yaml").data)
    chapters = list(get_builtin("austen").read())
    longest = [max(text.split("\n\n"), key=len) for _, text in chapters[1:4] + chapters[-4:]]
    assert documents["austen"] < 40
    trained, held_out = overlap(longest[:3], grams), overlap(longest[3:], grams)
    assert trained["contaminated_examples"] == 3 and trained["ngram_fraction"] > 0.9, trained
    assert held_out["contaminated_examples"] == 0, held_out


def test_overlap_finds_examples_in_the_training_text():
    import numpy as np

    from pretrain.data.decontam import ngrams_of
    from pretrain.evaluate import taskdata
    from pretrain.evaluate.contamination import overlap

    texts = taskdata.texts("pretrain_lastword")[:20]
    # Three whole examples, and the first 13 words of a fourth (one of its n-grams).
    trained = np.unique(np.concatenate([ngrams_of(t, 13) for t in texts[:3]]
                                       + [ngrams_of(" ".join(texts[3].split()[:13]), 13)]))
    counted = overlap(texts, trained)
    assert counted["examples"] == 20 and counted["contaminated_examples"] == 4
    found = sum(len(ngrams_of(t, 13)) for t in texts[:3]) + 1
    assert counted["ngram_fraction"] == found / sum(len(ngrams_of(t, 13)) for t in texts)
    assert overlap(texts, ngrams_of("nothing of the sort here", 13))["contaminated_examples"] == 0


def test_bad_eval_task_settings_are_refused_before_training():
    from hydra import compose, initialize_config_dir

    from harness import REPO
    from pretrain.config import register_configs
    from pretrain.evaluate.inloop import check_model
    from pretrain.validate import ConfigError, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "trainer.eval_tasks=[pretrain_lastword,lambada]",
                                           "trainer.eval_interval=0", "trainer.eval_tasks_fewshot=9"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    message = str(err.value)
    for fragment in ("lambada unknown", "data=synthetic has none", "never runs", "have 5 few-shot examples"):
        assert fragment in message, (fragment, message)
    with initialize_config_dir(config_dir=str(REPO / "pretrain" / "conf"), version_base="1.3"):
        palm = compose("config", overrides=["model=tiny-palm"])
    with pytest.raises(ConfigError, match="parallel_block"):
        check_model(palm.model)
