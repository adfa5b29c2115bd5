"""The CI output checker finds what a pipeline run failed to make, and accepts a complete run."""
import json

from gaincell import workflow_check as wc


def _complete_run(root):
    def put(rel, data=b"x" * 20_000):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    put("device/summary.json", json.dumps({"technology": "sky130", "mac_energy_j": 1e-15}))
    put("fit/coefficients.json", json.dumps({"coefficients": [0.1 * i for i in range(10)], "pad": "x" * 50}))
    put("data/meta.json", json.dumps({"vocab_size": 4096}))
    put("data/train.bin"), put("data/val.bin")
    for run in wc.TRAINED_RUNS:
        put(f"checkpoints/{run}/final.pt")
        put(f"train/{run}/metrics.csv", "iter,train_loss\n1,5.0\n2,4.0\n")
    for run in wc.CONVERTED_RUNS:
        put(f"checkpoints/{run}/final.pt")
    for run in wc.ADAPTED_RUNS:
        put(f"checkpoints/{run}/ckpt.pt")
        put(f"adapt/{run}/summary.json", json.dumps({"iterations": 3}))
    for variant in wc.VARIANTS:
        put(f"eval/{variant}/results.csv", "variant,task,metric,value\na,b,acc,0.5\na,b,acc_norm,0.5\n")
        put(f"adapt/study/{variant}.json", json.dumps({"val_loss": 5.0, "val_loss_spread": 0.01}))
    for value in ("0.0", "0.001", "0.1"):
        put(f"adapt/leakage/{value}.json", json.dumps({"val_loss": 5.0}))
    for name in ("cell_variation_0", "cell_variation_0.1", "readout_noise_0.1"):
        put(f"adapt/variation/{name}.json", json.dumps({"models": {}}))
    for row in wc.study.TABLE_ROWS:  # the study table's diagnostics (issue 15)
        put(f"diagnose/{row.run}.json", json.dumps({"run": row.run, "losses": [5.0] * 16, "pad": "x" * 100}))
    for name, rows in (("study_table", len(wc.study.TABLE_ROWS)), ("claims", len(wc.study.CLAIMS)),
                       ("cells", 1 + len(wc.study.CELLS))):
        put(f"diagnose/{name}.csv", "name,value\n" + "".join(f"r{i},1.0\n" for i in range(rows)))
    put("hardware/estimates.json", json.dumps({"latency_per_token_ns": 65.0}))
    put("hardware/gpu_baseline.json", json.dumps({"device": "cpu", "latency_per_token_s": 1e-4}))
    put("samples/nonlinear_finetuned.txt", "To be, or not to be, that is the question")
    made = {}
    for name in wc.REQUIRED_FIGURES:
        put(f"figures/{name}.png")
        made[name] = {"files": [str(root / f"figures/{name}.png")]}
    put("figures/index.json", json.dumps({"made": made, "failed": {}}))
    for rule in wc.RULES_WITH_BENCHMARKS:
        put(f"logs/benchmarks/{rule}.tsv", "s\th:m:s\n1.0\t0:00:01\n")


def test_complete_run_passes(tmp_path):
    _complete_run(tmp_path)
    assert wc.check(tmp_path) == []
    assert wc.main([str(tmp_path)]) == 0


def test_second_seed_replicate_is_required_only_when_the_run_made_it(tmp_path):
    _complete_run(tmp_path)
    (tmp_path / "checkpoints" / "linear_hw_seed2" / "final.pt").unlink()
    (tmp_path / "diagnose" / "softmax_seed2.json").unlink()
    assert wc.check(tmp_path) == []                      # no study summary saying second_seed: not asked for
    (tmp_path / "diagnose" / "summary.json").write_text(json.dumps({"second_seed": True}))
    problems = wc.check(tmp_path)
    assert any("checkpoints/linear_hw_seed2/final.pt" in p for p in problems)
    assert any("diagnose/softmax_seed2.json" in p for p in problems)


def test_analog_variant_without_noise_spread_is_reported(tmp_path):
    """A spread of exactly 0 over inference-noise seeds means the noise was not applied."""
    _complete_run(tmp_path)
    run = wc.NOISE_SEED_VARIANTS[0]
    (tmp_path / f"adapt/study/{run}.json").write_text(json.dumps({"val_loss": 5.0, "val_loss_spread": 0.0}))
    problems = wc.check(tmp_path)
    assert len(problems) == 1 and run in problems[0] and "val_loss_spread" in problems[0]


def test_missing_trivial_and_failed_outputs_are_each_reported(tmp_path):
    _complete_run(tmp_path)
    (tmp_path / "checkpoints/linear_hw/final.pt").unlink()
    (tmp_path / "fit/coefficients.json").write_text(json.dumps({"coefficients": [0.0] * 10, "pad": "x" * 50}))
    (tmp_path / "eval/softmax/results.csv").write_text("variant,task,metric,value\n")
    (tmp_path / "figures/study.png").write_bytes(b"tiny")
    index = json.loads((tmp_path / "figures/index.json").read_text())
    index["failed"] = {"leakage": "FileNotFoundError"}
    del index["made"]["eval_tasks"]
    (tmp_path / "figures/index.json").write_text(json.dumps(index))
    problems = "\n".join(wc.check(tmp_path))
    assert "checkpoints/linear_hw/final.pt: missing" in problems
    assert "all coefficients are zero" in problems
    assert "eval/softmax/results.csv" in problems
    assert "figure study" in problems and "figures failed" in problems and "eval_tasks" in problems
    assert wc.main([str(tmp_path)]) == 1


def test_missing_study_table_diagnostics_are_reported(tmp_path):
    _complete_run(tmp_path)
    row = wc.study.TABLE_ROWS[0].run
    (tmp_path / f"diagnose/{row}.json").unlink()
    (tmp_path / "diagnose/claims.csv").write_text("name,value\n")
    problems = wc.check(tmp_path)
    assert f"diagnose/{row}.json: missing" in problems
    assert any(p.startswith("diagnose/claims.csv:") for p in problems) and len(problems) == 2, problems
