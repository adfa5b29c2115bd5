"""The trainer of every training stage (after nanoGPT's train.py): the ``train`` stage.

    python -m gaincell train attention=softmax +stage.name=softmax                       # pretrain
    python -m gaincell train attention=linear_hw +stage.name=linear_hw \\
        +stage.init_from=results/tiny/checkpoints/softmax/final.pt train.max_iters=150    # fine-tune
    torchrun --nproc_per_node=2 -m gaincell train ...                                   # DDP

Init source: ``+stage.init_from`` if given, else ``model.init``: ``scratch``, a Hugging Face GPT-2 (hub
name or ``save_pretrained`` folder) or a checkpoint file (weights only; the attention is switched to
``attention.kind``). Run name: ``+stage.name`` (default: the attention kind).

Outputs (``results/<profile>/``): ``checkpoints/<run>/ckpt.pt`` every ``train.checkpoint_interval``
steps (atomic; model, optimizer, RNG and data-sampler state, the run's signature and schedule, the
tokenizer's hash) and ``final.pt`` when the run ends; ``train/<run>/metrics.csv`` (iter, tokens, lr,
train_loss, val_loss, elapsed_s) and ``metrics.summary.json``.

Reruns. A run whose ``ckpt.pt`` belongs to it resumes and reproduces the curve of an uninterrupted run
(deterministic seeded batch sampling whose state is checkpointed). It belongs to it when the signature
(``run_signature``: every setting that changes the result, the data and tokenizer by content, the
initial weights by SHA-256) is equal and the learning rates it used are those this run's schedule gives
for the same steps (``schedule_mismatch``): the rate is computed from the step number, so a run extended
on the same schedule follows exactly the curve of a fresh run of the new length. ``RUNTIME_TRAIN_KEYS``
(device, compile, checkpoint_interval, threads, progress) never invalidate a checkpoint. Otherwise: an
error by hand; with ``+stage.on_mismatch=restart`` (the workflow) the old ``ckpt.pt`` is moved to
``ckpt.stale.pt`` and training starts afresh, so a changed setting never yields an "already finished".
(A schedule setting that changes none of the rates a checkpoint used, e.g. ``min_lr`` of a run that
ended before its decay, leaves the weights identical: that checkpoint still counts as this run's.)

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation and clipping,
bf16 autocast on GPU, optional torch.compile, torchrun DDP (NCCL on GPU, gloo on CPU). The global batch
is ``batch_size * grad_accum`` sequences whatever the number of processes. A NaN/inf loss stops the run
before the optimizer step, naming the iteration and the last good checkpoint. SIGTERM (a SLURM time
limit) writes a checkpoint at the end of the current step, then exits with status 143.

Test hook: ``GAINCELL_FAULT_KILL_AT_ITER=N`` makes the process SIGKILL itself right after step N (the
kill-and-resume test).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from gaincell.analog_projections import projection_config_from_dict, set_projections
from gaincell.attention.config import HW_KINDS, analog_config_from_settings
from gaincell.config import RUNTIME_ONLY_KEYS, TrainStage, stage_settings
from gaincell.data import check_token_file, check_tokenizer, read_meta, read_windows, tokenizer_fingerprint
from gaincell.io import atomic_copy, atomic_save_torch, sha256_file_cached
from gaincell.model import (
    GPT,
    CheckpointError,
    config_from_settings,
    load_checkpoint_file,
    load_model_weights,
    model_from_checkpoint_dict,
)
from gaincell.tracking import Tracker, resolved_config_dict

TRAIN_CHECKPOINT_FORMAT = "gaincell-train-v2"  # v2: schedule from the step number, content-hashed signature
METRIC_COLUMNS = ["tokens", "lr", "train_loss", "val_loss", "elapsed_s"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------
# distributed setup
# ----------------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is available here: use train.device=auto or cpu")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"train.device={preference!r}: expected auto, cpu or cuda")
    return torch.device(preference)


def setup_distributed(preference: str) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(preference)
    if world <= 1:
        return DistEnv(device=device)

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


# ----------------------------------------------------------------------------------------------------
# data sampling
# ----------------------------------------------------------------------------------------------------
class BatchSampler:
    """Random windows of ``block_size + 1`` tokens of a uint16 token file, drawn by a seeded generator.

    Every process draws the same global set of offsets (and takes its share), so the data seen
    depends only on the seed and the global batch, not on the number of processes.
    """

    def __init__(self, path: Path, block_size: int, seed: int) -> None:
        self.path = Path(path)
        self.block_size = block_size
        n = check_token_file(self.path)
        if n <= block_size + 1:
            raise ValueError(f"{self.path} holds {n} tokens: too few for sequences of block_size={block_size}")
        self.num_tokens = n
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, count: int) -> torch.Tensor:
        return torch.randint(self.num_tokens - self.block_size, (count,), generator=self.generator)

    def batch(self, offsets: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        # A fresh memmap per batch: np.memmap keeps pages resident otherwise (nanoGPT's note).
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        x, y = read_windows(data, offsets.tolist(), self.block_size)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "num_tokens": self.num_tokens}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["num_tokens"]) != self.num_tokens:
            raise CheckpointError(f"data sampler state is for a {state['num_tokens']}-token file, "
                                  f"{self.path} holds {self.num_tokens}")
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------------------
class WarmupCosine:
    """Learning-rate factor of step ``it`` (nanoGPT): linear warmup, cosine decay to min_lr/lr."""

    def __init__(self, learning_rate: float, min_lr: float, warmup_iters: int, decay_iters: int) -> None:
        self.learning_rate, self.min_lr = learning_rate, min_lr
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters

    def lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)

    def __call__(self, it: int) -> float:
        return self.lr(it) / self.learning_rate


def make_optimizer(model: GPT, lr: float, weight_decay: float, betas: Tuple[float, float],
                   device: torch.device, scaler_lr: Optional[float] = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear/Embedding weights) and none on biases, gains, scalers.

    ``scaler_lr``: peak learning rate of the attention cores' per-head scalers (their own group, same
    schedule shape: the group's ``lr_scale`` = scaler_lr / lr multiplies the scheduled rate); None: ``lr``."""
    scalers = {id(p) for core in model.attention_cores() for p in core.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    own = [p for p in params if id(p) in scalers] if scaler_lr is not None else []
    rest = [p for p in params if not any(p is q for q in own)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": float(scaler_lr),
                       "lr_scale": float(scaler_lr) / lr if lr > 0 else 1.0})
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def set_trainable_scalers(model: GPT) -> None:
    """The per-head scalers train only in hardware models (unused by softmax ones, which DDP needs to know)."""
    for core in model.attention_cores():
        for p in core.parameters(recurse=False):
            p.requires_grad_(core.kind in HW_KINDS)


