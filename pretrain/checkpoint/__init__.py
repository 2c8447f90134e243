"""Checkpoints: the atomic save and the resume (``store``), the integrity manifest (``manifest``), the
weights-only loader (``safeload``), and resharding through a layout-free universal form (``reshard``).

Only ``store`` and ``reshard`` need the engine; ``manifest`` and ``safeload`` are light enough for the
command-line tools that read checkpoints without process groups.
"""
