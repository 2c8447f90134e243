"""What the terminal shows: the run summary, the data report, the progress bar and real problems.

Third-party chatter goes to the run's log file (Hydra's ``train.log`` in the run directory) only:
Python warnings (megatron-core's "Transformer Engine and Apex are not installed", repeated per
import site and process, and the like), and the INFO records of megatron-core (one block per
IndexedDataset part) and DeepSpeed. Their warnings and errors still reach the terminal.
``logging.verbose=true`` leaves everything on the terminal, as the libraries set it up.
"""

from __future__ import annotations

import logging
import sys

THIRD_PARTY = ("megatron", "DeepSpeed", "datasets", "transformers")


def quiet_third_party(verbose: bool) -> None:
    """Route third-party records to the run's log file. Idempotent; call again after importing
    DeepSpeed, whose logger installs its own terminal handler on import. Every rank calls it."""
    if verbose:
        return
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:  # no run log to send them to (hydra/job_logging=none): leave them on the terminal
        return
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers, warnings_log.propagate = list(files), False
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(files[0].formatter)
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [*files, terminal], False
