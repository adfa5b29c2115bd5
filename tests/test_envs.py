"""The conda environment of the workflow (envs/gaincell.yaml, snakemake --use-conda) agrees with
pyproject.toml: every runtime dependency is there, pinned, inside pyproject's range; no retired channel;
no editable install of a relative path (Snakemake copies env files into .snakemake/)."""
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("device", "gpu", "eval")  # what the stages import; workflow/test tools stay outside


def _pyproject_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def _env():
    env = yaml.safe_load((REPO / "envs" / "gaincell.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return env, [Requirement(p) for p in pip]


def test_every_dependency_is_pinned_inside_pyprojects_range():
    _, pins = _env()
    pinned = {canonicalize_name(p.name): p for p in pins}
    needed = _pyproject_requirements()
    assert sorted(set(needed) - set(pinned)) == [], "missing from envs/gaincell.yaml"
    for name, pin in pinned.items():
        specs = list(pin.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{name}: not pinned ({pin})"
        assert name in needed, f"{name}: pinned in the env but not a dependency in pyproject.toml"
        assert needed[name].specifier.contains(Version(specs[0].version), prereleases=True), \
            f"{name}=={specs[0].version} is outside pyproject.toml's {needed[name].specifier}"


def test_channels_and_no_relative_editable_install():
    env, _ = _env()
    assert env["channels"] == ["conda-forge", "nodefaults"]  # no 'defaults', no retired 'pytorch' channel
    text = (REPO / "envs" / "gaincell.yaml").read_text()
    assert "-e " not in text and "pytorch" not in env["channels"]
    # every rule uses this one environment
    rules = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    assert 'ENV = "../../envs/gaincell.yaml"' in rules
