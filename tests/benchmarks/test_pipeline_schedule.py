"""benchmarks/pipeline_schedule.py: the critical path, the ideal bound and the list schedule of a small
job graph, against values worked out by hand; a run's analysis from its benchmark files."""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("pipeline_schedule", REPO / "benchmarks" / "pipeline_schedule.py")
ps = importlib.util.module_from_spec(spec)
sys.modules["pipeline_schedule"] = ps  # dataclasses look their module up there
spec.loader.exec_module(ps)


def _graph():
    """data (10 s, 2 threads) -> a (30 s) -> c (5 s); data -> b (20 s); sink d (1 s) after c and b;
    e (25 s) independent."""
    J = ps.Job
    return [J(0, "data", threads=2, outputs=["d.bin"], seconds=10.0),
            J(1, "a", inputs=["d.bin"], outputs=["a.pt"], seconds=30.0),
            J(2, "b", inputs=["d.bin"], outputs=["b.pt"], seconds=20.0),
            J(3, "c", inputs=["a.pt"], outputs=["c.json"], seconds=5.0),
            J(4, "d", inputs=["c.json", "b.pt"], outputs=["fig"], seconds=1.0),
            J(5, "e", outputs=["e.json"], seconds=25.0)]


def test_critical_path_and_list_schedule_by_hand():
    jobs = _graph()
    chain = ps.critical_path(jobs)
    assert [j.rule for j in chain] == ["data", "a", "c", "d"]
    assert chain[-1].finish_on_critical_path == pytest.approx(46.0)
    # on 2 cores: data takes both (0-10, its chain of 46 s beats e's 25 s); then the longest-chain-first
    # rule starts a (36 s with what follows) and e (25 s) before b (21 s): a 10-40, e 10-35, b 35-55,
    # c 40-45, d 55-56 (an optimal schedule would take 50.5 at best, the bound below)
    assert ps.list_schedule(jobs, 2) == pytest.approx(56.0)
    work = 2 * 10 + 30 + 20 + 5 + 1 + 25  # threads x seconds
    assert max(46.0, work / 2) == pytest.approx(50.5)


def test_analyse_reads_the_runs_own_files(tmp_path, monkeypatch):
    results = tmp_path / "results"
    (results / "logs" / "benchmarks").mkdir(parents=True)
    jobs = _graph()
    start = time.time() - 30
    for job in jobs:
        job.benchmark = str(results / "logs" / "benchmarks" / f"{job.rule}.tsv")
        Path(job.benchmark).write_text(f"s\th:m:s\n{job.seconds}\t0:00:00\n")
        job.seconds = None
    (results / "logs" / "pipeline_plan.json").write_text(json.dumps([ps.asdict(j) for j in jobs]))
    (results / "logs" / "pipeline_run.json").write_text(json.dumps({"start": start, "end": start + 60.5}))
    monkeypatch.setattr(ps, "REPO", tmp_path)
    summary = ps.analyse("ci", 2, "", results)
    assert summary["ideal_s"] == pytest.approx(50.5) and summary["critical_path_s"] == pytest.approx(46.0)
    assert summary["measured_wall_s"] == pytest.approx(60.5)
    assert summary["ratio_wall_to_ideal"] == pytest.approx(60.5 / 50.5, abs=1e-3) and not summary["target_met"]
    assert summary["problems"] == []
    # a benchmark file older than the run is flagged (a job this run did not execute)
    os.utime(results / "logs" / "benchmarks" / "e.tsv", (start - 3600, start - 3600))
    assert [p.split(": ")[1].split(" (")[0] for p in ps.analyse("ci", 2, "", results)["problems"]] == \
        ["written outside the run"]
    assert (tmp_path / "results" / "benchmarks" / "pipeline_schedule_ci.csv").read_text().count("\n") == 7
