"""The parts of pretrain.data.synth_corpus, the synthetic-corpus generator (import from there).

pool.py: the sentence pool and the evaluation files; docs.py: base documents, near-duplicate
variants, exact copies and contamination spans; planter.py: the document stream and PlantConfig;
shards.py: the shard writer, the key, and reading back / verify.
"""
