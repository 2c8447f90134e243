"""Scaling laws: fitting L(N, D) = E + A / N^alpha + B / D^beta to a sweep of runs.

``python -m pretrain.scaling fit RUN_DIRS... [--out DIR] [--bootstrap 200] [--seed 0]`` reads each
run's final validation loss, its parameter count N (non-embedding matmul parameters, counted from
config.yaml's model), its tokens D and its compute C = 6 N D, fits the law with the Epoch AI method
(Besiroglu et al. 2024: Huber loss, delta 1e-3, on log-loss residuals; L-BFGS from a grid of starts;
bootstrap intervals) and writes ``fit.json`` and PNGs (IsoFLOP curves, the frontier, N_opt and D_opt
against C). ``pretrain.scaling.fit`` holds the law, the fit, the bootstrap and the compute optimum.
"""