# ----------------------------------------------------------------------------------------------------
# model initialisation
# ----------------------------------------------------------------------------------------------------
def _looks_like_checkpoint(init: str) -> bool:
    return init.endswith((".pt", ".pth")) or Path(init).is_file()


def _resolve_init(cfg: Any, init: str) -> str:
    """``+stage.init_from`` as a run folder or a run name (``checkpoints/<name>/``) means its ``final.pt``;
    anything else is taken as given (checkpoint file, Hugging Face name or folder, ``scratch``)."""
    for folder in (Path(init), Path(str(cfg.results_dir)) / "checkpoints" / init):
        if folder.is_dir() and (folder / "final.pt").is_file():
            return str(folder / "final.pt")
    return init


def build_model(cfg: Any, vocab_size: int) -> Tuple[GPT, str]:
    """The model to train and a description of where its weights come from."""
    init = _resolve_init(cfg, str(stage_settings(cfg, TrainStage).init_from or cfg.model.init))
    kind = str(cfg.attention.kind)
    analog = analog_config_from_settings(cfg.attention)
    if init == "scratch":
        model = GPT(config_from_settings(cfg.model, cfg.attention, vocab_size))
        source = "scratch"
    elif _looks_like_checkpoint(init):
        ckpt = load_checkpoint_file(init)
        model = model_from_checkpoint_dict(ckpt, init)
        model.set_attention(kind, analog)
        model.config.attention_implementation = str(cfg.attention.implementation)
        for core in model.attention_cores():
            core.implementation = model.config.attention_implementation
        _set_dropout(model, float(cfg.model.dropout))
        source = f"checkpoint {init}"
    else:
        model = GPT.from_pretrained(init, attention=kind, analog_cfg=analog, dropout=float(cfg.model.dropout),
                                    pad_vocab_multiple=int(cfg.model.pad_vocab_multiple),
                                    attention_implementation=str(cfg.attention.implementation))
        source = f"pretrained {init}"
    projections = cfg.get("projections") if hasattr(cfg, "get") else getattr(cfg, "projections", None)
    if projections is not None:  # analog weight tiles (gaincell.analog_projections); digital: unchanged
        set_projections(model, projection_config_from_dict(projections))
    block_size = int(cfg.model.block_size)
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    elif block_size > model.config.block_size:
        raise ValueError(f"model.block_size={block_size} exceeds the context of the initial weights "
                         f"({source}: {model.config.block_size})")
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({vocab_size} tokens) is larger than the model's "
                         f"({model.config.vocab_size}, {source}): prepare the data with the model's tokenizer")
    return model, source


