"""The flattened sky130 devices draw exactly the current of the library's own subcircuits."""
import numpy as np
import pytest

from gaincell.device import simulate
from gaincell.device.simulate import Run, Task
from gaincell.device.technology import make_technology

SAMPLE = "gaincell.device.sweeps:sample"
DEVICES = [("nfet_01v8", 0.42, 0.15), ("nfet_01v8", 0.42, 0.5), ("pfet_01v8", 0.42, 0.15)]


def _currents(netlist, vg_values):
    """Drain currents (k, vg) of the devices, gate drive vg (sign-adjusted for pfets)."""
    names = [f"vd{k}#branch" for k in range(len(DEVICES))]
    tasks = [Task(netlist, [Run([f"alter vgn dc = {v}", f"alter vgp dc = {-v}"], "op")], names, SAMPLE,
                  {"vg": v, "samples": [[n, None] for n in names]}) for v in vg_values]
    results = simulate.run_tasks(tasks, workers=1, progress=False)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return np.array([[r.rows[0][f"0:{n}"] for r in results] for n in names])


def test_flattened_devices_equal_library_subcircuits(sky130_tech):
    tech = sky130_tech
    bias, flat_inst, lib_inst = ["Vgn gn 0 dc 0", "Vgp gp 0 dc 0"], [], []
    for k, (device, w, l) in enumerate(DEVICES):
        p = device.startswith("p")
        bias.append(f"Vd{k} d{k} 0 dc {-0.9 if p else 0.9}")
        gate = "gp" if p else "gn"
        flat_inst.append(tech.instance(str(k), f"d{k}", gate, "0", "0", device, w, l))
        lib_inst.append(tech.subckt_instance(str(k), f"d{k}", gate, "0", "0", device, w, l))
    flat = "\n".join(["flat", tech.preamble(DEVICES)] + bias + flat_inst + [".end", ""])
    lib = "\n".join(["lib", f".lib {tech.lib_path} {tech.corner}"] + bias + lib_inst + [".end", ""])
    assert ".lib" not in flat.split("\n", 2)[1]  # the heavy library is not parsed for flattened devices
    vg = [0.4, 0.7, 0.9, 1.8]
    i_flat, i_lib = _currents(flat, vg), _currents(lib, vg)
    np.testing.assert_allclose(i_flat, i_lib, rtol=1e-9)
    assert np.all(np.diff(np.abs(i_flat), axis=1) > 0)   # more gate drive, more current
    # published sky130 figure (pitfalls note): nfet_01v8 0.42/0.15 gives about 13 uA at Vgs = Vds = 0.9 V
    assert abs(i_flat[0, 2]) == pytest.approx(13e-6, rel=0.1)


def test_corner_and_device_names_are_checked(sky130_tech):
    with pytest.raises(ValueError, match="corner"):
        make_technology({"technology": "sky130", "corner": "typical", "supply_v": 1.8,
                         "model_cache_dir": str(sky130_tech.lib_dir.parents[5])}, download=False)
    with pytest.raises(ValueError, match="read_device='nfet_bogus'"):
        sky130_tech.check_device("nfet_bogus", "read")
