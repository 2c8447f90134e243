"""The generate command line, ``python -m pretrain.interop.generate RUN_DIR --prompt ... | --prompt-ids ...``,
on two tiny trained runs: a synthetic-data LLaMA-style run (no tokenizer: ``--prompt-ids``) and a
GPT-style run on ``data=tiny`` (a tokenizer: ``--prompt`` text).

One module-scoped fixture trains both runs (one launch), computes the library's output for every
case in one subprocess (``python tests/test_generate_cli.py reference WORKDIR``: loading a model
creates a process group, which this pytest process must not), and runs the command lines, three at
a time. The tests only compare what those processes printed.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import FAST, child_env, run_jobs

pytestmark = pytest.mark.distributed

COMMON = FAST + [
    "parallel=single", "trainer.max_steps=2", "trainer.seq_length=32", "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2", "model.num_layers=2", "model.hidden_size=64", "optim.warmup_tokens=0",
    "checkpoint.save_final=true",
]
RUNS = {
    # LLaMA-style: its greedy continuations depend on the prompt after 2 steps (tiny-gpt's repeat one token).
    "synthetic": COMMON + ["data=synthetic", "model=tiny-llama"],
    "text": COMMON + ["data=tiny", "model=tiny-gpt", "model.vocab_size=null"],
}
IDS = [5, 17, 29, 41]
TEXT = "It is a truth universally acknowledged"
NEW = 12
SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}

# name: (run, prompt ids or None for TEXT, sampling options (None: greedy), extra command-line flags)
CASES = {
    "ids-greedy": ("synthetic", IDS, None, []),
    "ids-greedy-again": ("synthetic", IDS, None, []),
    "ids-greedy-no-cache": ("synthetic", IDS, None, ["--no-cache"]),
    "ids-sampled": ("synthetic", IDS, SAMPLING, []),
    "text-greedy": ("text", None, None, []),
}


def _cli_args(run_dir: Path, ids, sampling, extra) -> list:
    args = [sys.executable, "-m", "pretrain.interop.generate", str(run_dir), "--max-new-tokens", str(NEW), *extra]
    args += ["--prompt", TEXT] if ids is None else ["--prompt-ids", ",".join(map(str, ids))]
    for key, value in (sampling or {}).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")
    run_jobs(1, RUNS, work / "runs")
    commands = {"reference": [sys.executable, __file__, "reference", str(work)]}
    for name, (run, ids, sampling, extra) in CASES.items():
        commands[name] = _cli_args(work / "runs" / run, ids, sampling, extra)
    # Text on a run without a tokenizer: refused, pointing at --prompt-ids.
    commands["text-on-synthetic"] = _cli_args(work / "runs" / "synthetic", None, None, [])
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(commands, pool.map(lambda args: _run(args, work), commands.values())))
    reference = procs.pop("reference")
    if reference.returncode != 0:
        raise AssertionError(f"reference worker failed:\n{reference.stdout[-3000:]}\n{reference.stderr[-6000:]}")
    return json.loads((work / "reference.json").read_text()), procs


def _printed(proc: subprocess.CompletedProcess, name: str) -> str:
    assert proc.returncode == 0, f"{name}: exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_prompt_ids_on_a_synthetic_run_print_the_library_continuation(work):
    reference, procs = work
    want = reference["ids-greedy"]
    # The command prints exactly the ids, prompt first, comma-separated, and nothing else on stdout.
    assert _printed(procs["ids-greedy"], "ids-greedy") == ",".join(map(str, want["ids"])) + "\n"
    assert want["ids"][:len(IDS)] == IDS and len(want["ids"]) == len(IDS) + NEW
    assert all(0 <= t < want["vocab_size"] for t in want["ids"])


def test_greedy_output_repeats_exactly_with_and_without_the_cache(work):
    _, procs = work
    first = _printed(procs["ids-greedy"], "ids-greedy")
    assert _printed(procs["ids-greedy-again"], "ids-greedy-again") == first, "temperature 0 must be deterministic"
    assert _printed(procs["ids-greedy-no-cache"], "ids-greedy-no-cache") == first, "--no-cache must not change the output"


def test_sampling_options_reach_the_library(work):
    """--temperature/--top-k/--top-p/--seed: the seeded sample of the library with the same settings
    (and not the greedy continuation, so the options took effect)."""
    reference, procs = work
    printed = _printed(procs["ids-sampled"], "ids-sampled")
    assert printed == ",".join(map(str, reference["ids-sampled"]["ids"])) + "\n"
    assert reference["ids-sampled"]["ids"] != reference["ids-greedy"]["ids"]


def test_text_prompt_prints_the_decoded_library_continuation(work):
    reference, procs = work
    want = reference["text-greedy"]
    assert _printed(procs["text-greedy"], "text-greedy") == want["text"] + "\n"
    assert want["text"].startswith(TEXT) and len(want["ids"]) > len(want["prompt_ids"]), want


def test_text_prompt_without_a_tokenizer_is_refused_naming_prompt_ids(work):
    _, procs = work
    proc = procs["text-on-synthetic"]
    assert proc.returncode != 0
    assert "no tokenizer" in proc.stderr and "--prompt-ids" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The reference worker: the library's output for every case (runs in a subprocess).


def reference(work: Path) -> None:
    import torch

    from pretrain.interop import generate

    loaded = {run: generate.load(str(work / "runs" / run)) for run in RUNS}
    results = {}
    for name, (run, ids, sampling, extra) in CASES.items():
        model_cfg, model, tokenizer = loaded[run]
        prompt_ids = ids if ids is not None else tokenizer.encode(TEXT, add_special_tokens=False).ids
        eos = tokenizer.token_to_id("<|endoftext|>") if tokenizer is not None else None
        out = generate.generate(
            model, torch.tensor([prompt_ids]), NEW, **(sampling or {}), use_cache="--no-cache" not in extra,
            eos_id=eos, max_positions=model_cfg.max_position_embeddings, vocab_size=model_cfg.vocab_size,
        )[0].tolist()
        results[name] = {"prompt_ids": prompt_ids, "ids": out, "vocab_size": model_cfg.vocab_size}
        if tokenizer is not None:
            results[name]["text"] = tokenizer.decode(out)
    (work / "reference.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "reference":
        reference(Path(sys.argv[2]))


def test_generating_in_process_leaves_gradients_on_for_the_caller(tmp_path):
    """main() runs inside other programs (and this test session): no gradient switch may leak out of it,
    even when it stops with an error after loading began."""
    import torch

    from pretrain.interop import generate

    assert torch.is_grad_enabled()
    with pytest.raises(SystemExit):
        generate.main([str(tmp_path / "no-such-run"), "--prompt-ids", "1,2"])
    assert torch.is_grad_enabled()
