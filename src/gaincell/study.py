"""The study, defined once: the model variants of paper Table 1 / Fig. 4 and every run that makes them.

The Snakefile generates its training rules from :data:`RUNS`, the CI output check
(`gaincell.workflow_check`) expects their outputs, and the figures label and order the variants from
:data:`VARIANTS`. Adding a run is one :class:`Run` entry (plus, for a variant, one :class:`Variant`).

Kept free of heavy imports (torch, hydra): the Snakefile imports it at parse time. Iteration counts and
learning rates are read from the composed config (the ``workflow`` section) by the small functions below,
so the table says *which* setting each run uses and the profiles say *how much*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

# How a run makes its checkpoint: the trainer (``train`` stage, writes ``final.pt``) or the adaptation of
# equation 9 (``adapt`` stage, writes ``ckpt.pt`` and ``adapt/<run>/summary.json``).
TRAINING = {"train": "final.pt", "adapt": "ckpt.pt", "convert": "final.pt"}
# (convert: ``analog_convert`` stage, the start run's weights on analog weight tiles, rule in analog.smk)
ADAPT_MODES = ("adapt", "map_only", "calibrate")  # adapt: eq. 9; map_only: switch the cell, keep the scalers;
#                                          calibrate: a softmax model's scalers set from data for the hardware
#                                          attention (gaincell.adapt.calibration)

IterFn = Callable[[Any], Optional[int]]   # composed config -> train.max_iters (None: the profile's own)


def _profile_iters(cfg: Any) -> Optional[int]:
    """The profile's ``train.max_iters``; 0 (export without training) when ``model.init`` is a pretrained
    model (paper: the public GPT-2 is the software baseline)."""
    return None if str(cfg.model.init) == "scratch" else 0


def _window_iters(cfg: Any) -> int:
    return int(cfg.workflow.window_iters)


def _linear_iters(cfg: Any) -> int:
    return int(cfg.workflow.linear_iters)


def _linear_early_iters(cfg: Any) -> int:
    return int(cfg.workflow.linear_early_iters)


def _analog_hwa_iters(cfg: Any) -> int:
    return int(cfg.workflow.analog_hwa_iters)


# A second training seed for the key variants (1, 3 and 5): the paired SEs of the table cover the choice of
# validation text only; the seed-2 replicate shows how much a training seed moves the same comparisons.
# The first seed follows the top-level ``seed``; the replicate trains with this ``train.seed``.
SECOND_SEED = 4321
SEED2 = "_seed2"                        # name suffix of the replicate runs


def _finetune_iters(cfg: Any) -> int:
    """Variant 6 fine-tunes for the rest of the linear run's budget (paper: 13,000 - 3,000)."""
    return int(cfg.workflow.linear_iters) - int(cfg.workflow.linear_early_iters)


@dataclass(frozen=True)
class Run:
    """One run of the study: it writes ``checkpoints/<name>/`` (``final.pt`` or ``ckpt.pt``, see TRAINING).

    ``rule`` names the Snakemake rule (default ``train_<name>``; adapt runs share the wildcard rule
    ``adapt``). A run with a ``start`` fine-tunes from that run's checkpoint at
    ``workflow.finetune_learning_rate``; without one it trains from ``model.init``.
    """

    name: str                           # checkpoint folder and W&B run name
    kind: str                           # attention kind: softmax | softmax_window | linear_hw | nonlinear_hw
    training: str = "train"             # train | adapt (key of TRAINING)
    start: Optional[str] = None         # name of the run whose checkpoint this one starts from
    iters: Optional[IterFn] = None      # train: train.max_iters from the config (None: profile's own)
    decay_iters: Optional[IterFn] = None  # train: train.lr_decay_iters (None: same as iters)
    mode: str = "adapt"                 # adapt runs: adapt | map_only (ADAPT_MODES)
    rule: str = ""                      # Snakemake rule name ("" : train_<name>, or adapt)
    overrides: Tuple[str, ...] = ()     # extra Hydra overrides of this run only (e.g. a config group)
    doc: str = ""                       # one line: what the run is (the rule's docstring)

    def __post_init__(self) -> None:
        if self.training not in TRAINING:
            raise ValueError(f"run {self.name!r}: training {self.training!r}, expected one of {sorted(TRAINING)}")
        if self.training == "adapt" and (self.mode not in ADAPT_MODES or self.start is None):
            raise ValueError(f"run {self.name!r}: an adapt run needs a start run and mode in {ADAPT_MODES}")
        if not self.rule:
            object.__setattr__(self, "rule", "adapt" if self.training == "adapt" else f"train_{self.name}")

    @property
    def checkpoint_file(self) -> str:
        """``final.pt`` (trainer) or ``ckpt.pt`` (adaptation)."""
        return TRAINING[self.training]

    def max_iters(self, cfg: Any) -> Optional[int]:
        return self.iters(cfg) if self.iters is not None else None

    def lr_decay_iters(self, cfg: Any) -> Optional[int]:
        """``train.lr_decay_iters``: ``decay_iters``, else ``max_iters`` (nothing when it trains 0 steps)."""
        if self.decay_iters is not None:
            return self.decay_iters(cfg)
        iters = self.max_iters(cfg)
        return iters if iters else None


