"""Training: ``cli`` (the Hydra entry point), ``build`` (the one build order), ``schedule`` (batch size,
accumulation, learning rate, planned tokens), ``loop`` and ``hooks`` (the step loop and its stateful
hooks), ``callbacks`` (rank-0 logging sinks), ``gns`` (the gradient noise scale) and ``optim``."""


def main() -> None:
    """``pretrain-train``: the import stays light until the config has been composed and validated."""
    from pretrain.train.cli import main as run

    run()
