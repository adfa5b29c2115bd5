"""Circuits with textbook answers through the same simulation code as the characterisation."""
import math

import pytest

from gaincell.device import simulate
from gaincell.device.netlists import closed_form_netlists
from gaincell.device.simulate import Run, Task
from gaincell.device.technology import SquareLawTechnology

SAMPLE = "gaincell.device.sweeps:sample"


def test_rc_charge_follows_exponential_and_alter_changes_tau():
    net = closed_form_netlists()["rc"]   # 1 kOhm, 1 pF: tau = 1 ns
    times = [0.5e-9, 1e-9, 2e-9, 4e-9]
    task = Task(net, [Run([], "tran 0.01n 6n", stop_time_s=6e-9),
                      Run(["alter r1 = 2000"], "tran 0.01n 6n", stop_time_s=6e-9)],
                ["time", "out"], SAMPLE, {"samples": [["out", t] for t in times]})
    (res,) = simulate.run_tasks([task], workers=1, progress=False)
    assert res.ok, res.error
    row = res.rows[0]
    for t in times:
        assert row[f"0:out@{t}"] == pytest.approx(1 - math.exp(-t / 1e-9), abs=2e-3)
        assert row[f"1:out@{t}"] == pytest.approx(1 - math.exp(-t / 2e-9), abs=2e-3)


def test_resistor_divider_operating_point():
    net = closed_form_netlists()["divider"]   # 3 kOhm over 1 kOhm
    task = Task(net, [Run([], "op"), Run(["alter vin dc = 2.0"], "op")], ["mid", "vin#branch"], SAMPLE,
                {"samples": [["mid", None], ["vin#branch", None]]})
    (res,) = simulate.run_tasks([task], workers=1, progress=False)
    assert res.ok, res.error
    assert res.rows[0]["0:mid"] == pytest.approx(0.25, rel=1e-9)
    assert res.rows[0]["1:mid"] == pytest.approx(0.5, rel=1e-9)
    # the source delivers 1 V / 4 kOhm: its branch current (into its + node) is negative
    assert res.rows[0]["0:vin#branch"] == pytest.approx(-0.25e-3, rel=1e-9)


def _square_law_tasks(vgs_values, kp=200e-6, vto=0.5, w_um=2.0, l_um=1.0):
    tech = SquareLawTechnology(name="square_law", corner="n/a", supply_v=1.8, vto_v=vto, kp_a_per_v2=kp,
                               lambda_per_v=0.0)
    net = "\n".join(["square law", tech.preamble([]), "Vg g 0 dc 0", "Vd d 0 dc 1.8",
                     tech.instance("1", "d", "g", "0", "0", "nmos", w_um, l_um), ".end", ""])
    return [Task(net, [Run([f"alter vg dc = {v}"], "op")], ["vd#branch"], SAMPLE,
                 {"vgs": v, "samples": [["vd#branch", None]]}) for v in vgs_values]


def test_mosfet_saturation_matches_square_law():
    kp, vto, w, l = 200e-6, 0.5, 2.0, 1.0
    vgs = [0.3, 0.7, 0.9, 1.2, 1.5]
    results = simulate.run_tasks(_square_law_tasks(vgs, kp, vto, w, l), workers=1, progress=False)
    for v, res in zip(vgs, results):
        assert res.ok, res.error
        expected = kp / 2 * (w / l) * max(v - vto, 0.0) ** 2
        assert -res.rows[0]["0:vd#branch"] == pytest.approx(expected, rel=1e-6, abs=1e-11)  # gmin (1e-12 S) x 1.8 V when off


def test_process_pool_cache_and_failed_point(tmp_path):
    """Two workers give the serial answers; a bad point is reported, not fatal; a rerun is cached."""
    vgs = [0.6, 0.8, 1.0, 1.4]
    tasks = _square_law_tasks(vgs)
    bad = Task(tasks[0].netlist, [Run(["alter vg dc = 1.0"], "tran 1n 10n 0 1n", stop_time_s=1e-8)],
               ["no_such_vector"], SAMPLE, {"samples": [["no_such_vector", None]]})
    cache = tmp_path / "cache.sqlite"
    results = simulate.run_tasks(tasks + [bad], workers=2, cache_path=cache, progress=False, chunk_size=1)
    assert [r.ok for r in results] == [True] * 4 + [False]
    assert "no_such_vector" in results[-1].error
    serial = simulate.run_tasks(tasks, workers=1, progress=False)
    assert [r.rows for r in results[:4]] == [r.rows for r in serial]
    again = simulate.run_tasks(tasks + [bad], workers=1, cache_path=cache, progress=False)
    assert [r.cached for r in again] == [True] * 4 + [False]
    assert [r.rows for r in again[:4]] == [r.rows for r in serial]


def test_bad_netlist_is_reported_with_ngspice_message():
    task = Task("bad\nR1 a 0 1k\nXq a b nonexistent_subckt\n.end\n", [Run([], "op")], ["a"], SAMPLE,
                {"samples": [["a", None]]})
    (res,) = simulate.run_tasks([task], workers=1, progress=False)
    assert not res.ok
    assert "nonexistent_subckt" in res.error.lower() or "netlist" in res.error.lower()
    # the in-process simulator still works afterwards
    (ok,) = simulate.run_tasks(_square_law_tasks([1.0]), workers=1, progress=False)
    assert ok.ok and -ok.rows[0]["0:vd#branch"] == pytest.approx(200e-6 / 2 * 2 * 0.25, rel=1e-6)
