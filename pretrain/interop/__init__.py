"""Hugging Face transformers in and out: ``export`` (checkpoint -> transformers folder), ``import_hf``
(transformers weights as the initial weights), ``generate`` (sampling from a checkpoint or an export)."""
