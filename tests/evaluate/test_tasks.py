"""Local tasks: exact metrics of a hand-set model through the harness, and the generated task files."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager

from gaincell.evaluate.lm import GaincellLM
from gaincell.evaluate.tasks import (
    LOCAL_TASKS,
    LocalTaskParams,
    build_local_tasks,
    continuation_examples,
    heldout_documents,
    lambada_examples,
    next_word_examples,
    write_local_task,
)


def _evaluate(lm, task_dir, name, docs, bootstrap_iters=0):
    """Write one local task in our YAML format and run it through the harness's simple_evaluate."""
    write_local_task(task_dir, name, docs, LOCAL_TASKS[name][1], fingerprint="test")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[name], task_manager=manager, bootstrap_iters=bootstrap_iters,
                          log_samples=False)
    return out["results"][name]


# Hand computation with the BigramToy table (conftest): after a letter ' ' 1/2, 'a' 1/4, 'b' 1/8;
# after anything else 'a' 1/2, 'b' 1/4, ' ' 1/8. Context "x" is a letter, so " ..." starts with 1/2.
L = math.log


def test_multiple_choice_accuracy_is_exact(toys, tokenizer, tmp_path):
    lm = GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu")
    docs = [
        # " a": 1/2*1/2 = 1/4 ; " b": 1/2*1/4 = 1/8            -> acc right, acc_norm right
        {"context": "x", "choices": ["a", "b"], "label": 0},
        # " aaaa": 1/2*1/2*(1/4)^3 = 1/256 ; " b": 1/8         -> acc picks b (wrong);
        #   per character: log(1/256)/4 = log(1/4) > log(1/8)  -> acc_norm right
        {"context": "x", "choices": ["aaaa", "b"], "label": 0},
        # " b" 1/8 < " a" 1/4                                  -> both wrong
        {"context": "x", "choices": ["b", "a"], "label": 0},
        # " b" 1/8, " a" 1/4, " ab" 1/2*1/2*1/8 = 1/32 (per char log(1/32)/2) -> both pick "a": right
        {"context": "x", "choices": ["b", "a", "ab"], "label": 1},
    ]
    lls = [[L(1 / 4), L(1 / 8)], [L(1 / 256), L(1 / 8)], [L(1 / 8), L(1 / 4)], [L(1 / 8), L(1 / 4), L(1 / 32)]]
    acc = [max(range(len(x)), key=x.__getitem__) == d["label"] for x, d in zip(lls, docs)]
    norm = [max(range(len(x)), key=lambda i: x[i] / len(d["choices"][i])) == d["label"] for x, d in zip(lls, docs)]
    assert sum(acc) / 4 == 0.5 and sum(norm) / 4 == 0.75  # the hand computation above
    res = _evaluate(lm, tmp_path, "local_next_word", docs, bootstrap_iters=10)
    assert res["acc,none"] == 0.5
    assert res["acc_norm,none"] == 0.75
    # harness's closed-form stderr of a mean: sample std (ddof 1) / sqrt(n)
    assert res["acc_stderr,none"] == pytest.approx(math.sqrt((4 * 0.25) / 3) / 2)


def test_rolling_perplexity_is_exact(toys, tokenizer, tmp_path, ppl_rtol):
    lm = GaincellLM(toys.BigramToy(block_size=4), tokenizer, device="cpu")
    docs = [{"text": "a b"}, {"text": "ab ab ab ab ab"}]  # the second is longer than the context (4)
    # "a b": eot->a 1/2, a->' ' 1/2, ' '->b 1/4                          (2 words, 3 bytes)
    # "ab ab ab ab ab": each "ab" after eot/space 1/2*1/8, each space after b 1/2  (5 words, 14 bytes)
    total = L(1 / 2 * 1 / 2 * 1 / 4) + 5 * L(1 / 2 * 1 / 8) + 4 * L(1 / 2)
    res = _evaluate(lm, tmp_path, "local_heldout_ppl", docs)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total / 7), rel=ppl_rtol)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-total / 17), rel=ppl_rtol)
    assert res["bits_per_byte,none"] == pytest.approx(-total / 17 / math.log(2), rel=ppl_rtol)


