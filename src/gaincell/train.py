"""The trainer of every training stage (after nanoGPT's train.py): the ``train`` stage.

    python -m gaincell train attention=softmax +stage.name=softmax                       # pretrain
    python -m gaincell train attention=linear_hw +stage.name=linear_hw \\
        +stage.init_from=results/tiny/checkpoints/softmax/final.pt train.max_iters=150    # fine-tune
    torchrun --nproc_per_node=2 -m gaincell train ...                                   # DDP

Init source: ``+stage.init_from`` if given, else ``model.init``: ``scratch``, a Hugging Face GPT-2 (hub
name or ``save_pretrained`` folder) or a checkpoint file (weights only; the attention is switched to
``attention.kind``). Run name: ``+stage.name`` (default: the attention kind).

Outputs (``results/<profile>/``): ``checkpoints/<run>/ckpt.pt`` every ``train.checkpoint_interval``
steps (atomic; model, optimizer, scheduler, RNG and data-sampler state) and ``final.pt`` when the run
ends; ``train/<run>/metrics.csv`` (iter, tokens, lr, train_loss, val_loss, elapsed_s) and
``metrics.summary.json``. A run whose ``ckpt.pt`` exists resumes from it and reproduces the curve of an
uninterrupted run (deterministic seeded batch sampling whose state is checkpointed).

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation and clipping,
bf16 autocast on GPU, optional torch.compile, torchrun DDP (NCCL on GPU, gloo on CPU). The global batch
is ``batch_size * grad_accum`` sequences whatever the number of processes. A NaN/inf loss stops the run
before the optimizer step, naming the iteration and the last good checkpoint.

Test hook: ``GAINCELL_FAULT_KILL_AT_ITER=N`` makes the process SIGKILL itself right after step N (the
kill-and-resume test).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from gaincell.analog_projections import projection_config_from_dict, set_projections
from gaincell.attention.module import HW_KINDS
from gaincell.io import atomic_save_torch
from gaincell.model import (GPT, CheckpointError, config_from_settings, load_checkpoint_file,
                            load_model_weights, model_from_checkpoint_dict)

TRAIN_CHECKPOINT_FORMAT = "gaincell-train-v1"
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
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def _all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / env.world_size
    return x


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
        n = len(np.memmap(self.path, dtype=np.uint16, mode="r"))
        if n <= block_size + 1:
            raise ValueError(f"{self.path} holds {n} tokens: too few for sequences of block_size={block_size}")
        self.num_tokens = n
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, count: int) -> torch.Tensor:
        return torch.randint(self.num_tokens - self.block_size, (count,), generator=self.generator)

    def batch(self, offsets: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        # A fresh memmap per batch: np.memmap keeps pages resident otherwise (nanoGPT's note).
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        T = self.block_size
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in offsets.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in offsets.tolist()])
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
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear/Embedding weights) and none on biases, gains, scalers."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
def _stage_get(cfg: Any, key: str, default: Any = None) -> Any:
    stage = cfg.get("stage") if hasattr(cfg, "get") else getattr(cfg, "stage", None)
    if not stage:
        return default
    value = stage.get(key, default) if hasattr(stage, "get") else getattr(stage, key, default)
    return default if value is None else value


def _looks_like_checkpoint(init: str) -> bool:
    return init.endswith((".pt", ".pth")) or Path(init).is_file()


def build_model(cfg: Any, vocab_size: int) -> Tuple[GPT, str]:
    """The model to train and a description of where its weights come from."""
    from gaincell.attention.config import analog_config_from_settings

    init = str(_stage_get(cfg, "init_from", None) or cfg.model.init)
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


def _signature(model: GPT, cfg: Any, meta: Dict[str, Any], source: str, global_micro: int) -> Dict[str, Any]:
    """What a resumed run must share with the checkpoint for the curve to continue."""
    t = cfg.train
    return {
        "model_config": model.config.to_dict(), "init": source,
        "data": {"vocab_size": meta.get("vocab_size"), "train_tokens": meta.get("train_tokens"),
                 "corpus": meta.get("corpus")},
        "train": {"global_batch_size": global_micro, "block_size": model.config.block_size,
                  "learning_rate": float(t.learning_rate), "min_lr": float(t.min_lr),
                  "warmup_iters": int(t.warmup_iters), "weight_decay": float(t.weight_decay),
                  "betas": [float(t.beta1), float(t.beta2)], "seed": int(t.seed)},
    }


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


def load_train_checkpoint(path: Path, signature: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Read a resumable checkpoint and check it belongs to this run (clear error naming the mismatch)."""
    ckpt = load_checkpoint_file(path, map_location="cpu")
    if ckpt.get("format") != TRAIN_CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a resumable training checkpoint "
                              f"(format {ckpt.get('format')!r}, expected {TRAIN_CHECKPOINT_FORMAT!r})")
    diff = _first_difference(ckpt.get("signature"), signature)
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match this run: {diff}. Delete the run's "
                              f"checkpoint folder or choose another +stage.name to start afresh")
    return ckpt


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------
def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"train.dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return table[name]


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
        import torch.distributed as dist

        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return float(total[0] / total[1])


