"""``python -m pretrain.scaling fit RUN_DIRS... [--out DIR] [--bootstrap 200] [--seed 0]``.

Reads each run directory (``config.yaml`` and ``metrics.jsonl`` as training writes them):

- L: the last ``val_loss`` in metrics.jsonl; a run that never evaluated falls back to its last
  training ``loss``, and the run is marked ``loss_source: "train"`` in fit.json (and a note printed).
- N: non-embedding parameters, the blocks' matmul weights, L (attention + MLP) as
  ``pretrain.flops.matmul_parameters`` counts them but without the embedding / LM head (Kaplan's N;
  norms and biases left out). C = 6 N D uses this N throughout.
- D: the ``tokens`` of the last record that has them. C = 6 N D.

Fits the law (``pretrain.scaling.fit``), writes ``fit.json`` (parameters, bootstrap intervals,
exponents, tokens per parameter at the optimum, the runs used) and ``isoflop.png``,
``frontier.png``, ``optimal.png`` under ``--out`` (default ``./scaling_fit``). Bad input exits 2
with a message naming the run or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from pretrain.errors import UserError, user_errors

MIN_RUNS = 5  # the law has five parameters


def non_embedding_parameters(model: dict) -> int:
    """The blocks' matmul parameters for a config.yaml ``model`` section (no embedding, no LM head)."""
    from pretrain.config import ModelConfig, ffn_hidden_size, head_dim

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in names})
    h, d = int(cfg.hidden_size), head_dim(cfg)
    heads, kv = cfg.num_attention_heads, cfg.num_kv_heads or cfg.num_attention_heads
    attention = h * (heads + 2 * kv) * d + heads * d * h
    mlp = h * ffn_hidden_size(cfg) * (3 if cfg.activation == "swiglu" else 2)
    return int(cfg.num_layers * (attention + mlp))


def _load_config(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except Exception as err:  # a YAML error
        raise UserError(f"{path}: not readable YAML ({err})") from err
    try:
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception:
        data = OmegaConf.to_container(conf, resolve=False)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with a model section")
    return data


def read_run(run_dir: Path) -> dict:
    """One run's N, D, C, final loss and where the loss came from."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory")
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a training run directory?)")
    if not config.is_file():
        raise UserError(f"{run_dir}: no config.yaml, so its parameter count is unknown")
    val = train = tokens = None
    for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{metrics}:{lineno}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            continue
        if record.get("val_loss") is not None:
            val = float(record["val_loss"])
        if record.get("loss") is not None:
            train = float(record["loss"])
        if record.get("tokens") is not None:
            tokens = float(record["tokens"])
    if val is None and train is None:
        raise UserError(f"{metrics}: no val_loss or loss records")
    if not tokens or tokens <= 0:
        raise UserError(f"{metrics}: no positive 'tokens' in its records")
    model = _load_config(config).get("model")
    if not isinstance(model, dict):
        raise UserError(f"{config}: no model section")
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not isinstance(model.get(k), int)]
    if missing:
        raise UserError(f"{config}: model.{missing[0]} is missing or not an integer")
    n = non_embedding_parameters(model)
    loss, source = (val, "val") if val is not None else (train, "train")
    if not (loss > 0 and loss == loss):
        raise UserError(f"{metrics}: final {source} loss {loss} is not a positive number")
    return {"run": str(run_dir), "model": model.get("name"), "N": n, "D": tokens, "C": 6.0 * n * tokens,
            "loss": loss, "loss_source": source}


def fit_command(args) -> int:
    from pretrain.scaling.fit import summarize
    from pretrain.scaling.plots import write_plots

    if not args.run_dirs:
        raise UserError("fit: no run directories given (python -m pretrain.scaling fit RUN_DIR...)")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: must be 0 or more")
    runs = [read_run(Path(d)) for d in args.run_dirs]
    if len(runs) < MIN_RUNS:
        raise UserError(f"fit: {len(runs)} run(s) given; the law has {MIN_RUNS} parameters, so at least "
                        f"{MIN_RUNS} runs are needed (more, over several budgets and sizes, for a useful fit)")
    for run in runs:
        if run["loss_source"] == "train":
            print(f"scaling: note: {run['run']} has no val_loss; using its last training loss", file=sys.stderr)
    N, D, L = ([r[k] for r in runs] for k in ("N", "D", "loss"))
    result = summarize(N, D, L, samples=args.bootstrap, seed=args.seed, starts=args.starts,
                       bootstrap_starts=args.bootstrap_starts)
    result["parameter_count"] = "non-embedding matmul parameters (attention + MLP weights); C = 6 N D with this N"
    result["runs"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [p.name for p in write_plots(out, N, D, L, result["params"])]
    (out / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    p, iv = result["params"], result["intervals"]
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = iv.get(k, [None, None])
        span = f"  [{lo:.4g}, {hi:.4g}]" if lo is not None else ""
        print(f"{k:>5} = {p[k]:.4g}{span}")
    opt = result["optimum"]
    print(f"N_opt ~ C^{opt['a_exp']:.3f}, D_opt ~ C^{opt['b_exp']:.3f}")
    for row in opt["at_budget"]:
        print(f"C = {row['C']:.3g}: N_opt = {row['N_opt']:.3g}, D_opt = {row['D_opt']:.3g}, "
              f"{row['tokens_per_parameter']:.1f} tokens/parameter")
    print(f"wrote {out / 'fit.json'} and {', '.join(result['plots'])}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.scaling", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to run directories")
    fit.add_argument("run_dirs", nargs="*", help="run directories (config.yaml + metrics.jsonl)")
    fit.add_argument("--out", default="scaling_fit", help="where fit.json and the PNGs go (default ./scaling_fit)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200; 0: none)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--starts", type=int, default=32, help="L-BFGS starts: the grid's best points (default 32)")
    fit.add_argument("--bootstrap-starts", type=int, default=8, help="grid starts per bootstrap refit (default 8)")
    fit.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    with user_errors("scaling", debug=args.debug):
        return fit_command(args)


if __name__ == "__main__":
    sys.exit(main())
