"""The engine: the only package that imports DeepSpeed or touches its internals.

``core.TrainEngine`` runs one optimizer step over a rank's micro-batches on DeepSpeed's plain or
pipeline engine (``gate`` skips a bad step's update; ``full_state`` loads layout-free state;
``layout`` describes the parameters for checkpoints); ``pipeline`` builds the model for any layout;
``groups`` creates the process groups that megatron-core and DeepSpeed share; ``records`` names
DeepSpeed's checkpoint classes for the weights-only loader; ``compat`` patches CPU runs.
This file imports nothing, so the light modules of the package load without DeepSpeed.
A test (tests/test_engine_boundary.py) fails if any module outside this package imports DeepSpeed.
"""