def run(cfg: Any) -> Path:
    """The ``train`` stage; returns the final checkpoint's path."""
    env = setup_distributed(str(cfg.train.device))
    try:
        return train(cfg, env)
    finally:
        if env.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def train(cfg: Any, env: DistEnv) -> Path:
    from gaincell.data import read_meta
    from gaincell.tracking import Tracker

    t = cfg.train
    if int(t.threads) > 0:
        torch.set_num_threads(int(t.threads))
    results_dir = Path(str(cfg.results_dir))
    run_name = str(_stage_get(cfg, "name", None) or cfg.attention.kind)
    ckpt_dir = results_dir / "checkpoints" / run_name
    ckpt_path, final_path = ckpt_dir / "ckpt.pt", ckpt_dir / "final.pt"
    metrics_path = results_dir / "train" / run_name / "metrics.csv"
    data_dir = Path(str(cfg.data.data_dir))
    meta = read_meta(data_dir)

    max_iters = int(t.max_iters)
    batch_size, grad_accum = int(t.batch_size), int(t.grad_accum)
    if max_iters < 0 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"train.max_iters={max_iters}, batch_size={batch_size}, grad_accum={grad_accum}: "
                         f"expected max_iters >= 0 (0: export the initial model) and positive batch sizes")
    if grad_accum % env.world_size != 0:
        raise ValueError(f"train.grad_accum={grad_accum} is not divisible by the {env.world_size} processes: "
                         f"each process runs grad_accum / world_size micro-batches")
    local_accum = grad_accum // env.world_size
    decay_iters = int(t.lr_decay_iters) if t.lr_decay_iters is not None else max_iters

    torch.manual_seed(int(t.seed))  # identical initial weights on every rank
    model, source = build_model(cfg, int(meta["vocab_size"]))
    set_trainable_scalers(model)
    model.to(env.device)
    T = model.config.block_size
    signature = _signature(model, cfg, meta, source, batch_size * grad_accum)

    train_sampler = BatchSampler(data_dir / "train.bin", T, seed=int(t.seed))
    val_sampler = BatchSampler(data_dir / "val.bin", T, seed=int(t.seed) + 1)
    optimizer = make_optimizer(model, float(t.learning_rate), float(t.weight_decay),
                               (float(t.beta1), float(t.beta2)), env.device)
    schedule = WarmupCosine(float(t.learning_rate), float(t.min_lr), int(t.warmup_iters), decay_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = _dtype(str(t.dtype), env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=(dtype == torch.float16))

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=env.device.type, dtype=dtype)

    start_iter, tokens_seen, elapsed_offset, wandb_id = 0, 0, 0.0, None
    last_good = None
    resumed = ckpt_path.is_file()
    # The workflow passes +stage.on_mismatch=restart: a checkpoint left by a run with other settings (a
    # parameter changed since) is set aside and training starts afresh; by hand the mismatch is an error.
    restart_on_mismatch = str(_stage_get(cfg, "on_mismatch", "error")) == "restart"
    if resumed and restart_on_mismatch:
        try:
            probe = load_train_checkpoint(ckpt_path, signature, torch.device("cpu"))
            stale = int(probe["iter"]) > max_iters
            del probe
        except CheckpointError as err:
            stale = True
            if env.is_main:
                print(f"train[{run_name}]: {err}")
        if stale:
            if env.is_main:
                aside = ckpt_path.with_name("ckpt.stale.pt")
                os.replace(ckpt_path, aside)
                print(f"train[{run_name}]: settings changed since {ckpt_path} was written: moved it to "
                      f"{aside.name} and starting afresh")
            if env.distributed:
                import torch.distributed as dist

                dist.barrier()
            resumed = False
    if resumed:
        ckpt = load_train_checkpoint(ckpt_path, signature, env.device)
        load_model_weights(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        train_sampler.load_state_dict(ckpt["data_sampler"])
        rng_states = ckpt["rng"]
        _set_rng_state(rng_states[env.rank] if env.rank < len(rng_states) else rng_states[0], env.device)
        start_iter, tokens_seen = int(ckpt["iter"]), int(ckpt["tokens"])
        elapsed_offset, wandb_id = float(ckpt["elapsed_s"]), ckpt.get("wandb_id")
        last_good = ckpt_path
        if env.is_main:
            print(f"train[{run_name}]: resuming from {ckpt_path} at iteration {start_iter}/{max_iters}")
        del ckpt
    else:
        torch.manual_seed(int(t.seed) + env.rank)  # dropout differs across ranks
    if resumed and start_iter > max_iters:
        raise CheckpointError(f"checkpoint {ckpt_path} is at iteration {start_iter}, beyond train.max_iters="
                              f"{max_iters}: delete the run's checkpoint folder or choose another +stage.name")
    if resumed and start_iter == max_iters:
        if env.is_main:
            if not final_path.is_file():  # killed between writing ckpt.pt and its final.pt copy
                tmp = final_path.with_name(f".{final_path.name}.tmp")
                shutil.copyfile(ckpt_path, tmp)
                os.replace(tmp, final_path)
            print(f"train[{run_name}]: already finished at iteration {start_iter} ({final_path})")
        return final_path

    raw_model = model
    if bool(t.compile):
        model = torch.compile(model)  # type: ignore[assignment]
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)  # type: ignore

    tracker = Tracker(cfg, run_name=run_name, job_type="train", csv_path=metrics_path, step_name="iter",
                      columns=METRIC_COLUMNS, resume_step=start_iter if start_iter else None,
                      wandb_id=wandb_id, enabled=env.is_main)
    if env.is_main:
        n_params = raw_model.num_parameters()
        print(f"train[{run_name}]: {n_params / 1e6:.2f}M parameters, attention {raw_model.config.attention}, "
              f"init {source}, {env.world_size} process(es) on {env.device}, {dtype}, global batch "
              f"{batch_size * grad_accum} x {T} tokens, {max_iters} iterations")

    def save_checkpoint(it: int, finished: bool) -> Path:
        rng = [_rng_state(env.device)]
        if env.distributed:
            import torch.distributed as dist

            rng = [None] * env.world_size
            dist.all_gather_object(rng, _rng_state(env.device))
        if env.is_main:
            tracker.flush()
            state = raw_model.checkpoint_state()
            state.update({
                "format": TRAIN_CHECKPOINT_FORMAT, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "data_sampler": train_sampler.state_dict(), "rng": rng, "iter": it, "tokens": tokens_seen,
                "elapsed_s": elapsed, "wandb_id": tracker.wandb_id, "signature": signature,
                "finished": finished, "run_name": run_name, "config": _plain_config(cfg),
            })
            atomic_save_torch(state, ckpt_path)
            if finished:
                tmp = final_path.with_name(f".{final_path.name}.tmp")
                shutil.copyfile(ckpt_path, tmp)
                os.replace(tmp, final_path)
        return ckpt_path

    kill_at = int(os.environ.get("GAINCELL_FAULT_KILL_AT_ITER", "0") or 0)
    eval_interval, ckpt_interval = max(1, int(t.eval_interval)), max(1, int(t.checkpoint_interval))
    log_interval = max(1, int(t.log_interval))
    tokens_per_step = batch_size * grad_accum * T
    t_start = time.perf_counter()
    elapsed = elapsed_offset

    val_loss = None
    if start_iter == 0:
        val_loss = estimate_val_loss(raw_model, val_sampler, int(t.eval_iters), batch_size, int(t.seed) + 1,
                                     env, autocast)
        tracker.log({"tokens": 0, "lr": scheduler.get_last_lr()[0], "train_loss": None, "val_loss": val_loss,
                     "elapsed_s": elapsed}, step=0)

    from tqdm.auto import tqdm

    bar = tqdm(total=max_iters, initial=start_iter, desc=f"train {run_name}", unit="it", dynamic_ncols=True,
               mininterval=1.0, disable=not (env.is_main and bool(t.progress)), file=sys.stderr)
    model.train()
    run_tokens, step_loss = 0, float("nan")
    it = start_iter
    try:
        while it < max_iters:
            step_t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            offsets = train_sampler.draw(grad_accum * batch_size).view(grad_accum, batch_size)
            local = offsets[env.rank::env.world_size]
            loss_sum = torch.zeros((), device=env.device)
            for m in range(local_accum):
                x, y = train_sampler.batch(local[m], env.device)
                sync = contextlib.nullcontext()
                if env.distributed and m < local_accum - 1:
                    sync = model.no_sync()  # type: ignore[union-attr]
                with sync:
                    with autocast():
                        _, loss = model(x, y)
                    loss_sum += loss.detach().float()
                    scaler.scale(loss / local_accum).backward()
            mean_loss = _all_reduce_mean(loss_sum / local_accum, env)
            step_loss = float(mean_loss)
            if not math.isfinite(step_loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingDiverged(f"train[{run_name}]: loss is {step_loss} at iteration {it + 1}; training "
                                       f"stopped before the optimizer step; {where}")
            if float(t.grad_clip) > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float(t.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            it += 1
            tokens_seen += tokens_per_step
            run_tokens += tokens_per_step
            step_s = time.perf_counter() - step_t0
            elapsed = elapsed_offset + (time.perf_counter() - t_start)

            val_loss = None
            if it % eval_interval == 0 or it == max_iters:
                val_loss = estimate_val_loss(raw_model, val_sampler, int(t.eval_iters), batch_size,
                                             int(t.seed) + 1, env, autocast)
                if env.is_main:
                    bar.write(f"train[{run_name}] iter {it}: train loss {step_loss:.4f}, val loss {val_loss:.4f}")
            if it % log_interval == 0 or val_loss is not None:
                tracker.log({"tokens": tokens_seen, "lr": lr, "train_loss": step_loss, "val_loss": val_loss,
                             "elapsed_s": round(elapsed, 3)}, step=it)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_step / step_s:,.0f}", refresh=False)
            if it % ckpt_interval == 0 or it == max_iters:
                last_good = save_checkpoint(it, finished=(it == max_iters))
            if kill_at and it == kill_at:
                tracker.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:
        bar.close()
        tracker.finish()
        raise
    bar.close()
    if max_iters == 0:  # export of the initial weights (e.g. public GPT-2 as the paper's baseline)
        last_good = save_checkpoint(0, finished=True)
    wall = time.perf_counter() - t_start
    summary = {"final_train_loss": step_loss, "final_val_loss": val_loss, "iters": it, "tokens": tokens_seen,
               "tokens_per_s": run_tokens / wall if wall > 0 else None, "wall_s": wall, "init": source,
               "attention": raw_model.config.attention, "parameters": raw_model.num_parameters(),
               "world_size": env.world_size, "device": str(env.device)}
    tracker.summary(summary)
    tracker.finish()
    if env.is_main:
        print(f"train[{run_name}]: done, {it} iterations, val loss {val_loss if val_loss is None else round(val_loss, 4)}, "
              f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {wall:.1f} s -> {final_path}")
    return final_path


def _plain_config(cfg: Any) -> Any:
    from gaincell.tracking import resolved_config_dict

    try:
        return resolved_config_dict(cfg)
    except Exception:  # an unresolvable interpolation must not lose a checkpoint
        return None


__all__ = ["run", "train", "BatchSampler", "WarmupCosine", "make_optimizer", "build_model", "TrainingDiverged",
           "estimate_val_loss", "load_train_checkpoint", "setup_distributed", "DistEnv"]
