"""The figure runner: failures are reported (and strict mode raises), optional figures are skipped,
and a partial remake keeps the index entries of the other figures."""
import json

import pytest

import gaincell.figures as figures


def _fake_functions(tmp_path):
    def fig_ok(results_dir, out_dir):
        """An ok figure.

        More text."""
        path = out_dir / "ok.png"
        path.write_bytes(b"png")
        return [path]

    def fig_broken(results_dir, out_dir):
        """A broken figure."""
        raise FileNotFoundError("results/x.csv")

    def fig_optional(results_dir, out_dir):
        """Needs benchmark results."""
        return []

    return {"ok": ("m", fig_ok), "broken": ("m", fig_broken), "optional": ("m", fig_optional)}


def test_failures_skips_and_partial_remake(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "figure_functions", lambda: _fake_functions(tmp_path))
    out = tmp_path / "figures"
    with pytest.raises(RuntimeError, match="broken: FileNotFoundError"):
        figures.make_all(tmp_path, out, strict=True)
    index = json.loads((out / "index.json").read_text())
    assert list(index["made"]) == ["ok"] and index["made"]["ok"]["caption"] == "An ok figure."
    assert "broken" in index["failed"] and index["skipped"] == ["optional"]
    assert "## ok" in (out / "captions.md").read_text()
    # remaking one figure leaves the others' entries in place
    figures.make_all(tmp_path, out, strict=False, only=["ok"])
    index = json.loads((out / "index.json").read_text())
    assert list(index["made"]) == ["ok"] and "broken" in index["failed"] and index["skipped"] == ["optional"]


def test_every_figure_module_imports_and_has_documented_figures():
    found = figures.figure_functions()
    for required in ["device_characteristic", "device_retention", "device_array", "training_curves", "study",
                     "adapt_statistics", "leakage", "eval_tasks", "hardware_breakdown", "hardware_gpu_comparison"]:
        assert required in found, required
    assert all(figures.caption_of(func) for _, func in found.values())


def test_figures_made_side_by_side_give_the_same_index(tmp_path):
    """workers=2 (a process pool, as the workflow runs it) reports every figure as the sequential run does."""
    results = tmp_path / "results"
    (results / "fit").mkdir(parents=True)
    (results / "fit" / "coefficients.json").write_text("{not json")  # a figure that fails, in both modes
    one = figures.make_all(results, tmp_path / "one", strict=False, workers=1)
    two = figures.make_all(results, tmp_path / "two", strict=False, workers=2)
    assert list(two["made"]) == list(one["made"]) and two["skipped"] == one["skipped"]
    assert sorted(two["failed"]) == sorted(one["failed"])
    assert len(one["made"]) + len(one["skipped"]) + len(one["failed"]) == len(figures.figure_functions())