def _set_dropout(model: GPT, p: float) -> None:
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


# ----------------------------------------------------------------------------------------------------
# what a run's result depends on
# ----------------------------------------------------------------------------------------------------
# Settings that change how a run executes but not its weights or metrics never invalidate a checkpoint:
# the train.* keys of gaincell.config.RUNTIME_ONLY_KEYS (the workflow reruns nothing for them either).
# ``device``: where it runs (like the number of processes); ``compile``: the same function, compiled;
# ``checkpoint_interval``: a resumed run reproduces the uninterrupted one bit for bit (tested), so where
# checkpoints fall does not matter; ``threads``, ``progress``: speed and display.
RUNTIME_TRAIN_KEYS = tuple(sorted(k.partition(".")[2] for k in RUNTIME_ONLY_KEYS if k.startswith("train.")))
# The run length and learning-rate schedule are compared iteration by iteration (``schedule_mismatch``),
# so a finished run can be extended when the learning rates it used are those of the longer run.
SCHEDULE_KEYS = ("max_iters", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters")
# Every attention implementation computes the same function (attention tests): not part of the result.
RUNTIME_MODEL_KEYS = ("attention_implementation",)
# The analog settings a kind reads (softmax ignores the hardware knobs; softmax_window reads the window).
ATTENTION_KEYS_READ = {"softmax": (), "softmax_window": ("window",)}


def _init_identity(source: str) -> Dict[str, Any]:
    """Where the initial weights come from, by content: a checkpoint or model folder by SHA-256 (cached
    beside the file), a hub name by name, ``scratch`` by nothing (the seed is in the signature)."""
    kind, _, where = source.partition(" ")
    if kind == "checkpoint":
        return {"checkpoint_sha256": sha256_file_cached(where)}
    if kind == "pretrained" and Path(where).is_dir():
        files = sorted(f for f in Path(where).rglob("*") if f.is_file() and not f.name.startswith("."))
        return {"pretrained_files": {str(f.relative_to(where)): sha256_file_cached(f) for f in files}}
    return {kind: where} if where else {"kind": kind}


def _model_identity(model: GPT) -> Dict[str, Any]:
    config = {k: v for k, v in model.config.to_dict().items() if k not in RUNTIME_MODEL_KEYS}
    read = ATTENTION_KEYS_READ.get(model.config.attention)
    if read is not None:
        config["analog"] = {k: config["analog"][k] for k in read}
    return config


def run_signature(model: GPT, cfg: Any, meta: Dict[str, Any], tokenizer: Dict[str, Any], source: str,
                  dtype: torch.dtype) -> Dict[str, Any]:
    """Everything a run's result depends on except the schedule: a checkpoint resumes only into a run
    with the same signature. The train section enters whole except ``RUNTIME_TRAIN_KEYS`` and
    ``SCHEDULE_KEYS`` (a setting added later counts by default); ``dtype`` as resolved."""
    train = OmegaConf.to_container(cfg.train, resolve=True) if OmegaConf.is_config(cfg.train) else dict(cfg.train)
    train = {k: v for k, v in train.items() if k not in RUNTIME_TRAIN_KEYS + SCHEDULE_KEYS}
    train["dtype"] = str(dtype).replace("torch.", "")
    return {
        "model_config": _model_identity(model), "init": _init_identity(source), "tokenizer": tokenizer["sha256"],
        "data": {k: meta.get(k) for k in ("corpus", "vocab_size", "train_tokens", "val_tokens", "settings")},
        "train": train,
    }


def schedule_record(schedule: "WarmupCosine", max_iters: int) -> Dict[str, Any]:
    return {"learning_rate": schedule.learning_rate, "min_lr": schedule.min_lr,
            "warmup_iters": schedule.warmup_iters, "decay_iters": schedule.decay_iters, "max_iters": max_iters}


def schedule_mismatch(recorded: Dict[str, Any], schedule: "WarmupCosine", max_iters: int,
                      at_iter: int) -> Optional[str]:
    """Why a checkpoint at ``at_iter`` cannot continue into a run of ``max_iters`` steps on ``schedule``
    (None: it can). It can when it is not past ``max_iters`` and used exactly the learning rates this
    run uses for its first ``at_iter`` steps: then resuming gives the curve of a fresh run of this length.
    The rate of each later step is computed from the step number, never restored from the checkpoint."""
    if at_iter > max_iters:
        return f"the checkpoint is at iteration {at_iter}, beyond train.max_iters={max_iters}"
    old = WarmupCosine(recorded["learning_rate"], recorded["min_lr"], recorded["warmup_iters"], recorded["decay_iters"])
    for i in range(at_iter):
        if old.lr(i) != schedule.lr(i):
            return (f"learning rate at iteration {i}: checkpoint used {old.lr(i)!r}, this run's schedule gives "
                    f"{schedule.lr(i)!r} (lr {old.learning_rate} -> {schedule.learning_rate}, min_lr {old.min_lr}"
                    f" -> {schedule.min_lr}, warmup {old.warmup_iters} -> {schedule.warmup_iters}, decay "
                    f"{old.decay_iters} -> {schedule.decay_iters} iterations)")
    return None


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if a != b:
        return f"{prefix.rstrip('.')}: checkpoint has {a!r}, this run has {b!r}"
    return None


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_train_checkpoint(path: Path, signature: Dict[str, Any], device: torch.device,
                          schedule: Optional["WarmupCosine"] = None, max_iters: Optional[int] = None) -> Dict[str, Any]:
    """Read a resumable checkpoint and check it belongs to this run (clear error naming the mismatch):
    same signature and, given ``schedule``, a learning-rate history this run shares."""
    ckpt = load_checkpoint_file(path, map_location="cpu")
    if ckpt.get("format") != TRAIN_CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a resumable training checkpoint of this version "
                              f"(format {ckpt.get('format')!r}, expected {TRAIN_CHECKPOINT_FORMAT!r})")
    diff = _first_difference(ckpt.get("signature"), signature)
    if diff is None and schedule is not None:
        diff = schedule_mismatch(ckpt["schedule"], schedule, int(max_iters), int(ckpt["iter"]))
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match this run: {diff}. Delete the run's "
                              f"checkpoint folder or choose another +stage.name to start afresh")
    return ckpt


