"""The evaluate stage: CLI config -> harness -> tidy table, resumable per task, clear offline errors."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from gaincell.evaluate.lm import GaincellLM
from gaincell.evaluate.stage import MissingDatasetError, evaluate_variant, merge_results
from gaincell.evaluate.tasks import LOCAL_TASKS, LocalTaskParams

SMALL = ["eval.num_examples=6", "eval.context_words=12", "eval.ppl_doc_words=40", "eval.bootstrap_iters=10",
         "eval.batch_size=8", "tracking.mode=disabled"]


@pytest.fixture
def trained_inputs(tmp_path, heldout_text):
    """A data folder (trained BPE tokenizer, meta.json, eval_text.txt) and a random GPT checkpoint."""
    from gaincell.data import train_bpe_tokenizer
    from gaincell.model import GPT, GPTConfig

    data_dir = tmp_path / "data"
    tok = train_bpe_tokenizer([heldout_text], vocab_size=300, out_path=data_dir / "tokenizer.json")
    (data_dir / "meta.json").write_text(json.dumps({"tokenizer": "bpe_trained", "vocab_size": tok.vocab_size,
                                                    "eot_token": tok.eot_token}))
    (data_dir / "eval_text.txt").write_text(heldout_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.checkpoint_state(), ckpt)
    return data_dir, ckpt


def _cfg(tmp_path, data_dir, ckpt, name="softmax", extra=()):
    from gaincell.config import compose

    return compose([f"results_dir={tmp_path / 'results'}", f"data.data_dir={data_dir}", *SMALL,
                    f"+stage.name={name}", f"+stage.checkpoint={ckpt}", *extra])


def test_stage_writes_tidy_table_and_resumes_per_task(tmp_path, trained_inputs, monkeypatch):
    from gaincell.evaluate.stage import run
    from gaincell.model import GPT

    data_dir, ckpt = trained_inputs
    cfg = _cfg(tmp_path, data_dir, ckpt)
    table = run(cfg)
    eval_dir = tmp_path / "results" / "eval"
    on_disk = pd.read_csv(eval_dir / "softmax" / "results.csv")
    assert list(on_disk.columns) == ["variant", "task", "metric", "value", "stderr", "num_samples"]
    assert set(on_disk["task"]) == set(LOCAL_TASKS)
    metrics = {(r.task, r.metric): r for r in on_disk.itertuples()}
    for task in ("local_next_word", "local_continuation"):
        for metric in ("acc", "acc_norm"):
            row = metrics[(task, metric)]
            assert 0 <= row.value <= 1 and math.isfinite(row.stderr) and row.num_samples == 6
    assert metrics[("local_heldout_ppl", "word_perplexity")].value > 1
    assert math.isfinite(metrics[("local_lambada", "perplexity")].stderr)  # bootstrap stderr
    assert pd.read_csv(eval_dir / "summary.csv").equals(on_disk)
    assert json.loads((eval_dir / "softmax" / "results.json").read_text())["rows"][0]["variant"] == "softmax"

    # Resume: every task is done, so the checkpoint is not even loaded.
    def refuse(*args, **kwargs):
        raise AssertionError("finished tasks must not be re-evaluated")

    monkeypatch.setattr(GPT, "from_checkpoint", classmethod(refuse))
    pd.testing.assert_frame_equal(run(cfg), table)

    # One task's result lost: only that task runs again, and gives the same numbers (deterministic).
    monkeypatch.undo()
    calls = []
    original = GPT.from_checkpoint.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(GPT, "from_checkpoint", classmethod(counting))
    done = {p.name: p.stat().st_mtime_ns for p in (eval_dir / "softmax" / "tasks").glob("*.json")}
    (eval_dir / "softmax" / "tasks" / "local_continuation.json").unlink()
    pd.testing.assert_frame_equal(run(cfg), table)
    assert len(calls) == 1
    after = {p.name: p.stat().st_mtime_ns for p in (eval_dir / "softmax" / "tasks").glob("*.json")}
    assert [n for n in done if done[n] != after[n]] == ["local_continuation.json"]

    # A different checkpoint is a different model: nothing is reused.
    model = GPT.from_checkpoint(ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    other = tmp_path / "other.pt"
    torch.save(model.checkpoint_state(), other)
    changed = run(_cfg(tmp_path, data_dir, other, extra=["eval.tasks=[local_heldout_ppl]"]))
    before = table[table["task"] == "local_heldout_ppl"].reset_index(drop=True)
    assert list(changed["metric"]) == list(before["metric"])
    assert (changed["value"] != before["value"]).all()


def test_stage_requires_name_and_checkpoint(tmp_path, trained_inputs):
    from gaincell.config import compose
    from gaincell.evaluate.stage import run

    data_dir, ckpt = trained_inputs
    with pytest.raises(ValueError, match=r"\+stage.name"):
        run(compose([f"results_dir={tmp_path}", f"+stage.checkpoint={ckpt}"]))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run(compose([f"results_dir={tmp_path}", "+stage.name=x", f"+stage.checkpoint={tmp_path / 'nope.pt'}"]))


def test_variants_merge_into_summary_and_figure(tmp_path, toys, tokenizer, heldout_text):
    from gaincell.figures.evaluate import fig_eval_tasks

    text = tmp_path / "eval_text.txt"
    text.write_text(heldout_text)
    params = LocalTaskParams(num_examples=6, context_words=12, ppl_doc_words=40)
    eval_dir = tmp_path / "results" / "eval"
    for variant, block in (("bigram_a", 8), ("bigram_b", 16)):
        evaluate_variant(lambda: GaincellLM(toys.BigramToy(block_size=block), tokenizer, device="cpu"),
                         variant, ["local_heldout_ppl", "local_next_word"], eval_dir, text, params,
                         model_fingerprint=variant,
                         bootstrap_iters=10)
    summary = pd.read_csv(merge_results(eval_dir))
    assert set(summary["variant"]) == {"bigram_a", "bigram_b"}
    # a bigram's scores do not depend on the context length: both variants agree exactly
    a, b = (summary[summary["variant"] == v].set_index(["task", "metric"])["value"] for v in ("bigram_a", "bigram_b"))
    pd.testing.assert_series_equal(a, b, check_names=False)
    paths = fig_eval_tasks(tmp_path / "results", tmp_path / "figures")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)


def test_harness_task_offline_fails_naming_the_dataset(tmp_path):
    def never():
        raise AssertionError("the model must not be loaded when a dataset is missing")

    with pytest.raises(MissingDatasetError) as err:
        evaluate_variant(never, "v", ["arc_easy", "wikitext"], tmp_path / "eval", tmp_path / "unused.txt",
                         LocalTaskParams(), model_fingerprint="x", offline=True)
    message = str(err.value)
    assert "allenai/ai2_arc" in message and "ARC-Easy" in message
    assert "EleutherAI/wikitext_document_level" in message and "eval.offline" in message


def test_unknown_task_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown eval task.*no_such_task"):
        evaluate_variant(lambda: None, "v", ["no_such_task"], tmp_path / "eval", tmp_path / "unused.txt",
                         LocalTaskParams(), model_fingerprint="x")


def test_registered_model_loads_from_arg_string(trained_inputs):
    """``lm_eval`` style construction by name: ``gaincell`` with checkpoint and data folder."""
    from lm_eval.api.registry import get_model

    data_dir, ckpt = trained_inputs
    lm = get_model("gaincell").create_from_arg_string(f"checkpoint={ckpt},data_dir={data_dir},batch_size=4")
    assert isinstance(lm, GaincellLM) and lm.max_length == 32 and lm.batch_size == 4
    assert lm.eot_token_id == json.loads((data_dir / "meta.json").read_text())["eot_token"]
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        get_model("gaincell").create_from_arg_string(f"data_dir={data_dir}")


def test_a_checkpoint_refuses_another_tokenizer_of_the_same_size(tmp_path, trained_inputs, heldout_text):
    """A retrained tokenizer of the same vocabulary size used to score garbage (word perplexity 410,409
    instead of 10,340) with exit code 0: the checkpoint records its tokenizer's hash and evaluation refuses."""
    from gaincell.data import TokenizerMismatch, tokenizer_fingerprint, train_bpe_tokenizer
    from gaincell.evaluate.stage import run
    from gaincell.model import GPT

    data_dir, ckpt = trained_inputs
    state = torch.load(ckpt, weights_only=False)
    state["tokenizer"] = tokenizer_fingerprint(data_dir)
    torch.save(state, ckpt)
    lm = GaincellLM(str(ckpt), str(data_dir), device="cpu")  # its own tokenizer: accepted
    assert lm.model.tokenizer_info["sha256"] == tokenizer_fingerprint(data_dir)["sha256"]
    old_hash = state["tokenizer"]["sha256"][:12]
    train_bpe_tokenizer([heldout_text.upper()], vocab_size=300, out_path=data_dir / "tokenizer.json")
    new_hash = tokenizer_fingerprint(data_dir)["sha256"][:12]
    message = (rf"checkpoint .*ckpt.pt was trained with tokenizer sha256 {old_hash} \(.*tokenizer.json\) but "
               rf".*data has tokenizer sha256 {new_hash} \(.*tokenizer.json\): expected the data folder")
    with pytest.raises(TokenizerMismatch, match=message):
        GaincellLM(str(ckpt), str(data_dir), device="cpu")
    with pytest.raises(TokenizerMismatch, match=message):
        run(_cfg(tmp_path, data_dir, ckpt))
    # The record travels with the model into checkpoints written from it (adaptation, exports).
    assert GPT.from_checkpoint(ckpt).checkpoint_state()["tokenizer"] == state["tokenizer"]


