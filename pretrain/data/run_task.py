"""``python -m pretrain.data.run_task SPEC RANK``: run one task of a data stage, as a Slurm array
task does (executors.py). SPEC is the JSON the driver wrote: the stage, its units, the tasks'
context (the data config as plain data) and the folders; nothing in it is code or a pickle."""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

from pretrain.data.stage_tasks import StageTasks
from pretrain.data.tasks import Chunk


def write_spec(path: Path, step: StageTasks, tasks: int, logs: str) -> Path:
    units = [{"chunk": asdict(u)} if isinstance(u, Chunk) else {"value": u} for u in step.units]
    spec = {"stage": step.stage, "units": units, "context": step.context, "folder": step.folder, "tasks": tasks, "logs": logs}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(spec))
    tmp.replace(path)
    return path


def read_spec(path: Path) -> dict:
    spec = json.loads(Path(path).read_text())
    spec["units"] = [Chunk(**u["chunk"]) if "chunk" in u else u["value"] for u in spec["units"]]
    return spec


def main(argv=None) -> int:
    from datatrove.executor import LocalPipelineExecutor

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m pretrain.data.run_task SPEC.json RANK", file=sys.stderr)
        return 2
    spec, rank = read_spec(Path(args[0])), int(args[1])
    if not 0 <= rank < spec["tasks"]:
        print(f"run_task: rank {rank} is not one of the stage's {spec['tasks']} tasks", file=sys.stderr)
        return 2
    step = StageTasks(spec["stage"], spec["units"], spec["context"], spec["folder"])
    executor = LocalPipelineExecutor([step], tasks=spec["tasks"], workers=1, logging_dir=spec["logs"])
    executor._run_for_rank(rank)  # datatrove's: the task's log, its stats, then its completion marker
    return 0


if __name__ == "__main__":
    sys.exit(main())