def publish_final(ckpt_path: Path, final_path: Path) -> Path:
    """``final.pt``: the finished run's ``ckpt.pt``, copied atomically (the one place it is written)."""
    atomic_copy(ckpt_path, final_path)
    return final_path


# ----------------------------------------------------------------------------------------------------
# set-up, resume, save
# ----------------------------------------------------------------------------------------------------
def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"train.dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return table[name]


@dataclass
class TrainRun:
    """Everything one training run holds: settings, model and optimizer, data, and where it stands."""

    cfg: Any
    env: DistEnv
    name: str
    ckpt_path: Path
    final_path: Path
    metrics_path: Path
    model: GPT
    source: str
    optimizer: torch.optim.Optimizer
    scaler: Any
    schedule: WarmupCosine
    train_sampler: BatchSampler
    val_sampler: BatchSampler
    dtype: torch.dtype
    signature: Dict[str, Any]
    tokenizer: Dict[str, Any]
    max_iters: int
    iter: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    wandb_id: Optional[str] = None
    last_good: Optional[Path] = None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.dtype)

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(f"train[{self.name}]: {message}", flush=True)


def _checked_batch_settings(t: Any, env: DistEnv) -> Tuple[int, int, int]:
    max_iters, batch_size, grad_accum = int(t.max_iters), int(t.batch_size), int(t.grad_accum)
    if max_iters < 0 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"train.max_iters={max_iters}, batch_size={batch_size}, grad_accum={grad_accum}: "
                         f"expected max_iters >= 0 (0: export the initial model) and positive batch sizes")
    if grad_accum % env.world_size != 0:
        raise ValueError(f"train.grad_accum={grad_accum} is not divisible by the {env.world_size} processes: "
                         f"each process runs grad_accum / world_size micro-batches")
    return max_iters, batch_size, grad_accum


