"""Run several training jobs in one launched process group; rank 0 writes their metrics as JSON.

    torchrun --nproc_per_node N tests/parity_worker.py OUT.json JOBS.json WORKDIR

JOBS.json maps a job name to its Hydra overrides. Launching once per world size keeps the
import cost (megatron-core + DeepSpeed, ~10 s per process on 2 cores) out of every job.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from hydra import compose, initialize_config_dir

from pretrain.config import register_configs
from pretrain.metrics import read_metrics
from pretrain.train.trainer import Trainer

CONF = str(Path(__file__).resolve().parents[1] / "pretrain" / "conf")


def main(out: str, jobs_file: str, workdir: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    register_configs()
    results = {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for name, overrides in jobs.items():
            run_dir = Path(workdir) / name
            Trainer(compose("config", overrides=overrides), run_dir).run(keep_process_group=True)
            if dist.get_rank() == 0:
                results[name] = read_metrics(run_dir)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
