"""Downstream evaluation: lm-evaluation-harness tasks that ship with the project, the framework's own
scorer of them, in-loop evaluation during training, and each task's overlap with the training data.

    python -m pretrain.evaluate RUN_DIR_OR_HF_DIR --tasks pretrain_lastword,pretrain_cloze   (__main__)

taskdata (the shipped tasks' examples), tasks/ (their lm-eval YAMLs), scorer (our scorer), lmeval
(lm-eval models and runner), models (loading), contamination (13-gram overlap), inloop (training).
"""
