"""How close a pipeline run came to the best a perfect scheduler could do on its cores.

Claim measured: the wall time of one Snakemake run of the whole pipeline against the ideal schedule of
the same run's own rule times on the same cores,

    ideal = max(critical path, sum over jobs of threads x time / cores)

(no schedule can beat the longest dependency chain, nor finish the total core-time faster than all
cores busy). Target (issue 17): measured wall within 10 % of ideal.

Inputs, all from the run itself: every job's wall time from ``<results>/logs/benchmarks/*.tsv``
(Snakemake's ``benchmark:``, column ``s``), the run's start and end from ``<results>/logs/pipeline_run.json``
(written by the workflow's onstart/onsuccess), and the job graph with each job's threads and benchmark
file from a dry run (``snakemake -n --forceall``) of the same configuration (made before the run with
``--run`` and kept in ``<results>/logs/pipeline_plan.json``). The measured wall includes
Snakemake's own start-up (DAG building) and job launch overheads; the ideal does not.

    .venv/bin/python benchmarks/pipeline_schedule.py --profile ci --cores 2          # analyse the last run
    .venv/bin/python benchmarks/pipeline_schedule.py --profile ci --cores 2 --run    # fresh run, then analyse

Writes ``results/benchmarks/pipeline_schedule_<profile>.csv`` (one row per job) and ``.json`` (summary).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gaincell.io import atomic_write_json, atomic_write_text  # noqa: E402

TARGET_RATIO = 1.10   # issue 17: wall within 10 % of the ideal schedule


@dataclass
class Job:
    """One job of the run: its rule, threads, files, and measured wall time."""

    jobid: int
    rule: str
    wildcards: str = ""
    threads: int = 1
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    benchmark: str = ""
    seconds: Optional[float] = None       # from the benchmark file; None: a job without one (e.g. `all`)
    finish_on_critical_path: float = 0.0  # earliest finish with unlimited cores, s
    on_critical_path: bool = False


def plan(profile: str, cores: int, overrides: str) -> List[Job]:
    """The run's jobs from a dry run of the whole DAG (same configuration as the measured run)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", str(cores), "--config",
           f"profile={profile}"] + ([f"overrides={overrides}"] if overrides else [])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    jobs: List[Job] = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head:
            continue
        fields_: Dict[str, str] = dict(re.findall(r"^\s{4}(\w+): (.*)$", block, flags=re.M))
        jobs.append(Job(jobid=int(fields_["jobid"]), rule=head.group(1), wildcards=fields_.get("wildcards", ""),
                        threads=int(fields_.get("threads", 1)),
                        inputs=[s for s in fields_.get("input", "").split(", ") if s],
                        outputs=[s for s in fields_.get("output", "").split(", ") if s],
                        benchmark=fields_.get("benchmark", "")))
    return jobs


def read_seconds(jobs: List[Job], start: float, end: float) -> List[str]:
    """Fill each job's wall time from its benchmark file; problems (missing, or not from this run)."""
    problems = []
    for job in jobs:
        if not job.benchmark:
            continue
        path = REPO / job.benchmark
        if not path.is_file():
            problems.append(f"{job.benchmark}: missing")
            continue
        if not start - 1 <= path.stat().st_mtime <= end + 1:
            problems.append(f"{job.benchmark}: written outside the run ({time.ctime(path.stat().st_mtime)})")
        with open(path) as fh:
            job.seconds = float(next(csv.DictReader(fh, delimiter="\t"))["s"])
    return problems


def critical_path(jobs: List[Job]) -> List[Job]:
    """Longest chain of dependent jobs by measured time (each job after every producer of its inputs)."""
    producer = {out: job for job in jobs for out in job.outputs}
    order = sorted(jobs, key=lambda j: j.jobid)
    finish: Dict[int, float] = {}
    before: Dict[int, Optional[Job]] = {}

    def visit(job: Job) -> float:
        if job.jobid not in finish:
            parents = {producer[f].jobid: producer[f] for f in job.inputs if f in producer}
            ready, prev = 0.0, None
            for parent in parents.values():
                if visit(parent) > ready:
                    ready, prev = finish[parent.jobid], parent
            finish[job.jobid] = ready + (job.seconds or 0.0)
            before[job.jobid] = prev
        return finish[job.jobid]

    for job in order:
        job.finish_on_critical_path = visit(job)
    last: Optional[Job] = max(order, key=lambda j: finish[j.jobid])
    chain = []
    while last is not None:
        last.on_critical_path = True
        chain.append(last)
        last = before[last.jobid]
    return chain[::-1]