def test_last_word_accuracy_and_perplexity_are_exact(toys, tokenizer, tmp_path, ppl_rtol):
    lm = GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu")
    docs = [{"context": "x", "target": " a"},    # 1/2*1/2, both greedy            -> right
            {"context": "x", "target": " b"},    # 1/2*1/4, 'b' is not the argmax  -> wrong
            {"context": "b", "target": " ab"}]   # 1/2*1/2*1/8, after 'a' the argmax is ' ' -> wrong
    res = _evaluate(lm, tmp_path, "local_lambada", docs, bootstrap_iters=10)
    assert res["acc,none"] == pytest.approx(1 / 3)
    lls = [L(1 / 4), L(1 / 8), L(1 / 32)]
    assert res["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / 3), rel=ppl_rtol)  # = 2^(10/3)


# --------------------------------------------------------------------------------------------------
# generated tasks
# --------------------------------------------------------------------------------------------------
PARAMS = LocalTaskParams(num_examples=12, num_choices=4, context_words=20, ppl_doc_words=60, seed=7)


def test_heldout_documents_are_consecutive_text(heldout_text):
    docs = heldout_documents(heldout_text, PARAMS)
    assert len(docs) == 12
    assert all(len(d["text"].split()) >= 60 for d in docs)
    joined = "\n".join(d["text"] for d in docs)
    assert joined.split() == heldout_text.split()[:len(joined.split())]


def test_cloze_examples_are_true_continuations(heldout_text):
    for doc in lambada_examples(heldout_text, PARAMS):
        assert (doc["context"] + doc["target"]) in heldout_text
        assert len(doc["context"].split()) == 20
        assert re.fullmatch(r" [A-Za-z][A-Za-z'\-]*[A-Za-z]", doc["target"])
    mc = next_word_examples(heldout_text, PARAMS)
    assert len(mc) == 12
    labels = set()
    for doc, cloze in zip(mc, lambada_examples(heldout_text, PARAMS)):
        assert doc["context"] == cloze["context"]
        assert doc["choices"][doc["label"]] == cloze["target"][1:]
        assert len({c.lower() for c in doc["choices"]}) == 4
        labels.add(doc["label"])
    assert len(labels) > 1  # the answer's position is drawn, not fixed


def test_continuation_examples(heldout_text):
    docs = continuation_examples(heldout_text, PARAMS)
    assert len(docs) == 12
    for doc in docs:
        truth = doc["choices"][doc["label"]]
        assert (doc["context"] + truth) in heldout_text
        assert len(doc["context"].split()) >= 20
        assert len(set(doc["choices"])) == 4
        assert all(c[:1].isspace() for c in doc["choices"])


def test_build_is_cached_deterministic_and_rebuilt_when_stale(heldout_text, tmp_path):
    text_path = tmp_path / "eval_text.txt"
    text_path.write_text(heldout_text)
    names = list(LOCAL_TASKS)
    paths = build_local_tasks(text_path, tmp_path / "tasks", names, PARAMS)
    first = {n: (tmp_path / "tasks" / f"{n}.jsonl").read_bytes() for n in names}
    for name, path in paths.items():
        cfg = yaml.safe_load(path.read_text())
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith("/") and json.loads(open(data).readline())
        assert cfg["task"] == name
    mtimes = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    build_local_tasks(text_path, tmp_path / "tasks", names, PARAMS)  # cached: untouched
    assert {n: p.stat().st_mtime_ns for n, p in paths.items()} == mtimes
    # same inputs in a new folder: identical bytes (seeded)
    build_local_tasks(text_path, tmp_path / "again", names, PARAMS)
    assert {n: (tmp_path / "again" / f"{n}.jsonl").read_bytes() for n in names} == first
    # other parameters: rebuilt
    other = LocalTaskParams(num_examples=5, num_choices=3, context_words=20, ppl_doc_words=60, seed=7)
    build_local_tasks(text_path, tmp_path / "tasks", ["local_next_word"], other)
    rebuilt = [json.loads(x) for x in (tmp_path / "tasks" / "local_next_word.jsonl").read_text().splitlines()]
    assert len(rebuilt) == 5 and all(len(d["choices"]) == 3 for d in rebuilt)


def test_build_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        build_local_tasks(tmp_path / "missing.txt", tmp_path, ["local_lambada"], PARAMS)
    with pytest.raises(ValueError, match="unknown local task"):
        build_local_tasks(tmp_path / "missing.txt", tmp_path, ["local_bogus"], PARAMS)
    small = tmp_path / "small.txt"
    small.write_text("only a few words here\n")
    with pytest.raises(ValueError, match="no examples could be built"):
        build_local_tasks(small, tmp_path / "t", ["local_lambada"], PARAMS)
    with pytest.raises(ValueError, match="num_choices"):
        LocalTaskParams(num_choices=1)


def test_harness_wikitext_task_on_local_pages(toys, tokenizer, tmp_path, ppl_rtol):
    """The harness's own ``wikitext`` definition (detokenizer, word count of the original page) run on
    local pages: our wrapper gives its word_perplexity exactly as computed by hand."""
    import lm_eval.tasks

    wikitext = Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps({"page": p}) + "\n" for p in ["a b", "ab ab ab ab ab"]))
    (tmp_path / "wikitext_local.yaml").write_text(yaml.safe_dump({
        "include": str(wikitext), "task": "wikitext_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(pages), "validation": str(pages), "test": str(pages)},
                           "cache_dir": str(tmp_path / "hf")}}))
    lm = GaincellLM(toys.BigramToy(block_size=4), tokenizer, device="cpu")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["wikitext_local"], task_manager=manager, bootstrap_iters=0,
                          log_samples=False)["results"]["wikitext_local"]
    total = L(1 / 2 * 1 / 2 * 1 / 4) + 5 * L(1 / 2 * 1 / 8) + 4 * L(1 / 2)  # as in the rolling test
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total / 7), rel=ppl_rtol)
