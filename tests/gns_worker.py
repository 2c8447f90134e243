"""Brute-force noise-scale reference: per-example gradients of the first global batch.

    python tests/gns_worker.py OUT.json DP MICRO OVERRIDES...

DP and MICRO describe the data-parallel run being checked (ranks, micro-batch per rank).

Builds the model exactly as training does (same seed, same data), computes each example's
gradient at the initial weights, and writes |G_big|^2 (the batch mean) and |G_small|^2 (the mean
over DP ranks of each rank's share, taken as the trainer deals samples out) with the estimates.
"""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pretrain.engine import groups as distributed
from pretrain.config import register_configs, typed
from pretrain.train.gns import per_step_estimates
from pretrain.train.build import build_run
from pretrain.validate import validate

CONF = str(Path(__file__).resolve().parents[1] / "pretrain" / "conf")


def main(out: str, dp: str, micro: str, *overrides: str) -> None:
    dp, micro = int(dp), int(micro)
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg, 1)
    run = build_run(typed(cfg), Path(out).parent / "gns-reference", logging_on=False)
    model = run.engine.module
    batch = cfg.trainer.global_batch_size
    grads = []
    for i in range(batch):
        sample = run.train_data[i]
        model.zero_grad(set_to_none=True)
        model(sample["tokens"][None], sample["labels"][None]).backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None]))
    grads = torch.stack(grads)  # (examples, params)
    big_sq = float(grads.mean(0).pow(2).sum())
    # Micro-step j of a step covers samples j*micro*dp ...; DP rank r takes `micro` of them.
    shares = [[j + r * micro + k for j in range(0, batch, micro * dp) for k in range(micro)] for r in range(dp)]
    small_sq = sum(float(grads[idx].mean(0).pow(2).sum()) for idx in shares) / dp
    g2, trace = per_step_estimates(small_sq, big_sq, batch // dp, batch)
    Path(out).write_text(json.dumps({"big_sq": big_sq, "small_sq": small_sq, "g2": g2, "trace": trace}))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