def list_schedule(jobs: List[Job], cores: int) -> float:
    """Makespan of a greedy list schedule of the measured times on ``cores``: whenever cores are free,
    start the ready job with the longest chain after it (a good heuristic, not always optimal)."""
    producer = {out: job for job in jobs for out in job.outputs}
    parents = {j.jobid: {producer[f].jobid for f in j.inputs if f in producer} for j in jobs}
    children: Dict[int, List[Job]] = {j.jobid: [] for j in jobs}
    for j in jobs:
        for p in parents[j.jobid]:
            children[p].append(j)
    tail: Dict[int, float] = {}

    def rest(job: Job) -> float:
        if job.jobid not in tail:
            tail[job.jobid] = (job.seconds or 0.0) + max((rest(c) for c in children[job.jobid]), default=0.0)
        return tail[job.jobid]

    done, running, now, free = set(), [], 0.0, cores
    waiting = {j.jobid: j for j in jobs}
    while waiting or running:
        ready = sorted((j for j in waiting.values() if parents[j.jobid] <= done), key=rest, reverse=True)
        for job in ready:
            need = min(job.threads, cores)
            if need <= free:
                free -= need
                running.append((now + (job.seconds or 0.0), job.jobid, need))
                del waiting[job.jobid]
        running.sort()
        now, jobid, need = running.pop(0)
        done.add(jobid)
        free += need
    return now


def analyse(profile: str, cores: int, overrides: str, results_dir: Path) -> dict:
    record = json.loads((results_dir / "logs" / "pipeline_run.json").read_text())
    if "end" not in record:
        raise SystemExit(f"{results_dir}/logs/pipeline_run.json has no end: the run did not finish")
    saved = results_dir / "logs" / "pipeline_plan.json"  # the DAG as planned right before a --run
    jobs = [Job(**j) for j in json.loads(saved.read_text())] if saved.is_file() else plan(profile, cores, overrides)
    problems = read_seconds(jobs, record["start"], record["end"])
    chain = critical_path(jobs)
    path_s = chain[-1].finish_on_critical_path
    work_core_s = sum(min(j.threads, cores) * (j.seconds or 0.0) for j in jobs)
    ideal_s = max(path_s, work_core_s / cores)
    wall_s = record["end"] - record["start"]
    summary = {
        "profile": profile, "cores": cores, "overrides": overrides, "jobs": len(jobs),
        "measured_wall_s": round(wall_s, 1), "ideal_s": round(ideal_s, 1),
        "critical_path_s": round(path_s, 1), "work_core_s": round(work_core_s, 1),
        "work_over_cores_s": round(work_core_s / cores, 1), "ratio_wall_to_ideal": round(wall_s / ideal_s, 3),
        "target_ratio": TARGET_RATIO, "target_met": wall_s <= TARGET_RATIO * ideal_s,
        "list_schedule_s": round(list_schedule(jobs, cores), 1),
        "sum_of_job_times_s": round(sum(j.seconds or 0.0 for j in jobs), 1),
        "critical_path": [f"{j.rule}{'[' + j.wildcards + ']' if j.wildcards else ''} {j.seconds or 0:.1f}s"
                          for j in chain if j.seconds],
        "problems": problems, "started": time.ctime(record["start"]),
        "note": "measured here, on a machine shared with other work; the wall includes Snakemake's start-up",
    }
    out_dir = REPO / "results" / "benchmarks"
    rows = [{k: v for k, v in asdict(j).items() if k not in ("inputs", "outputs")} for j in jobs]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / f"pipeline_schedule_{profile}.csv", table.getvalue())
    atomic_write_json(out_dir / f"pipeline_schedule_{profile}.json", summary)
    return summary


def fresh_run(profile: str, cores: int, overrides: str, results_dir: Path) -> None:
    """Run the whole pipeline from an empty results folder (the measured run)."""
    shutil.rmtree(results_dir, ignore_errors=True)
    jobs = plan(profile, cores, overrides)
    atomic_write_json(results_dir / "logs" / "pipeline_plan.json", [asdict(j) for j in jobs])
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--config", f"profile={profile}"] + \
        ([f"overrides={overrides}"] if overrides else [])
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--overrides", default="", help="the --config overrides of the measured run")
    parser.add_argument("--results-dir", default=None, help="default: results/<profile>")
    parser.add_argument("--run", action="store_true", help="first run the pipeline afresh (deletes results)")
    args = parser.parse_args(argv)
    results_dir = REPO / (args.results_dir or f"results/{args.profile}")
    if args.run:
        fresh_run(args.profile, args.cores, args.overrides, results_dir)
    summary = analyse(args.profile, args.cores, args.overrides, results_dir)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
