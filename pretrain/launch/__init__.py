"""Launching on a cluster: ``cluster`` (the typed, checked cluster settings) and ``slurm`` (the sbatch
script rendered from them and the training config, submitted or printed). ``python -m pretrain.launch slurm``."""

from pretrain.launch.cluster import ClusterConfig, ClusterError, cluster_problems, load_cluster, sbatch_quote  # noqa: F401
from pretrain.config import compose_training  # noqa: F401 (the launcher composes with it)
from pretrain.launch.slurm import check_passthrough, job_name, layout, main, render, slurm, split_overrides  # noqa: F401