@dataclass(frozen=True)
class Variant:
    """One model of the study's comparison (paper Table 1 / Fig. 4), evaluated and plotted."""

    number: int                         # the paper's variant number (Table 1 row)
    run: str                            # the Run whose checkpoint is this variant
    label: str                          # legend / table label
    curve_runs: Tuple[str, ...]         # training runs whose metrics.csv make its training curve, in order
    group: str                          # software | linear | nonlinear | analog (colour group)
    noise_seeds: bool = False           # evaluated at several inference-noise seeds (analog projections:
    #                                     mean and spread over seeds; rule analog_val_loss)


RUNS: Tuple[Run, ...] = (
    Run("softmax", "softmax", iters=_profile_iters, rule="pretrain",
        doc="Software baseline, softmax attention (variant 1); paper profile: the public GPT-2, untrained."),
    Run("softmax_window", "softmax_window", start="softmax", iters=_window_iters, rule="train_window",
        doc="Software sliding-window model (variant 2), fine-tuned from the baseline."),
    Run("linear_hw_init", "linear_hw", "adapt", start="softmax", mode="calibrate",
        doc="The baseline on the linear hardware attention, q/k/v scalers calibrated from data into the DAC "
            "ranges, output scalers matched to the softmax outputs (no training): start of the linear runs."),
    Run("linear_hw", "linear_hw", start="linear_hw_init", iters=_linear_iters, rule="train_linear",
        doc="Linear intermediate hardware model (variant 3), fine-tuned from the calibrated baseline."),
    Run("linear_hw_early", "linear_hw", start="linear_hw_init", iters=_linear_early_iters, decay_iters=_linear_iters,
        rule="train_linear_early",
        doc="The linear run stopped early (paper: 3,000 of 13,000 iterations, same schedule) for variant 6."),
    Run("nonlinear_mapped", "nonlinear_hw", "adapt", start="linear_hw", mode="map_only",
        doc="Variant 4: the linear model on the nonlinear cell, scalers kept (no adaptation)."),
    Run("nonlinear_adapted", "nonlinear_hw", "adapt", start="linear_hw",
        doc="Variant 5: equation 9 adaptation onto the nonlinear cell, no fine-tuning."),
    Run("nonlinear_adapted_early", "nonlinear_hw", "adapt", start="linear_hw_early",
        doc="The early linear model adapted by equation 9: the start of variant 6."),
    Run("nonlinear_finetuned", "nonlinear_hw", start="nonlinear_adapted_early", iters=_finetune_iters,
        rule="finetune",
        doc="Variant 6: the adapted early linear model fine-tuned as a nonlinear model (surrogate gradient)."),
    # Beyond the paper: every block projection on analog weight tiles as well (gaincell.analog_projections)
    Run("fully_analog", "nonlinear_hw", "convert", start="nonlinear_finetuned", rule="analog_convert",
        overrides=("projections=analog",),
        doc="Variant 6 with its projections on analog weight tiles, input ranges calibrated, no training."),
    Run("fully_analog_hwa", "nonlinear_hw", start="fully_analog", iters=_analog_hwa_iters,
        overrides=("projections=analog",),
        doc="The fully analog model after hardware-aware training (weight and output noise injected)."),
    Run("softmax_long", "softmax", start="softmax", iters=_linear_iters,
        doc="Fair software baseline: the baseline trained on for as many iterations as the linear hardware "
            "chain (same learning rate and schedule as variant 3)."),
    Run("linear_hw_uncalibrated", "linear_hw", start="softmax", iters=_linear_iters,
        doc="Ablation: variant 3 trained without scaler calibration (initial scalers a = 1, b = 0 / 0.45)."),
) + (
    Run("softmax" + SEED2, "softmax", iters=_profile_iters, overrides=(f"train.seed={SECOND_SEED}",),
        doc="Variant 1 with a second training seed (train.seed=SECOND_SEED)."),
    Run("linear_hw_init" + SEED2, "linear_hw", "adapt", start="softmax" + SEED2, mode="calibrate",
        doc="Calibration of the seed-2 baseline for the linear hardware attention (as linear_hw_init)."),
    Run("linear_hw" + SEED2, "linear_hw", start="linear_hw_init" + SEED2, iters=_linear_iters,
        overrides=(f"train.seed={SECOND_SEED}",),
        doc="Variant 3 with a second training seed, from the seed-2 baseline."),
    Run("nonlinear_adapted" + SEED2, "nonlinear_hw", "adapt", start="linear_hw" + SEED2,
        doc="Variant 5 of the seed-2 chain: equation 9 adaptation of the seed-2 linear model."),
) + tuple(
    Run(f"nonlinear_{mode_name}_{cell}", "nonlinear_hw", "adapt", start="linear_hw", mode=mode,
        overrides=(f"cell={cell}",),
        doc=f"Nonlinearity study: variant 3 on the '{cell}' cell, {what}.")
    for cell in ("fitted", "paper", "strong_cubic")
    for mode_name, mode, what in (("mapped", "map_only", "scalers kept (no adaptation)"),
                                  ("adapted", "adapt", "adapted by equation 9"))
)