def setup(cfg: Any, env: DistEnv) -> TrainRun:
    """Model, optimizer, schedule and data samplers of a fresh run, and the run's signature."""
    t = cfg.train
    max_iters, batch_size, grad_accum = _checked_batch_settings(t, env)
    results_dir, data_dir = Path(str(cfg.results_dir)), Path(str(cfg.data.data_dir))
    name = str(stage_settings(cfg, TrainStage).name or cfg.attention.kind)
    meta = read_meta(data_dir)
    for split in ("train", "val"):
        check_token_file(data_dir / f"{split}.bin", meta, split)
    tokenizer = tokenizer_fingerprint(data_dir, meta)
    torch.manual_seed(int(t.seed))  # identical initial weights on every rank
    model, source = build_model(cfg, int(meta["vocab_size"]))
    if source.startswith("checkpoint ") and env.is_main:
        warning = check_tokenizer(model.tokenizer_info, data_dir, source.partition(" ")[2], tokenizer)
        if warning:
            print(f"train[{name}]: warning: {warning}")
    set_trainable_scalers(model)
    model.to(env.device)
    T = model.config.block_size
    decay_iters = int(t.lr_decay_iters) if t.lr_decay_iters is not None else max_iters
    dtype = _dtype(str(t.dtype), env.device)
    ckpt_dir = results_dir / "checkpoints" / name
    return TrainRun(
        cfg=cfg, env=env, name=name, ckpt_path=ckpt_dir / "ckpt.pt", final_path=ckpt_dir / "final.pt",
        metrics_path=results_dir / "train" / name / "metrics.csv", model=model, source=source,
        optimizer=make_optimizer(model, float(t.learning_rate), float(t.weight_decay),
                                 (float(t.beta1), float(t.beta2)), env.device,
                                 scaler_lr=None if t.get("scaler_learning_rate") is None
                                 else float(t.scaler_learning_rate)),
        scaler=torch.amp.GradScaler(env.device.type, enabled=(dtype == torch.float16)),
        schedule=WarmupCosine(float(t.learning_rate), float(t.min_lr), int(t.warmup_iters), decay_iters),
        train_sampler=BatchSampler(data_dir / "train.bin", T, seed=int(t.seed)),
        val_sampler=BatchSampler(data_dir / "val.bin", T, seed=int(t.seed) + 1),
        dtype=dtype, signature=run_signature(model, cfg, meta, tokenizer, source, dtype), tokenizer=tokenizer,
        max_iters=max_iters)


def _set_aside_if_stale(run: TrainRun) -> bool:
    """Workflow mode (``+stage.on_mismatch=restart``): a ``ckpt.pt`` this run cannot continue (settings
    changed since) is moved to ``ckpt.stale.pt`` and training starts afresh. Returns whether one remains."""
    if not run.ckpt_path.is_file():
        return False
    if stage_settings(run.cfg, TrainStage).on_mismatch != "restart":
        return True
    try:
        load_train_checkpoint(run.ckpt_path, run.signature, torch.device("cpu"), run.schedule, run.max_iters)
        return True
    except CheckpointError as err:
        run.log(str(err))
    if run.env.is_main:
        aside = run.ckpt_path.with_name("ckpt.stale.pt")
        os.replace(run.ckpt_path, aside)
        run.log(f"settings changed since {run.ckpt_path} was written: moved it to {aside.name}, starting afresh")
    if run.env.distributed:
        dist.barrier()
    return False


