import sys

from pretrain.launch.slurm import main

sys.exit(main())