def test_lm_eval_cli_runs_the_gaincell_model_on_a_local_task(tmp_path, trained_inputs):
    """lm-eval's own command line (``gaincell-lm-eval`` / ``python -m gaincell lm_eval``) resolves
    ``--model gaincell`` from a checkpoint and runs a local task found through ``--include_path``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    from gaincell.evaluate.tasks import build_local_tasks

    repo = Path(__file__).resolve().parents[2]
    script = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["gaincell-lm-eval"]
    assert script == "gaincell.evaluate.harness_cli:main"
    data_dir, ckpt = trained_inputs
    build_local_tasks(data_dir / "eval_text.txt", tmp_path / "tasks", ["local_next_word"],
                      LocalTaskParams(num_examples=4, context_words=12))
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "gaincell", "lm_eval", "--model", "gaincell", "--model_args",
           f"checkpoint={ckpt},data_dir={data_dir}", "--tasks", "local_next_word", "--include_path",
           str(tmp_path / "tasks"), "--batch_size", "2", "--device", "cpu", "--output_path", str(out_dir)]
    env = dict(os.environ, PYTHONPATH=str(repo / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out_dir.rglob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["config"]["model"] == "gaincell"
    assert results["n-samples"]["local_next_word"]["effective"] == 4
    assert 0 <= results["results"]["local_next_word"]["acc,none"] <= 1
