"""``python -m pretrain.data.slurm_chain FOLDER``: one driver step of a Slurm chain (slurm_jobs.py):
prepare_data on FOLDER/config.json, up to the first stage whose array job it submits (then it
submits the next step, to run after that job, and ends); an error goes to FOLDER/error.json."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from pretrain.data import slurm_jobs


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pretrain.data.slurm_chain CHAIN_FOLDER", file=sys.stderr)
        return 2
    chain = Path(args[0])
    slurm_jobs.start_step(chain)
    from rich.console import Console

    from pretrain.data.pipeline import prepare_data

    try:
        prepare_data(json.loads((chain / "config.json").read_text()), console=Console(stderr=True))
    except slurm_jobs.Continued:
        return 0
    except Exception as e:  # the caller raises it; the full traceback stays in this step's log
        traceback.print_exc()
        tmp = chain / f".error.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        os.replace(tmp, chain / "error.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
