import random

import numpy as np
import pytest

from pretrain.data.clean import SpanSet, clean_document, clean_documents
from pretrain.data.config import CleanConfig

GOOD = "The river ran quietly past the old mill. " * 6


def test_keeps_clean_prose():
    text, why = clean_document(GOOD.strip(), CleanConfig())
    assert text == GOOD.strip() and not why


def test_min_chars_gpt3():
    cfg = CleanConfig(c4_page=False, c4_lines=False)
    assert clean_document("x" * 199, cfg)[0] is None
    assert clean_document("x" * 200, cfg)[0] == "x" * 200


def test_c4_lines_dropped_without_punctuation_or_with_few_words():
    text = GOOD + "\nMenu Home About\nShort one.\nA line without an end\n" + GOOD
    out, why = clean_document(text, CleanConfig(dedup_sentence_spans=False))
    assert "Menu" not in out and "Short one." not in out and "without an end" not in out
    assert why["lines_dropped"] == 3


def test_c4_page_rules():
    cfg = CleanConfig()
    assert clean_document(GOOD + " Lorem ipsum dolor sit amet.", cfg)[1]["lorem_ipsum"] == 1
    assert clean_document(GOOD + " if (x) { y(); }.", cfg)[1]["curly_brace"] == 1
    assert clean_document("One two three. Four five six. " + "x" * 300 + ".", cfg)[1]["few_sentences"] == 1
    out, why = clean_document(GOOD + "\nPlease enable Javascript in your browser now.\n" + GOOD, CleanConfig(dedup_sentence_spans=False))
    assert "Javascript" not in out and why["lines_javascript"] == 1


def test_repeated_three_sentence_span_removed_within_source():
    para = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota. Kappa lambda mu."
    docs = [("1", GOOD + "\n" + para), ("2", GOOD.replace("river", "brook") + "\n" + para)]
    out, why = clean_documents(docs, CleanConfig())
    assert para in out[0][1] and para not in out[1][1]
    assert why["lines_repeated_span"] == 1


def test_unicode_normalised_and_invalid_utf8():
    cfg = CleanConfig()
    decomposed = GOOD + " Cafe\u0301 is open."
    out, why = clean_document(decomposed, cfg)
    assert "Caf\u00e9" in out and why["unicode_normalized"] == 1
    out, why = clean_document(GOOD + " A bad byte \ufffd here.", CleanConfig(max_invalid_utf8_fraction=0.01))
    assert out is not None and why["utf8_repaired"] == 1
    assert clean_document("\ufffd" * 50 + GOOD, cfg)[1]["invalid_utf8"] == 1


def test_code_profile_keeps_code():
    code = "def f(x):\n    return {x: x}\n\n" * 20
    cfg = CleanConfig(c4_lines=False, c4_page=False, dedup_sentence_spans=False)
    assert clean_document(code, cfg)[0] == code


def test_a_copy_made_of_repeated_spans_is_left_whole_for_dedup():
    """A document whose text is mostly spans seen before is a (near-)copy: cutting those lines would
    leave fragments that document dedup cannot match, so it stays whole and records no spans."""
    paras = [f"Alpha {w} beta. Gamma {w} delta. Epsilon {w} zeta. Eta {w} theta." for w in ("one", "two", "three")]
    original = GOOD + "\n" + "\n".join(paras)
    near = "The brook ran quietly past the old mill. " * 2 + "\n" + "\n".join(paras)  # 72% repeated spans
    later = GOOD.replace("river", "lake") + "\n" + paras[0]  # one repeated line among new text: cut as C4 does
    out, why = clean_documents([("1", original), ("2", original), ("3", near), ("4", later)], CleanConfig())
    assert [d for d, _ in out] == ["1", "2", "3", "4"]
    assert out[1][1] == out[0][1] and all(p in out[2][1] for p in paras)
    assert paras[0] not in out[3][1]
    assert why["repeated_spans_left_for_dedup"] == 2 and why["lines_repeated_span"] == 1
    always_cut, why = clean_documents([("1", original), ("2", original)], CleanConfig(max_repeated_span_fraction=1.0))
    # C4's rule cuts every line of the copy, the whole of it here; with short lines it leaves fragments.
    assert [d for d, _ in always_cut] == ["1"] and why["lines_repeated_span"] == 4 and why["few_sentences"] == 1


