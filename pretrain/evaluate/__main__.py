"""Downstream evaluation of a checkpoint: ``python -m pretrain.evaluate MODEL --tasks T1,T2 ...``.

    python -m pretrain.evaluate RUN_DIR_OR_HF_DIR [--tasks pretrain_lastword,pretrain_cloze]
        [--num-fewshot 0] [--limit N] [--include-path DIR ...] [--backend pretrain|hf]
        [--scorer lm-eval|pretrain] [--train-config RUN/config.yaml] [--no-contamination] [--out DIR]

MODEL is a run directory (its newest intact checkpoint), a checkpoints or tag folder, or a
transformers folder. ``--scorer lm-eval`` (the default) runs lm-evaluation-harness offline on the
shipped tasks (``pretrain/evaluate/tasks/``) and on any local task YAMLs under ``--include-path``,
with our model (``--backend pretrain``) or lm-eval's transformers model on the same weights
(``--backend hf``: the folder itself, or a run exported in memory). ``--scorer pretrain`` scores the
shipped tasks with the framework's own scorer instead (no lm-eval needed). The report gives each
task's metrics and its 13-gram overlap with the training data (the run's config, or
``--train-config``), printed as Markdown; ``--out DIR`` also writes DIR/report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pretrain.errors import UserError, user_errors
from pretrain.evaluate import taskdata

PROG = "python -m pretrain.evaluate"


def evaluate(args) -> dict:
    """The report of one evaluation (see the module docstring for the arguments)."""
    from omegaconf import OmegaConf

    from pretrain.evaluate import lmeval, models

    tasks = [t for t in args.tasks.split(",") if t]
    if args.scorer == "pretrain":
        other = [t for t in tasks if t not in taskdata.TASKS]
        if other:
            raise UserError(f"--scorer pretrain scores the shipped tasks only ({', '.join(taskdata.TASKS)}); "
                            f"{', '.join(other)} need --scorer lm-eval")
    if args.num_fewshot > taskdata.FEWSHOT and set(tasks) & set(taskdata.TASKS):
        raise UserError(f"--num-fewshot {args.num_fewshot}: the shipped tasks have {taskdata.FEWSHOT} few-shot examples")
    run_cfg = None
    if args.scorer == "lm-eval" and args.backend == "hf" and models.is_hf_folder(args.model):
        results = lmeval.run_tasks(lmeval.hf_lm(str(args.model)), tasks, args.num_fewshot, args.limit,
                                   tuple(args.include_path))  # any transformers model lm-eval can load
    else:
        loaded = models.load(args.model)
        run_cfg = loaded.run_cfg
        ours = models.scorer_for(loaded.model, loaded.tokenizer, loaded.model_cfg.max_position_embeddings)
        if args.scorer == "pretrain":
            from pretrain.evaluate.scorer import score_tasks

            results = score_tasks(ours, tasks, args.num_fewshot, args.limit)
        else:
            results = lmeval.run_tasks(_lm(args, loaded, ours), tasks, args.num_fewshot, args.limit,
                                       tuple(args.include_path))
    report = {"model": str(args.model), "scorer": args.scorer, "backend": args.backend, "num_fewshot": args.num_fewshot,
              "limit": args.limit, "results": results}
    train_cfg = OmegaConf.load(args.train_config) if args.train_config else run_cfg
    if args.no_contamination:
        report["contamination"] = {"skipped": "--no-contamination"}
    elif train_cfg is None or train_cfg.data.name == "synthetic":
        report["contamination"] = {"skipped": "no training text known: pass --train-config RUN_DIR/config.yaml"}
    else:
        from pretrain.evaluate.contamination import report as overlap

        report["contamination"] = overlap(train_cfg.data, tasks, tuple(args.include_path))
    return report


def _lm(args, loaded, ours):
    from pretrain.evaluate import lmeval, models

    """lm-eval's model: ours, or (``--backend hf`` on a run) lm-eval's transformers model on it, exported in memory."""
    if args.backend == "pretrain":
        return lmeval.pretrain_lm(ours)
    from pretrain.interop.export import consolidate, locate

    cfg, ckpt_dir, tag = locate(str(args.model))
    model = models.hf_model(cfg.model, consolidate(ckpt_dir, tag), loaded.tokenizer.token_to_id(models.EOD_TOKEN))
    return lmeval.hf_lm(model, models.hf_tokenizer(loaded.tokenizer), cfg.model.max_position_embeddings)


def markdown(report: dict) -> str:
    """The report as Markdown: one row per task, its metrics and its overlap with the training data."""
    overlaps = report.get("contamination", {}).get("tasks", {})
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['num_fewshot']}-shot, scorer {report['scorer']}"
             + (f", backend {report['backend']}" if report["scorer"] == "lm-eval" else "")
             + (f", first {report['limit']} examples per task" if report["limit"] else ""), "",
             "| task | metrics | examples with a 13-gram in the training data | 13-grams in the training data |",
             "|---|---|---|---|"]
    for task, metrics in report["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
        o = overlaps.get(task)
        seen = f"{o['contaminated_examples']} / {o['examples']} ({o['example_fraction']:.1%})" if o else "not measured"
        grams = f"{o['ngram_fraction']:.2%} of {o['ngrams']}" if o else "not measured"
        lines.append(f"| {task} | {shown} | {seen} | {grams} |")
    skipped = report.get("contamination", {}).get("skipped")
    if skipped:
        lines += ["", f"Overlap with the training data not measured: {skipped}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run dir, checkpoints or tag dir, or transformers folder")
    parser.add_argument("--tasks", default=",".join(taskdata.TASKS), help="comma-separated task names")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="the first N test examples of each task")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of local lm-eval task YAMLs")
    parser.add_argument("--backend", choices=("pretrain", "hf"), default="pretrain",
                        help="lm-eval's model: ours (pretrain) or lm-eval's transformers model (hf)")
    parser.add_argument("--scorer", choices=("lm-eval", "pretrain"), default="lm-eval")
    parser.add_argument("--train-config", default=None, help="the training run's config.yaml, for the overlap report")
    parser.add_argument("--no-contamination", action="store_true", help="skip the overlap with the training data")
    parser.add_argument("--out", default=None, help="write report.json and report.md into this folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed
    with user_errors("evaluate", debug=args.debug):
        if args.num_fewshot < 0 or (args.limit is not None and args.limit < 1):
            raise UserError("--num-fewshot must be >= 0 and --limit >= 1")
        report = evaluate(args)
    text = markdown(report)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(text)


if __name__ == "__main__":
    main()
