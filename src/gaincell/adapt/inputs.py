"""What the adaptation stages read and share: the checkpoint they start from, the fixed batches they
measure on, and the trainer's device / process-group set-up."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from gaincell.attention.module import AttentionCore
from gaincell.data import Batch, check_vocabulary, open_tokens, sample_batches
from gaincell.io import atomic_save_torch
from gaincell.model import GPT
from gaincell.train import DistEnv, setup_distributed


def results_dir(cfg: Any) -> Path:
    return Path(cfg.results_dir)


def resolve_checkpoint(cfg: Any, spec: Optional[str]) -> Path:
    """``+stage.init_from``: a checkpoint file, a run folder, or a run name under checkpoints/."""
    if not spec:
        raise ValueError("+stage.init_from is required: the checkpoint (file, folder or run name) to start from")
    p = Path(str(spec))
    candidates = [p, p / "final.pt", p / "ckpt.pt"]
    run_dir = results_dir(cfg) / "checkpoints" / str(spec)
    candidates += [run_dir / "final.pt", run_dir / "ckpt.pt"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"+stage.init_from={spec!r}: no checkpoint found (tried {', '.join(map(str, candidates))})")


@contextlib.contextmanager
def distributed_job(cfg: Any) -> Iterator[DistEnv]:
    """The trainer's device choice and torchrun process group (``train.threads`` torch threads), left
    again on exit."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    env = setup_distributed(cfg.train.device)
    try:
        yield env
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def core_kinds(cores: Sequence[AttentionCore]) -> List[str]:
    return sorted({c.kind for c in cores})


def load_model(path: Path, device: torch.device, implementation: str = "auto") -> GPT:
    """The checkpoint's model in float32 eval mode; the attention implementation is the config's (as in
    the trainer): every implementation computes the same function, at different speeds."""
    model = GPT.from_checkpoint(str(path), map_location="cpu")
    implementation = str(implementation)  # a config choice: the plain string
    model.config.attention_implementation = implementation
    for core in model.attention_cores():
        core.implementation = implementation
    return model.to(device).float().eval()


def save_checkpoint(model: GPT, path: Path, extra: dict) -> None:
    """The model in the trainer's checkpoint format (``GPT.from_checkpoint`` reads it) plus ``extra``."""
    state = model.checkpoint_state()
    state.update(extra)
    atomic_save_torch(state, path)


def fixed_batches(cfg: Any, model: GPT, split: str) -> List[Batch]:
    """The study's fixed batches of ``split``: ``adapt.eval_batches`` validation batches (seed + 1), the
    same for every variant, or ``adapt.calibration_batches`` training batches (seed) for eq. 9."""
    data_dir = Path(cfg.data.data_dir)
    vocab = model.config.vocab_size
    check_vocabulary(data_dir / "meta.json", vocab)
    if split == "val":
        count, seed = cfg.adapt.eval_batches, cfg.seed + 1
    elif split == "train":
        count, seed = cfg.adapt.calibration_batches, cfg.seed
    else:
        raise ValueError(f"split={split!r}: expected 'train' or 'val'")
    return sample_batches(open_tokens(data_dir, split), count, cfg.adapt.batch_size, model.config.block_size,
                          seed=seed, vocab_size=vocab, source=str(data_dir / f"{split}.bin"))
