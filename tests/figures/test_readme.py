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
