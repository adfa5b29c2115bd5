"""The README's generated results section: replaced between its markers only, never from a partial run."""
import pytest

from gaincell.figures.readme import BEGIN, END, results_section, update_readme


def test_only_the_text_between_the_markers_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{BEGIN}\nnew table\n{END}\noutro\n"


def test_a_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, "x")


def test_a_run_without_results_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks"):
        results_section(tmp_path / "tiny", "tiny")


def test_study_summary_states_resolution_and_seed_shift(tmp_path):
    import json

    from gaincell.figures.readme import study_summary
    (tmp_path / "diagnose").mkdir()
    summary = {"sequences": 512, "worst_claim_se": 0.0107, "target_se": 0.005, "close_difference": 0.1,
               "worst_close_claim_se": 0.0019, "seed_variance": "second-seed replicate",
               "seed_shift": {"3 close to 1": -0.0071}}
    (tmp_path / "diagnose" / "summary.json").write_text(json.dumps(summary))
    text = " ".join(study_summary(tmp_path))
    assert "512 validation sequences" in text and "0.0107" in text and "0.0019" in text
    assert "3 close to 1: -0.0071" in text