def test_span_set_answers_like_a_set_across_merges():
    """The compact span record (sorted array + buffer) against Python's set, over many merges."""
    rng = random.Random(3)
    spans, reference = SpanSet(buffer=64), set()
    pool = [rng.getrandbits(64) for _ in range(3000)]
    for step in range(200):
        batch = rng.sample(pool, 20)
        assert [h in spans for h in batch] == [h in reference for h in batch], step
        assert spans.isin(np.array(batch, dtype=np.uint64)).tolist() == [h in reference for h in batch], step
        new = [h for h in batch if h not in reference]
        spans.update(new)
        reference.update(new)
    assert len(spans) == len(reference) > 64 * 10
    assert all(h in spans for h in reference) and not any(h in spans for h in set(pool) - reference)


@pytest.mark.parametrize("in_memory", [1, 7, 100])
def test_a_spilled_span_set_answers_like_a_set(tmp_path, in_memory):
    """Beyond ``in_memory`` spans the record is sorted runs on disk, merged when of similar size:
    still a set's answers, a logarithmic number of runs, and no files left after close."""
    rng = random.Random(in_memory)
    spill = tmp_path / "spans"
    reference = set()
    pool = [rng.getrandbits(64) for _ in range(4000)]
    with SpanSet(buffer=64, in_memory=in_memory, spill=spill) as spans:
        for step in range(300):
            batch = rng.sample(pool, 20)
            assert spans.isin(np.array(batch, dtype=np.uint64)).tolist() == [h in reference for h in batch], step
            assert [h in spans for h in batch[:3]] == [h in reference for h in batch[:3]], step
            new = [h for h in batch if h not in reference]
            spans.update(new)
            reference.update(new)
            assert len(spans) == len(reference)
            assert len(spans._sorted) < max(in_memory, 2)  # never more than in_memory held in the array
        assert spans.runs_written > len(reference) // max(in_memory, 16) // 2  # the record went to disk ...
        assert 1 <= len(list(spill.iterdir())) <= 2 + 2 * int(np.log2(len(reference))), sorted(spill.iterdir())  # ... merged
        every = np.array(sorted(set(pool)), dtype=np.uint64)
        assert spans.isin(every).tolist() == [int(h) in reference for h in every]
    assert not spill.exists()


def test_merged_runs_are_one_sorted_run():
    import io

    from pretrain.data.clean import _merge_sorted

    rng = np.random.default_rng(0)
    for na, nb, block in ((1000, 3, 7), (5, 900, 16), (500, 500, 1), (0, 10, 4), (333, 777, 1000)):
        a, b = np.sort(rng.integers(0, 2**63, na, dtype=np.uint64)), np.sort(rng.integers(0, 2**63, nb, dtype=np.uint64))
        out = io.BytesIO()
        _merge_sorted(a, b, out, block)
        assert np.array_equal(np.frombuffer(out.getvalue(), dtype=np.uint64), np.sort(np.concatenate([a, b])))


def test_cleaning_with_the_span_set_equals_cleaning_with_a_set():
    rng = random.Random(4)
    paras = [f"Alpha {w} beta. Gamma {w} delta. Epsilon {w} zeta. Eta {w} theta." for w in range(60)]
    docs = [GOOD.replace("river", f"river{i}") + "\n" + "\n".join(rng.sample(paras, 3)) for i in range(300)]
    cfg = CleanConfig()
    small, plain = SpanSet(buffer=16), set()
    got = [clean_document(d, cfg, small) for d in docs]
    assert got == [clean_document(d, cfg, plain) for d in docs]
    assert sum(w["lines_repeated_span"] for _, w in got) > 100  # the rule was at work