def resume_or_restart(run: TrainRun) -> None:
    """Continue from the run's ``ckpt.pt`` when it belongs to this run, else start at iteration 0."""
    if not _set_aside_if_stale(run):
        torch.manual_seed(int(run.cfg.train.seed) + run.env.rank)  # dropout differs across ranks
        return
    ckpt = load_train_checkpoint(run.ckpt_path, run.signature, run.env.device, run.schedule, run.max_iters)
    load_model_weights(run.model, ckpt["model"], run.ckpt_path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.train_sampler.load_state_dict(ckpt["data_sampler"])
    rng_states = ckpt["rng"]
    _set_rng_state(rng_states[run.env.rank] if run.env.rank < len(rng_states) else rng_states[0], run.env.device)
    run.iter, run.tokens = int(ckpt["iter"]), int(ckpt["tokens"])
    run.elapsed_s, run.wandb_id, run.last_good = float(ckpt["elapsed_s"]), ckpt.get("wandb_id"), run.ckpt_path
    run.log(f"resuming from {run.ckpt_path} at iteration {run.iter}/{run.max_iters}")


def save_checkpoint(run: TrainRun, tracker: Any, finished: bool) -> Path:
    """``ckpt.pt`` (atomic; all ranks' RNG states gathered) and, when the run is finished, ``final.pt``."""
    rng = [_rng_state(run.env.device)]
    if run.env.distributed:
        rng = [None] * run.env.world_size
        dist.all_gather_object(rng, _rng_state(run.env.device))
    if run.env.is_main:
        tracker.flush()
        state = run.model.checkpoint_state()
        state.update({
            "format": TRAIN_CHECKPOINT_FORMAT, "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "data_sampler": run.train_sampler.state_dict(), "rng": rng,
            "iter": run.iter, "tokens": run.tokens, "elapsed_s": run.elapsed_s, "wandb_id": tracker.wandb_id,
            "signature": run.signature, "schedule": schedule_record(run.schedule, run.max_iters),
            "tokenizer": run.tokenizer, "finished": finished, "run_name": run.name, "config": _plain_config(run.cfg),
        })
        atomic_save_torch(state, run.ckpt_path)
        if finished:
            publish_final(run.ckpt_path, run.final_path)
            tracker.log_checkpoint(run.final_path, {"iter": run.iter, "run": run.name, "tokens": run.tokens})
    run.last_good = run.ckpt_path
    return run.ckpt_path


# ----------------------------------------------------------------------------------------------------
# one step, evaluation, termination
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def estimate_val_loss(model: GPT, sampler: BatchSampler, batches: int, batch_size: int, seed: int,
                      env: DistEnv, autocast) -> float:
    """Mean loss over a fixed set of validation batches (the same set at every evaluation)."""
    was_training = model.training
    model.eval()
    offsets = torch.randint(sampler.num_tokens - sampler.block_size, (batches, batch_size),
                            generator=torch.Generator().manual_seed(seed))
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for j in range(env.rank, batches, env.world_size):
        x, y = sampler.batch(offsets[j], env.device)
        with autocast():
            _, loss = model(x, y)
        total[0] += loss.double()
        total[1] += 1
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return float(total[0] / total[1])


def train_step(run: TrainRun, model: torch.nn.Module, lr: float, stop_requested: bool) -> Tuple[float, bool]:
    """One optimizer step at learning rate ``lr`` over ``grad_accum`` micro-batches (this process's
    share). Returns the mean loss and whether any process asked to stop (reduced with the loss: no
    extra synchronisation). Raises ``TrainingDiverged`` before the update when the loss is not finite."""
    t, env = run.cfg.train, run.env
    batch_size, grad_accum = int(t.batch_size), int(t.grad_accum)
    local_accum = grad_accum // env.world_size
    for group in run.optimizer.param_groups:  # the scalers' group keeps its ratio to the schedule
        group["lr"] = lr * group.get("lr_scale", 1.0)
    offsets = run.train_sampler.draw(grad_accum * batch_size).view(grad_accum, batch_size)[env.rank::env.world_size]
    loss_sum = torch.zeros((), device=env.device)
    for m in range(local_accum):
        x, y = run.train_sampler.batch(offsets[m], env.device)
        sync = model.no_sync() if env.distributed and m < local_accum - 1 else contextlib.nullcontext()  # type: ignore
        with sync:
            with run.autocast():
                _, loss = model(x, y)
            loss_sum += loss.detach().float()
            run.scaler.scale(loss / local_accum).backward()
    reduced = torch.stack([loss_sum / local_accum, torch.tensor(float(stop_requested), device=env.device)])
    if env.distributed:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        reduced[0] /= env.world_size
    step_loss, stop = float(reduced[0]), bool(reduced[1] > 0)
    if not math.isfinite(step_loss):
        where = f"the last good checkpoint is {run.last_good}" if run.last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"train[{run.name}]: loss is {step_loss} at iteration {run.iter + 1}; training "
                               f"stopped before the optimizer step; {where}")
    if float(t.grad_clip) > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), float(t.grad_clip))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, stop