VARIANTS: Tuple[Variant, ...] = (
    Variant(1, "softmax", "software baseline (softmax)", ("softmax",), "software"),
    Variant(2, "softmax_window", "software sliding window", ("softmax_window",), "software"),
    Variant(3, "linear_hw", "linear hardware model", ("linear_hw",), "linear"),
    Variant(4, "nonlinear_mapped", "nonlinear HW, mapped without adaptation", (), "nonlinear"),
    Variant(5, "nonlinear_adapted", "nonlinear HW, adapted (no fine-tuning)", (), "nonlinear"),
    Variant(6, "nonlinear_finetuned", "nonlinear HW, adapted early + fine-tuned",
            ("linear_hw_early", "nonlinear_finetuned"), "nonlinear"),
    Variant(7, "fully_analog", "6 + analog projections (converted)", (), "analog", noise_seeds=True),
    Variant(8, "fully_analog_hwa", "6 + analog projections, HW-aware trained", ("fully_analog_hwa",), "analog",
            noise_seeds=True),
)

# ----------------------------------------------------------------------------------------------------------
# The study table (stage diagnose): every variant plus the fair baseline, the calibration ablation and the
# other cells, each evaluated on the same fixed validation sequences; the paper's claims tested on them.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row of the study table: a run's checkpoint, with a label and what it is for."""

    run: str
    label: str
    role: str                           # variant | fair baseline | ablation | cell
    cell: str = ""                      # coefficient set of a nonlinear row ("": the profile's own)


@dataclass(frozen=True)
class Claim:
    """A comparison the paper makes. ``ordering``: ``worse`` has the higher loss than ``better``, resolved
    when the paired difference exceeds 2 standard errors. ``equivalence``: the two agree within
    ``diagnose.equivalence_margin`` nats/token, shown when the 2-SE interval lies inside the margin."""

    name: str
    worse: str                          # ordering: the run expected worse; equivalence: the first run
    better: str                         # ordering: the run expected better; equivalence: the second run
    kind: str = "ordering"              # ordering | equivalence


# Cells besides the profile's own (config/cell/), mapped and adapted, not fine-tuned. ``fitted`` is our cell read
# against the mid-supply reference (its offset silences the attention); the tiny profile's own cell is
# ``fitted_trimmed``, the same cell with the reference trimmed to the zero-weight current.
CELLS = ("fitted", "paper", "strong_cubic")

TABLE_ROWS: Tuple[Row, ...] = tuple(Row(v.run, f"{v.number}. {v.label}", "variant") for v in VARIANTS
                                    if not v.noise_seeds) + (
    Row("softmax_long", "1'. software baseline, as many iterations as 3", "fair baseline"),
    Row("linear_hw_uncalibrated", "3'. linear HW without scaler calibration", "ablation"),
    Row("linear_hw_init", "3 at iteration 0: calibrated, untrained", "ablation"),
) + tuple(Row(f"nonlinear_{m}_{cell}", f"{n}. {what}, cell '{cell}'", "cell", cell)
          for cell in CELLS for m, n, what in (("mapped", 4, "mapped"), ("adapted", 5, "adapted"))) + tuple(
    Row(v.run + SEED2, f"{v.number}. {v.label}, training seed 2", "seed 2")
    for v in VARIANTS if v.number in (1, 3, 5))

