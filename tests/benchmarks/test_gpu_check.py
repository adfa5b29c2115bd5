"""``benchmarks/gpu_check.sh --dry-run``: the one-shot GPU check runs end to end on the CPU (Triton
interpreted, tiny sizes) and writes its four sections, without the packages the GPU machine lacks.

The dry run executes the same code paths as the GPU run (kernels through the interpreter), so a renamed
function or an import of hydra/wandb/tqdm on those paths fails here, in CI, not on the GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
# Absent on the GPU machine (it has torch, triton, numpy, pandas, nvidia-ml-py) or not needed there.
BLOCKED = ("hydra", "omegaconf", "wandb", "snakemake", "lm_eval", "tqdm", "pandas")
# sitecustomize for the child: the path finder no longer sees these packages, as if not installed
# (importlib.util.find_spec returns None, import raises ModuleNotFoundError).
BLOCKER = f'''
import importlib.machinery, sys
class _WithoutBlocked(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [_WithoutBlocked if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.mark.slow
def test_dry_run_writes_every_section_without_hydra_wandb_tqdm_pandas(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["pass"] is True
    for section in ("kernel_tests", "kernel_benchmark", "decode_baseline", "train_step"):
        assert report[section]["pass"] is True, (section, report[section])
    # the kernels were really compared, forward and all three gradients, each non-trivially
    for case in report["kernel_tests"]["cases"].values():
        assert set(case["outputs"]) == {"y", "dq", "dk", "dv"}
        assert all(o["scale"] > 1e-3 for o in case["outputs"].values())
    impls = {r["implementation"] for r in report["kernel_benchmark"]["rows"]}
    assert {"triton", "dense", "blocked", "sdpa_causal"} <= impls
    assert {r["batch"] for r in report["decode_baseline"]["measurements"]} == {1, 64}
    assert set(report["train_step"]["runs"]) == {"softmax", "linear_hw"}
    summary = (out / "gpu_check.txt").read_text()
    assert summary.startswith("gaincell GPU check (dry run on CPU)") and "PASS" in summary.splitlines()[0]


def test_blocker_really_blocks(tmp_path):
    """The test above proves nothing if the import blocker let hydra through."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    proc = subprocess.run([sys.executable, "-c", "import hydra"], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "No module named 'hydra'" in proc.stderr


def test_unknown_argument_is_a_clear_error():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dryrun"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr
