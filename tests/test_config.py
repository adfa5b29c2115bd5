"""The Hydra tree: profiles compose, overrides reach the sections, typos and wrong types fail at once."""
import subprocess
import sys

import pytest

from gaincell.attention.config import PAPER_COEFFICIENTS, analog_config_from_settings
from gaincell.config import RootConfig, compose, to_object


@pytest.mark.parametrize("profile", ["tiny", "paper", "ci"])
def test_profiles_compose_to_the_schema(profile):
    cfg = compose([f"profile={profile}"])
    obj = to_object(cfg)
    assert isinstance(obj, RootConfig)
    assert obj.profile == profile
    assert obj.results_dir == f"results/{profile}"
    assert obj.attention.window % obj.attention.tile_rows == 0


def test_paper_profile_is_the_papers_configuration():
    cfg = to_object(compose(["profile=paper"]))
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert cfg.attention.window == 1024
    assert cfg.train.learning_rate == 6e-4 and cfg.train.weight_decay == 0.1
    assert cfg.attention.coefficients == "paper"


def test_ci_profile_is_smaller_than_tiny():
    tiny, ci = to_object(compose(["profile=tiny"])), to_object(compose(["profile=ci"]))
    assert ci.model.n_layer * ci.model.n_embd < tiny.model.n_layer * tiny.model.n_embd
    assert ci.train.max_iters < tiny.train.max_iters


def test_override_reaches_section():
    cfg = compose(["attention=linear_hw", "attention.window=512"])
    assert cfg.attention.kind == "linear_hw" and cfg.attention.window == 512


def test_misspelt_key_fails_naming_it():
    with pytest.raises(Exception) as err:
        compose(["attention.windw=3"])
    assert "windw" in str(err.value)


def test_wrong_type_fails_naming_key_and_type():
    with pytest.raises(Exception) as err:
        compose(["attention.window=abc"])
    text = str(err.value) + str(getattr(err.value, "__cause__", ""))
    assert "window" in text and "int" in text.lower()


def test_paper_coefficients_resolve_for_nonlinear_only():
    cfg = compose(["attention=nonlinear_hw", "attention.coefficients=paper"])
    assert analog_config_from_settings(cfg.attention).coefficients == PAPER_COEFFICIENTS
    cfg = compose(["attention=linear_hw", "attention.coefficients=paper"])
    assert analog_config_from_settings(cfg.attention).coefficients is None


def test_fitted_coefficients_missing_file_is_a_clear_error(tmp_path):
    cfg = compose(["attention=nonlinear_hw", "attention.coefficients=fitted",
                   f"attention.fitted_coefficients_path={tmp_path}/none.json"])
    with pytest.raises(FileNotFoundError, match="fit stage"):
        analog_config_from_settings(cfg.attention)


def test_cli_unknown_stage_and_print_config():
    run = subprocess.run([sys.executable, "-m", "gaincell", "nosuchstage"], capture_output=True, text=True)
    assert run.returncode != 0 and "unknown stage 'nosuchstage'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "gaincell", "print_config", "profile=ci", "attention.window=128"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "window: 128" in run.stdout and "profile: ci" in run.stdout


def test_stage_extras_are_typed_per_stage():
    from gaincell.config import FiguresStage, GenerateStage, LeakageStage, stage_settings

    s = stage_settings(compose(["+stage.init_from=ckpt", "+stage.finetune_iters=3"]), LeakageStage)
    assert s == LeakageStage(init_from="ckpt", finetune_iters=3, finetune_lr=None)
    g = stage_settings(compose(["+stage.top_k=null", "+stage.prompt=ROMEO:", "+stage.temperature=0.5"]),
                       GenerateStage)
    assert g.top_k is None and g.prompt == "ROMEO:" and g.temperature == 0.5 and g.max_new_tokens == 200
    assert stage_settings(compose(["+stage.only=[a,b]"]), FiguresStage).only == ["a", "b"]
    with pytest.raises(ValueError, match=r"\+stage.finetune_iters: .*'abc'"):
        stage_settings(compose(["+stage.finetune_iters=abc"]), LeakageStage)
    with pytest.raises(ValueError, match=r"\+stage.prompt: not a setting of this stage \(LeakageStage\)"):
        stage_settings(compose(["+stage.prompt=x"]), LeakageStage)


def test_every_attention_knob_is_a_config_key_that_reaches_the_attention():
    """AnalogAttentionConfig's fields are declared once: each is an ``attention.<name>`` key whose value
    reaches the built config (a field added there needs no edit here or in the schema)."""
    import dataclasses

    from gaincell.attention import AnalogAttentionConfig

    changed = []
    for f in dataclasses.fields(AnalogAttentionConfig):
        if f.name == "coefficients":  # a set name resolved to ten numbers: tested above
            continue
        value = (not f.default) if isinstance(f.default, bool) else (f.default * 2 or 3)
        # window 1024 (the dataclass default) leaves room for twice the default tile_rows
        cfg = compose(["attention=linear_hw", "attention.coefficients=paper", "attention.window=1024",
                       f"attention.{f.name}={value}"])
        built = analog_config_from_settings(cfg.attention)
        assert getattr(built, f.name) == value, f.name
        changed.append(f.name)
    assert {"window", "gain", "decay_per_step", "stored_max"} <= set(changed)


def test_training_seed_follows_the_top_level_seed_unless_set():
    # the workflow reruns training when the top-level seed changes; the trainer must then see it
    assert to_object(compose(["profile=ci", "seed=7"])).train.seed == 7
    assert to_object(compose(["profile=ci", "seed=7", "train.seed=5"])).train.seed == 5
    assert to_object(compose(["profile=ci"])).train.seed == to_object(compose(["profile=ci"])).seed