class TerminationRequest:
    """SIGTERM (SLURM's time limit, ``scancel``, torchrun shutting down) sets a flag; the loop checkpoints
    at the end of the current step and exits with 128 + SIGTERM. The previous handler is restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "TerminationRequest":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (the default, termination, stays)
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TrainingTerminated(SystemExit):
    """Raised after the checkpoint written on SIGTERM: the process exits with 128 + SIGTERM (143)."""

    def __init__(self, message: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message = message


# ----------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------
def run(cfg: Any) -> Path:
    """The ``train`` stage; returns the final checkpoint's path."""
    env = setup_distributed(str(cfg.train.device))
    try:
        return train(cfg, env)
    finally:
        if env.distributed:
            if dist.is_initialized():
                dist.destroy_process_group()


def _finish_if_done(run: TrainRun) -> bool:
    """A resumed run already at ``max_iters`` (same settings): nothing to train; ``final.pt`` restored
    if the process was killed between writing ``ckpt.pt`` and copying it."""
    if run.iter < run.max_iters or run.last_good is None:
        return False
    if run.env.is_main:
        if not run.final_path.is_file():
            publish_final(run.ckpt_path, run.final_path)
        run.log(f"already finished at iteration {run.iter} with these settings ({run.final_path})")
    return True


def _wrap(run: TrainRun) -> torch.nn.Module:
    model: torch.nn.Module = run.model
    if bool(run.cfg.train.compile):
        model = torch.compile(model)  # type: ignore[assignment]
    if run.env.distributed:
        model = DDP(model, device_ids=[run.env.local_rank] if run.env.device.type == "cuda" else None)
    return model


def _validate(run: TrainRun) -> float:
    t = run.cfg.train
    return estimate_val_loss(run.model, run.val_sampler, int(t.eval_iters), int(t.batch_size), int(t.seed) + 1,
                             run.env, run.autocast)


def _open_tracker(run: TrainRun):
    t = run.cfg.train
    tokens_per_step = int(t.batch_size) * int(t.grad_accum) * run.model.config.block_size
    run.log(f"{run.model.num_parameters() / 1e6:.2f}M parameters, attention {run.model.config.attention}, "
            f"init {run.source}, {run.env.world_size} process(es) on {run.env.device}, {run.dtype}, "
            f"{tokens_per_step} tokens per step, {run.max_iters} iterations")
    return Tracker(run.cfg, run_name=run.name, job_type="train", csv_path=run.metrics_path, step_name="iter",
                   columns=METRIC_COLUMNS, resume_step=run.iter if run.iter else None, wandb_id=run.wandb_id,
                   enabled=run.env.is_main)


