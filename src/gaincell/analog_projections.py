"""Linear projections on analog weight tiles (IBM aihwkit-lightning), beside gain-cell attention.

The paper keeps every projection digital. Here the configured ``nn.Linear`` layers of each block
(``attn.c_attn`` = QKV, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) become aihwkit-lightning
``AnalogLinear`` layers (converted with its ``convert_to_analog``; the token embedding and the LM head,
tied to it, stay digital). Their forward pass carries the tile's non-idealities that the library
simulates in training *and* evaluation: 8-bit input (DAC) and output (ADC) quantization with learned
input ranges and a bounded output range, per-channel weight clipping, tiles of ``max_input_size`` rows.
In training mode the library also injects weight noise and output noise (hardware-aware training).

The library has no inference-time noise model, so :func:`apply_inference_noise` defines one, drawn per
seed when a model is loaded for evaluation:

* programming noise: each weight ``W_ij += sigma_prog * max_j |W_ij| * N(0, 1)``, per output column
  ``i``, fixed for the life of the programmed model (``InferenceNoiseConfig.programming_noise``);
* output noise: Gaussian noise on every tile read-out before the ADC, drawn anew on every forward,
  ``sigma_out * input_range * max|W|`` (the library's own training-time output-noise path and units,
  ``InferenceNoiseConfig.output_noise``), from a per-layer random stream seeded by the seed.

Each value's literature source is in the field's comment. Nothing here imports the trainer: the model
(:mod:`gaincell.model`) converts itself from ``GPTConfig.projections``, so checkpoints of analog models
rebuild their analog layers from the stored config wherever they are loaded.

aihwkit-lightning is imported inside the functions that need it: its import probes for Triton and
prints a line on CPU machines, which every digital run would otherwise pay for.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

KINDS = ("digital", "analog")
# Linear layers of a transformer block that may become analog (names inside ``transformer.h[i]``).
PROJECTION_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CLIP_TYPES = ("none", "gaussian_per_channel", "gaussian")

# Sources quoted by the fields below.
AFM = ("Analog Foundation Models (Buechel et al., NeurIPS 2025, arXiv:2505.09663), training config of "
       "github.com/IBM/analog-foundation-models data/training_files/meta-llama/Llama-3.2-1B-Instruct/config.yaml")
AFM_NOISE = ("Analog Foundation Models (Buechel et al., NeurIPS 2025), evaluation noise of "
             "github.com/IBM/analog-foundation-models apply_noise_model.py: additive Gaussian, "
             "additive_std_multiplier=0.05 (5% of the per-column abs-max)")
RASCH = ("Rasch et al., Nat. Commun. 14, 5282 (2023), the standard AIMC evaluation setting "
         "(aihwkit StandardHWATrainingPreset: forward.out_noise=0.04)")
HERMES = ("Le Gallo et al., Nat. Electron. 6, 680 (2023): 64 cores of 256 x 256 PCM cells (IBM HERMES, 14 nm)")


@dataclass
class InferenceNoiseConfig:
    """The evaluation-time noise of analog tiles (not simulated by aihwkit-lightning), drawn per seed."""

    programming_noise: float = 0.05     # weight std / max|W| of its output column; AFM_NOISE (the AFM
    #                                     paper's additive evaluation noise; per column as there)
    output_noise: float = 0.04          # read-out std in units of input_range x max|W| of the tile (the
    #                                     library's output-noise units); RASCH (forward.out_noise=0.04)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # one programmed chip per seed

    def __post_init__(self) -> None:
        for name in ("programming_noise", "output_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"inference noise {name}={value!r}: expected a number >= 0")
        seeds = list(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"inference noise seeds={seeds!r}: expected a non-empty list of integers >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"inference noise seeds={seeds!r}: a seed is repeated")


@dataclass
class AnalogProjectionConfig:
    """Which projections are analog and how their tiles behave (aihwkit-lightning's RPU settings).

    ``kind=digital`` (the default) leaves the model exactly as it is. Every RPU value names its source.
    """

    kind: str = "digital"               # digital | analog
    layers: List[str] = field(default_factory=lambda: list(PROJECTION_LAYERS))  # per block, of PROJECTION_LAYERS
    # ---- tiles and converters (forward pass, training and evaluation) ----
    max_input_size: int = 256           # rows (inputs) per tile; longer inputs are split over tiles whose
    #                                     partial sums add digitally; HERMES (256 x 256 cores)
    inp_res: int = 254                  # DAC levels of the input (8 bit: 2**8 - 2); AFM forward_inp_res
    out_res: int = 254                  # ADC levels of each tile output (8 bit); AFM forward_out_res
    out_bound: float = 14.0             # ADC range in units of input_range x max|W|; AFM forward_out_bound
    # ---- weight clipping (the conductance range of a column) ----
    clip: str = "gaussian_per_channel"  # none | gaussian_per_channel | gaussian; AFM clip_type gaussian_channel
    clip_sigma: float = 2.5             # clip at this many std of the column's weights; AFM clip_sigma
    # ---- input ranges (static, learned) ----
    input_range_init_batches: int = 4   # batches whose input std sets each tile's input range (calibration,
    #                                     the library's init_from_data; AFM: 500 batches of a far larger run)
    input_range_init_std: float = 18.0  # input range = this x input std; AFM input_range_init_std_alpha
    input_range_decay: float = 0.01     # shrink pressure while < 5 % of inputs clip; AFM input_range_decay
    input_range_min_unclipped: float = 0.95  # AFM input_range_input_min_percentage
    learn_input_range: bool = True      # input ranges are trained (AFM input_range_learn_input_range)
    # ---- hardware-aware training (noise injection, training mode only) ----
    train_weight_noise: float = 0.03    # weight-noise std / max|W| per column, fresh each forward;
    #                                     AFM modifier_std_dev (add_gauss_channel)
    train_output_noise: float = 0.04    # output-noise std (library units), train as evaluated: RASCH
    #                                     (AFM's Llama config uses 0.0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projections.kind={self.kind!r}: expected one of {KINDS}")
        layers = list(self.layers)
        unknown = [name for name in layers if name not in PROJECTION_LAYERS]
        if unknown or len(set(layers)) != len(layers):
            raise ValueError(f"projections.layers={layers!r}: expected distinct names from {PROJECTION_LAYERS}")
        if self.clip not in CLIP_TYPES:
            raise ValueError(f"projections.clip={self.clip!r}: expected one of {CLIP_TYPES}")
        for name in ("max_input_size", "inp_res", "out_res"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"projections.{name}={value!r}: expected an integer (<= 0: off / unlimited)")
        for name in ("out_bound", "clip_sigma", "input_range_init_std", "input_range_decay",
                     "train_weight_noise", "train_output_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"projections.{name}={value!r}: expected a number >= 0")
        if self.out_res > 0 and self.out_bound <= 0:
            raise ValueError(f"projections.out_res={self.out_res} needs an ADC range: out_bound > 0")
        if self.clip != "none" and self.clip_sigma <= 0:
            raise ValueError(f"projections.clip={self.clip!r} needs clip_sigma > 0, got {self.clip_sigma}")
        if not isinstance(self.input_range_init_batches, int) or self.input_range_init_batches < 1:
            raise ValueError(f"projections.input_range_init_batches={self.input_range_init_batches!r}: "
                             f"expected a positive integer")
        if not 0 < self.input_range_min_unclipped <= 1:
            raise ValueError(f"projections.input_range_min_unclipped={self.input_range_min_unclipped!r}: "
                             f"expected a fraction in (0, 1]")

    @property
    def analog(self) -> bool:
        return self.kind == "analog"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def projection_config_from_dict(d: Any) -> AnalogProjectionConfig:
    """AnalogProjectionConfig from a dict (a checkpoint's ``model_config``, a Hydra section); unknown keys
    are an error naming them. Keys of the Hydra section that are not model settings (``inference``) are
    left out."""
    if isinstance(d, AnalogProjectionConfig):
        return d
    if hasattr(d, "items") and not isinstance(d, dict):  # an OmegaConf node
        from omegaconf import OmegaConf  # noqa: PLC0415 (absent on the GPU machine, benchmarks/gpu_check.sh)

        d = OmegaConf.to_container(d, resolve=True)
    if not isinstance(d, dict):
        raise ValueError(f"projections config {d!r}: expected a mapping")
    d = {k: v for k, v in d.items() if k != "inference"}
    known = {f.name for f in dataclasses.fields(AnalogProjectionConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"projections config has unknown keys {unknown}; expected a subset of {sorted(known)}")
    return AnalogProjectionConfig(**d)


def inference_noise_from_settings(section: Any) -> InferenceNoiseConfig:
    """InferenceNoiseConfig from the Hydra ``projections`` section's ``inference`` node."""
    node = section["inference"] if hasattr(section, "__getitem__") else section.inference
    return InferenceNoiseConfig(programming_noise=float(node["programming_noise"]),
                                output_noise=float(node["output_noise"]),
                                seeds=[int(s) for s in node["seeds"]])


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def _lightning():
    """The aihwkit-lightning names used here (imported on first use; see the module docstring)."""
    with contextlib.redirect_stdout(io.StringIO()):  # "Could not import triton_utils ..." on CPU
        from aihwkit_lightning.nn import AnalogLinear
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.simulator.configs import (
            TorchInferenceRPUConfig,
            WeightClipType,
            WeightNoiseInjectionType,
        )
    return AnalogLinear, convert_to_analog, TorchInferenceRPUConfig, WeightClipType, WeightNoiseInjectionType


def rpu_config(cfg: AnalogProjectionConfig):
    """The ``TorchInferenceRPUConfig`` of the analog tiles."""
    _, _, TorchInferenceRPUConfig, WeightClipType, WeightNoiseInjectionType = _lightning()
    rpu = TorchInferenceRPUConfig()
    rpu.mapping.max_input_size = int(cfg.max_input_size)
    rpu.forward.inp_res = int(cfg.inp_res)
    rpu.forward.out_res = int(cfg.out_res)
    rpu.forward.out_bound = float(cfg.out_bound)
    rpu.forward.out_noise = float(cfg.train_output_noise)
    rpu.forward.out_noise_per_channel = False
    rpu.clip.type = {"none": WeightClipType.NONE, "gaussian": WeightClipType.LAYER_GAUSSIAN,
                     "gaussian_per_channel": WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL}[cfg.clip]
    rpu.clip.sigma = float(cfg.clip_sigma)
    rpu.modifier.std_dev = float(cfg.train_weight_noise)
    rpu.modifier.noise_type = (WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL if cfg.train_weight_noise > 0
                               else WeightNoiseInjectionType.NONE)
    ir = rpu.pre_post.input_range
    ir.enable = True  # static input ranges: the DAC's range, which input and output quantization need
    ir.learn_input_range = bool(cfg.learn_input_range)
    ir.init_from_data = int(cfg.input_range_init_batches)
    ir.init_std_alpha = float(cfg.input_range_init_std)
    ir.decay = float(cfg.input_range_decay)
    ir.input_min_percentage = float(cfg.input_range_min_unclipped)
    return rpu


def analog_layer_names(model: nn.Module, cfg: AnalogProjectionConfig) -> List[str]:
    """Full module names of the layers ``cfg`` makes analog (``transformer.h.<i>.<layer>``)."""
    blocks = model.transformer.h  # type: ignore[union-attr]
    return [f"transformer.h.{i}.{layer}" for i in range(len(blocks)) for layer in cfg.layers]


def analog_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every AnalogLinear in the model; empty for a digital model (no library import)."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "AnalogLinear"]
    if found:
        AnalogLinear = _lightning()[0]
        found = [(n, m) for n, m in found if isinstance(m, AnalogLinear)]
    return found


def _clip_before_forward(layer: nn.Module, args: Any) -> None:
    """Clip the weights to their column's conductance range once per optimizer step.

    The library clips after each optimizer step (its AnalogOptimizer wraps the optimizer); here the
    first training forward after a weight update clips instead, which gives the same weights to every
    forward without wrapping the trainer's optimizer. Clipping is not idempotent (the clip level is a
    multiple of the clipped weights' own std), so it runs only when the weights changed since the last
    clip (their version counter; ``.data`` writes do not bump it), only in training with gradients on
    (not in the no-grad input-range calibration or in evaluation). The weights of a stored model are
    clipped once more when it is programmed for evaluation (:func:`apply_inference_noise`): the clip
    that follows the last optimizer step.
    """
    if not (layer.training and torch.is_grad_enabled()):
        return
    version = layer.weight._version
    if getattr(layer, "_gaincell_clipped_version", None) == version:
        return
    with torch.no_grad():
        layer.clip_weights()
    layer._gaincell_clipped_version = version


def convert_projections(model: nn.Module, cfg: AnalogProjectionConfig) -> nn.Module:
    """Make the configured projections of ``model`` analog, in place (``kind=digital``: nothing happens).

    Uses aihwkit-lightning's ``convert_to_analog`` with ``ensure_analog_root=False`` and every other
    ``nn.Linear`` (the LM head included, which stays tied to the token embedding) excluded.
    """
    if not cfg.analog:
        return model
    AnalogLinear, convert_to_analog, *_ = _lightning()
    wanted = set(analog_layer_names(model, cfg))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(wanted - linears - {n for n, _ in analog_layers(model)})
    if missing:
        raise ValueError(f"projections: the model has no linear layers {missing[:4]}")
    tied = model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]
    convert_to_analog(model, rpu_config(cfg), conversion_map={nn.Linear: AnalogLinear},
                      ensure_analog_root=False, exclude_modules=sorted(linears - wanted), inplace=True)
    if tied and model.lm_head.weight is not model.transformer.wte.weight:  # type: ignore[union-attr]
        raise RuntimeError("converting the projections untied the LM head from the token embedding")
    for _, layer in analog_layers(model):
        layer.register_forward_pre_hook(_clip_before_forward)
    return model


def set_projections(model: nn.Module, cfg: AnalogProjectionConfig) -> nn.Module:
    """Bring a GPT's projections to ``cfg`` (e.g. the trainer's ``projections`` section): a digital model
    is converted; an analog model must already hold exactly ``cfg`` (its layers were built from its stored
    config, and its input ranges and weights belong to those settings). Returns the model."""
    current = projection_config_from_dict(model.config.projections)  # type: ignore[union-attr]
    if current == cfg:
        return model
    if current.analog:
        diff = [k for k, v in cfg.to_dict().items() if current.to_dict()[k] != v]
        raise ValueError(f"the model's projections are analog with other settings ({', '.join(diff)} differ "
                         f"from the requested projections): start from a digital checkpoint or pass the "
                         f"checkpoint's projection settings")
    convert_projections(model, cfg)
    model.config.projections = cfg  # type: ignore[union-attr]
    return model


# --------------------------------------------------------------------------------------------------
# input-range calibration (the library's data initialisation, without training)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_input_ranges(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Set every analog tile's input range from data, as the library does in the first
    ``init_from_data`` training batches (range = ``init_std_alpha`` x input std, averaged over batches),
    with noise injection off and no weight update. ``inputs``: token batches (B, T); their number must be
    the tiles' ``init_from_data`` (``input_range_init_batches``). Returns the number of layers calibrated.

    After it, each layer's update counter equals ``init_from_data``, so hardware-aware training continues
    from these ranges (learning them by gradient) instead of initialising them again.
    """
    layers = [layer for _, layer in analog_layers(model)]
    if not layers:
        raise ValueError("calibrate_input_ranges: the model has no analog layers")
    *_, WeightNoiseInjectionType = _lightning()
    expected = {int(layer.rpu_config.pre_post.input_range.init_from_data) for layer in layers}
    if expected != {len(inputs)}:
        raise ValueError(f"calibrate_input_ranges: {len(inputs)} batches given, the tiles initialise their "
                         f"input ranges from {sorted(expected)} (projections.input_range_init_batches)")
    was_training = model.training
    saved = [layer.rpu_config for layer in layers]
    model.eval()
    try:
        for layer in layers:
            quiet = copy.deepcopy(layer.rpu_config)
            quiet.forward.out_noise = 0.0
            quiet.modifier.noise_type = WeightNoiseInjectionType.NONE
            layer.rpu_config = quiet
            layer.input_range_update_idx.zero_()
            layer.train()  # the library updates input ranges from data in training mode only
        for idx in inputs:
            model(idx.to(layers[0].weight.device))
    finally:
        for layer, rpu in zip(layers, saved):
            layer.rpu_config = rpu
        model.train(was_training)
    return len(layers)


# --------------------------------------------------------------------------------------------------
# inference noise (per seed)
# --------------------------------------------------------------------------------------------------
def _stream_seed(seed: int, layer_index: int) -> int:
    """Independent seed of one layer's noise stream for one evaluation seed."""
    return int(np.random.SeedSequence([int(seed), int(layer_index)]).generate_state(1)[0])


class _NoisyReadout:
    """Output noise of one layer under inference noise: runs the library's training-mode output-noise
    path (noise added to each tile's read-out before the ADC) for this one forward, from the layer's own
    random stream, with weight-noise injection and input-range updates off (see ``apply_inference_noise``)."""

    def __init__(self, layer: nn.Module, seed: int) -> None:
        self.device = layer.weight.device  # apply the noise after moving the model to its device
        self.cuda = self.device.type == "cuda"
        self.state = torch.Generator(device=self.device).manual_seed(seed).get_state()
        self.outer: Optional[torch.Tensor] = None

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def before(self, layer: nn.Module, args: Any) -> None:
        self.outer = self._get()
        self._set(self.state)
        layer.training = True

    def after(self, layer: nn.Module, args: Any, output: Any) -> None:
        layer.training = False
        self.state = self._get()
        if self.outer is not None:
            self._set(self.outer)
            self.outer = None


@torch.no_grad()
def apply_inference_noise(model: nn.Module, noise: InferenceNoiseConfig, seed: int) -> int:
    """Program the model's analog tiles for one evaluation seed, in place; returns the layers touched.

    1. Weights are clipped to their column's range (as in training), then programming noise
       ``programming_noise x max|W|`` per output column is added once (a fixed chip for this seed).
    2. Every later forward adds read-out noise ``output_noise`` (library units) before the ADC, from a
       per-layer stream seeded by ``seed``: the same seed repeats the same noise on the same inputs.

    The model is meant for evaluation afterwards (its weights now hold the programmed values); training
    it would train the noisy weights.
    """
    layers = analog_layers(model)
    if not layers:
        raise ValueError("apply_inference_noise: the model has no analog layers (projections=digital)")
    *_, WeightClipType, WeightNoiseInjectionType = _lightning()
    for index, (name, layer) in enumerate(layers):
        if getattr(layer, "_gaincell_inference_noise", None) is not None:
            raise RuntimeError(f"apply_inference_noise: {name} is already programmed with noise (seed "
                               f"{layer._gaincell_inference_noise}); load the checkpoint again for another seed")
        layer.clip_weights()
        generator = torch.Generator(device="cpu").manual_seed(_stream_seed(seed, 2 * index))
        w = layer.weight
        if noise.programming_noise > 0:
            column_max = w.abs().amax(dim=1, keepdim=True)
            draw = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
            w.add_(draw * (noise.programming_noise * column_max))
        rpu = copy.deepcopy(layer.rpu_config)
        rpu.clip.type = WeightClipType.NONE  # programmed: clipping again would clip the noise
        rpu.modifier.noise_type = WeightNoiseInjectionType.NONE
        rpu.pre_post.input_range.init_from_data = 0  # no input-range updates in the noisy forward
        rpu.forward.out_noise = float(noise.output_noise)
        layer.rpu_config = rpu
        if noise.output_noise > 0:
            readout = _NoisyReadout(layer, _stream_seed(seed, 2 * index + 1))
            layer.register_forward_pre_hook(readout.before)
            layer.register_forward_hook(readout.after, always_call=True)
        layer._gaincell_inference_noise = int(seed)
    return len(layers)


def describe_noise(cfg: AnalogProjectionConfig, noise: InferenceNoiseConfig) -> Dict[str, Any]:
    """The analog settings and the inference noise with their sources (written next to results)."""
    return {"projections": cfg.to_dict(), "inference_noise": dataclasses.asdict(noise),
            "sources": {"rpu": AFM, "programming_noise": AFM_NOISE, "output_noise": RASCH, "tiles": HERMES}}


def parameters_by_kind(model: nn.Module) -> Dict[str, int]:
    """Weights on analog tiles and digital weights (the tied embedding / LM head counted once)."""
    analog = sum(layer.weight.numel() for _, layer in analog_layers(model))
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    return {"analog_weights": int(analog), "digital_weights": int(total - analog)}


__all__ = ["AnalogProjectionConfig", "InferenceNoiseConfig", "PROJECTION_LAYERS", "KINDS",
           "projection_config_from_dict", "inference_noise_from_settings", "rpu_config", "convert_projections",
           "set_projections",
           "analog_layers", "analog_layer_names", "calibrate_input_ranges", "apply_inference_noise",
           "describe_noise", "parameters_by_kind"]
