"""Checkpoints: the atomic save and the resume (``store``), the integrity manifest (``manifest``), the
weights-only loader (``safeload``), the reader of DeepSpeed's files at any layout (``saved``), and
resharding through a layout-free universal form (``reshard``).

``store`` and ``reshard`` drive a live engine (through its named methods); ``manifest``, ``safeload``
and ``saved`` read files without process groups, for the command-line tools.
"""
