"""SPICE throughput: time per simulated cell point and per array operation, serial versus process pool.

Claims measured side by side in one run (same machine, same netlists, no cache):

* a cell point (one transient of the signed pair) costs milliseconds once the netlist is loaded, and the
  process pool divides a sweep's wall time by about the number of workers;
* an array operation (one transient of the rows x cols signed array with parasitics) grows with the
  number of transistors; loading (parsing) the netlist is measured apart from the transient;
* the flattened sky130 devices load much faster than the library's own subcircuits.

    .venv/bin/python benchmarks/spice.py --quick             # 16 x 16 array, 64 cell points
    .venv/bin/python benchmarks/spice.py --sizes 16 32 64    # up to the paper's 64 x 64

Writes ``results/benchmarks/spice.csv`` (one row per measurement) and ``spice.json`` (machine, versions).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gaincell.config import compose
from gaincell.device import array as array_mod
from gaincell.device import simulate, sweeps
from gaincell.device.netlists import ArrayLayout, CellDesign
from gaincell.device.technology import make_technology
from gaincell.io import atomic_to_csv, atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], help="array sizes (square)")
    ap.add_argument("--points", type=int, default=256, help="cell points of the sweep benchmark")
    ap.add_argument("--queries", type=int, default=2, help="array operations per size (pool: one per worker)")
    ap.add_argument("--workers", type=int, default=0, help="pool size (0: all cores)")
    ap.add_argument("--quick", action="store_true", help="--sizes 16 --points 64")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.points = [16], 64
    workers = simulate.resolve_workers(args.workers)
    cfg = compose(["profile=tiny"])
    tech = make_technology(cfg.device)
    cell = CellDesign.from_config(cfg.device)
    version = simulate.ngspice_version_cached()
    rows = []

    # ---- cell points: serial vs pool ------------------------------------------------------------------
    grid = sweeps.sweep_grid(cfg.device)
    tasks = sweeps.read_tasks(tech, cell, grid)[: args.points]
    for mode, n in (("serial", 1), ("pool", workers)):
        t0 = time.perf_counter()
        res = simulate.run_tasks(tasks, workers=n, progress=False, version=version)
        wall = time.perf_counter() - t0
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:3]
        rows.append({"benchmark": "cell_points", "mode": mode, "workers": n, "items": len(tasks),
                     "wall_s": wall, "per_item_ms": 1e3 * wall / len(tasks),
                     "simulate_ms_median": 1e3 * float(np.median([r.seconds for r in res]))})
        print(f"cell points {mode:6s} x{n}: {wall:.2f} s for {len(tasks)} ({rows[-1]['per_item_ms']:.1f} ms each)")

    # ---- netlist load: flattened vs library subcircuits ----------------------------------------------
    for label, text in (
        ("flattened", "load\n" + tech.preamble([(cell.read_device, cell.read_w_um, cell.read_l_um)])
         + tech.instance("1", "d", "g", "0", "0", cell.read_device, cell.read_w_um, cell.read_l_um) + "\n.end\n"),
        ("library_subckt", f"load\n.lib {tech.lib_path} {tech.corner}\n"
         + tech.subckt_instance("1", "d", "g", "0", "0", cell.read_device, cell.read_w_um, cell.read_l_um)
         + "\n.end\n")) if hasattr(tech, "subckt_instance") else ():
        simulate._LOADED_HASH = None
        t0 = time.perf_counter()
        simulate._load(text)
        rows.append({"benchmark": "netlist_load_one_device", "mode": label, "workers": 1, "items": 1,
                     "wall_s": time.perf_counter() - t0, "per_item_ms": 1e3 * (time.perf_counter() - t0)})
        print(f"load one device, {label}: {rows[-1]['wall_s']:.3f} s")

    # ---- arrays: load + one transient per size; serial vs pool on `queries` operations --------------
    for size in args.sizes:
        layout = ArrayLayout(rows=size, cols=size, wire_resistance_ohm=float(cfg.device.wire_resistance_ohm),
                             wire_capacitance_f=float(cfg.device.wire_capacitance_f),
                             write_transistors=bool(cfg.device.array_write_transistors))
        arr_tasks, _ = array_mod.array_tasks(tech, cell, layout, ["qk"], 1, args.queries, 0, grid,
                                             float(grid["read_v"][-1]))
        simulate._LOADED_HASH = None
        t0 = time.perf_counter()
        simulate._load(arr_tasks[0].netlist)
        load_s = time.perf_counter() - t0
        res = simulate.run_task(arr_tasks[0])   # netlist already loaded: the transient alone
        assert res.ok, res.error
        transistors = size * size * 2 * (2 if layout.write_transistors else 1)
        rows.append({"benchmark": f"array_{size}x{size}", "mode": "load", "workers": 1, "items": 1,
                     "wall_s": load_s, "per_item_ms": 1e3 * load_s, "transistors": transistors})
        rows.append({"benchmark": f"array_{size}x{size}", "mode": "transient", "workers": 1, "items": 1,
                     "wall_s": res.seconds, "per_item_ms": 1e3 * res.seconds, "transistors": transistors})
        print(f"array {size}x{size} ({transistors} transistors): load {load_s:.2f} s, one operation {res.seconds:.2f} s")
        if len(arr_tasks) > 1:
            for mode, n in (("serial", 1), ("pool", min(workers, len(arr_tasks)))):
                simulate._LOADED_HASH = None
                t0 = time.perf_counter()
                out = simulate.run_tasks(arr_tasks, workers=n, progress=False, version=version)
                wall = time.perf_counter() - t0
                assert all(r.ok for r in out)
                rows.append({"benchmark": f"array_{size}x{size}_ops", "mode": mode, "workers": n,
                             "items": len(arr_tasks), "wall_s": wall, "per_item_ms": 1e3 * wall / len(arr_tasks),
                             "transistors": transistors})
                print(f"array {size}x{size} {len(arr_tasks)} operations {mode} x{n}: {wall:.2f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    atomic_to_csv(df, args.out / "spice.csv")
    atomic_write_json(args.out / "spice.json", {
        "ngspice_version": version, "technology": tech.provenance(), "cpu_count": os.cpu_count(),
        "workers": workers, "platform": platform.platform(), "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": "wall-clock on a shared machine; serial and pool measured back to back in one run",
        "rows": rows})
    print(f"wrote {args.out / 'spice.csv'}")


if __name__ == "__main__":
    main()
