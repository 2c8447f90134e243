"""``python -m pretrain.plan``: see pretrain/plan/cli.py."""

import sys

from pretrain.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
