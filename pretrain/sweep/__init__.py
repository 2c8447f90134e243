"""IsoFLOP sweeps: every compute budget C spent on every model shape, D = C / (6 N) tokens each.

``python -m pretrain.sweep CONFIG [KEY=VALUE ...] [--dry-run] [--fit] [--no-fit]`` (configs in
``pretrain/conf/sweep/``): ``config`` (the schema and its checks), ``plan`` (each point's N, D, steps,
schedule and config file, composed and validated before launch), ``run`` (one Hydra multirun of
pretrain.train through the configured launcher, the per-run records, the fit by
``pretrain.scaling``).
"""