def train(cfg: Any, env: DistEnv) -> Path:
    """nanoGPT's loop: set up, resume or restart, then step / evaluate / log / checkpoint to ``max_iters``."""
    t = cfg.train
    if int(t.threads) > 0:
        torch.set_num_threads(int(t.threads))
    run = setup(cfg, env)
    resume_or_restart(run)
    if _finish_if_done(run):
        return run.final_path
    model, tracker = _wrap(run), _open_tracker(run)
    eval_every, ckpt_every, log_every = (max(1, int(t.eval_interval)), max(1, int(t.checkpoint_interval)),
                                         max(1, int(t.log_interval)))
    tokens_per_step = int(t.batch_size) * int(t.grad_accum) * run.model.config.block_size
    kill_at = int(os.environ.get("GAINCELL_FAULT_KILL_AT_ITER", "0") or 0)
    t0, elapsed0, run_tokens, loss, val_loss = time.perf_counter(), run.elapsed_s, 0, float("nan"), None
    if run.iter == 0:
        val_loss = _validate(run)
        tracker.log({"tokens": 0, "lr": run.schedule.lr(0), "train_loss": None, "val_loss": val_loss,
                     "elapsed_s": run.elapsed_s}, step=0)
    bar = _progress_bar(run)
    model.train()
    with TerminationRequest() as term, contextlib.ExitStack() as cleanup:
        cleanup.callback(tracker.finish)
        cleanup.callback(bar.close)
        while run.iter < run.max_iters:
            lr = run.schedule.lr(run.iter)
            loss, stop = train_step(run, model, lr, term.requested)
            run.iter, run.tokens, run_tokens = run.iter + 1, run.tokens + tokens_per_step, run_tokens + tokens_per_step
            run.elapsed_s = elapsed0 + (time.perf_counter() - t0)
            val_loss = _validate(run) if run.iter % eval_every == 0 or run.iter == run.max_iters else None
            if val_loss is not None and env.is_main:
                bar.write(f"train[{run.name}] iter {run.iter}: train loss {loss:.4f}, val loss {val_loss:.4f}")
            if run.iter % log_every == 0 or val_loss is not None:
                tracker.log({"tokens": run.tokens, "lr": lr, "train_loss": loss, "val_loss": val_loss,
                             "elapsed_s": round(run.elapsed_s, 3)}, step=run.iter)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if run.iter % ckpt_every == 0 or run.iter == run.max_iters or stop:
                save_checkpoint(run, tracker, finished=(run.iter == run.max_iters))
            if stop and run.iter < run.max_iters:
                run.log(f"SIGTERM: checkpoint written at iteration {run.iter} ({run.ckpt_path}); exiting, "
                        f"a rerun resumes from it")
                raise TrainingTerminated(f"terminated at iteration {run.iter}")
            if kill_at and run.iter == kill_at:
                tracker.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if run.max_iters == 0:  # export of the initial weights (e.g. public GPT-2 as the paper's baseline)
            save_checkpoint(run, tracker, finished=True)
        _summarise(run, tracker, loss, val_loss, run_tokens, time.perf_counter() - t0)
    return run.final_path


def _progress_bar(run: TrainRun):
    return tqdm(total=run.max_iters, initial=run.iter, desc=f"train {run.name}", unit="it", dynamic_ncols=True,
                mininterval=1.0, disable=not (run.env.is_main and bool(run.cfg.train.progress)), file=sys.stderr)


def _summarise(run: TrainRun, tracker: Any, loss: float, val_loss: Optional[float], run_tokens: int,
               wall: float) -> None:
    summary = {"final_train_loss": loss, "final_val_loss": val_loss, "iters": run.iter, "tokens": run.tokens,
               "tokens_per_s": run_tokens / wall if wall > 0 else None, "wall_s": wall, "init": run.source,
               "attention": run.model.config.attention, "parameters": run.model.num_parameters(),
               "world_size": run.env.world_size, "device": str(run.env.device)}
    tracker.summary(summary)
    val = None if val_loss is None else round(val_loss, 4)
    run.log(f"done, {run.iter} iterations, val loss {val}, {summary['tokens_per_s'] or 0:,.0f} tokens/s, "
            f"{wall:.1f} s -> {run.final_path}")


def _plain_config(cfg: Any) -> Any:
    try:
        return resolved_config_dict(cfg)
    except Exception:  # an unresolvable interpolation must not lose a checkpoint
        return None


__all__ = ["run", "train", "setup", "resume_or_restart", "save_checkpoint", "train_step", "BatchSampler",
           "WarmupCosine", "make_optimizer", "build_model", "TrainingDiverged", "TrainingTerminated",
           "estimate_val_loss", "load_train_checkpoint", "run_signature", "schedule_mismatch",
           "setup_distributed", "DistEnv", "TrainRun", "RUNTIME_TRAIN_KEYS"]
