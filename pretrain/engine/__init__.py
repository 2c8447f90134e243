"""The engine: the only package that imports DeepSpeed or touches its internals.

``core.TrainEngine`` runs one optimizer step over a rank's micro-batches on DeepSpeed's plain or
pipeline engine; ``groups`` creates the process groups that megatron-core and DeepSpeed share.
This file imports nothing, so the light modules of the package load without DeepSpeed.
A test (tests/test_architecture.py) fails if any module outside this package imports DeepSpeed.
"""