CLAIMS: Tuple[Claim, ...] = (
    Claim("4 worse than 5", "nonlinear_mapped", "nonlinear_adapted"),
    Claim("5 worse than 3", "nonlinear_adapted", "linear_hw"),
    Claim("6 better than 5", "nonlinear_adapted", "nonlinear_finetuned"),
    Claim("3 close to 1", "linear_hw", "softmax", "equivalence"),
    Claim("3 close to 1 at equal iterations", "linear_hw", "softmax_long", "equivalence"),
) + tuple(claim for cell in CELLS for claim in (
    Claim(f"4 worse than 5, cell '{cell}'", f"nonlinear_mapped_{cell}", f"nonlinear_adapted_{cell}"),
    Claim(f"5 worse than 3, cell '{cell}'", f"nonlinear_adapted_{cell}", "linear_hw"))) + (
    Claim("5 worse than 3, seed 2", "nonlinear_adapted" + SEED2, "linear_hw" + SEED2),
    Claim("3 close to 1, seed 2", "linear_hw" + SEED2, "softmax" + SEED2, "equivalence"),
)


def in_use(run: str, second_seed: bool) -> bool:
    """Whether a run is made: the second-seed replicate (``*_seed2``) only with ``workflow.second_seed``."""
    return second_seed or not run.endswith(SEED2)


def table_rows(second_seed: bool) -> Tuple[Row, ...]:
    """The study-table rows whose runs are made (:func:`in_use`)."""
    return tuple(r for r in TABLE_ROWS if in_use(r.run, second_seed))


def claims(second_seed: bool) -> Tuple[Claim, ...]:
    """The claims whose two runs are made (:func:`in_use`)."""
    return tuple(c for c in CLAIMS if in_use(c.worse, second_seed) and in_use(c.better, second_seed))


def own_iters(run: str, cfg: Any) -> int:
    """Optimizer steps of this run alone (an adaptation or calibration: 0)."""
    r = RUNS_BY_NAME[run]
    if r.training != "train":  # adapt, calibrate, convert: no optimizer steps
        return 0
    iters = r.max_iters(cfg)
    return int(cfg.train.max_iters) if iters is None else int(iters)


def chain_iters(run: str, cfg: Any) -> int:
    """Optimizer steps behind a run's checkpoint: its own plus those of every run it starts from
    (paper profile: the public GPT-2's own pretraining is not counted)."""
    r = RUNS_BY_NAME[run]
    return own_iters(run, cfg) + (chain_iters(r.start, cfg) if r.start else 0)


def tokens_per_iter(cfg: Any) -> int:
    """Training tokens per optimizer step: batch x gradient accumulation x context (every run alike)."""
    return int(cfg.train.batch_size) * int(cfg.train.grad_accum) * int(cfg.model.block_size)


SAMPLE_RUN = "nonlinear_finetuned"      # the model whose generated text sample the pipeline keeps
LEAKAGE_RUN = "linear_hw"               # the trained hardware model of the leakage sweep (Supp. Fig. 6)

RUNS_BY_NAME: Dict[str, Run] = {r.name: r for r in RUNS}
VARIANT_RUNS: Tuple[str, ...] = tuple(v.run for v in VARIANTS)


def runs(training: Optional[str] = None) -> Tuple[Run, ...]:
    """The study's runs, optionally only those of one training kind (``train`` or ``adapt``)."""
    return tuple(r for r in RUNS if training is None or r.training == training)


def chain_length(run: str) -> int:
    """Runs in the longest chain that starts at ``run`` and follows the runs starting from it (itself
    included): how much of the study waits for it (the workflow's scheduling priority)."""
    children = [r.name for r in RUNS if r.start == run]
    return 1 + max((chain_length(c) for c in children), default=0)


def checkpoint(run: str) -> str:
    """Checkpoint path of a run relative to the results folder: ``checkpoints/<run>/<final.pt|ckpt.pt>``."""
    try:
        return f"checkpoints/{run}/{RUNS_BY_NAME[run].checkpoint_file}"
    except KeyError:
        raise KeyError(f"unknown run {run!r}: expected one of {', '.join(RUNS_BY_NAME)}") from None


def _validate() -> None:
    names = [r.name for r in RUNS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"study runs defined twice: {duplicates}")
    train_rules = [r.rule for r in runs("train")]
    if len(set(train_rules)) != len(train_rules):
        raise ValueError(f"two training runs share a rule name: {train_rules}")
    for r in RUNS:
        if r.start is not None and r.start not in RUNS_BY_NAME:
            raise ValueError(f"run {r.name!r} starts from unknown run {r.start!r}")
    for v in VARIANTS:
        unknown = [n for n in (v.run, *v.curve_runs) if n not in RUNS_BY_NAME]
        if unknown:
            raise ValueError(f"variant {v.number} names unknown runs {unknown}")
    rows = [row.run for row in TABLE_ROWS]
    unknown = [n for n in rows if n not in RUNS_BY_NAME] + [n for c in CLAIMS for n in (c.worse, c.better)
                                                           if n not in rows]
    if unknown or len(set(rows)) != len(rows):
        raise ValueError(f"study table rows or claims name unknown or repeated runs: {unknown or rows}")


_validate()
