"""Token-by-token generation (``GPT.generate``) with argument checks, warnings and timing, and the CLI stage.

    from gaincell.generate import generate
    out = generate(model, idx, max_new_tokens=200, temperature=0.8, top_k=50, seed=0)   # (B, T + N)

and the CLI stage (prints the text; ``+stage.name`` also writes ``results/<profile>/samples/<name>.txt``
and a ``<name>.json`` with the settings and speed):

    python -m gaincell generate +stage.checkpoint=results/tiny/checkpoints/linear/final.pt \\
        +stage.prompt="ROMEO:" +stage.max_new_tokens=200 +stage.temperature=0.8 +stage.top_k=50 +stage.seed=0

The decoding itself is the model's (``GPT.start_decoding``, ``GPT.step``): per layer, the attention
state is

* ``softmax``: the usual key/value cache, holding the last ``block_size`` tokens (the longest history
  the model was trained with; within the context this is the whole history);
* ``softmax_window``: the last ``window`` tokens;
* ``linear_hw`` / ``nonlinear_hw``: an ``AnalogKVDecoder`` (the gain-cell K/V arrays as a ring buffer
  of sub-tiles), with the layer's per-head scalers applied around it (``AttentionCore.step``).

Positions: the learned position embedding has ``block_size`` rows. Tokens at positions
``0 .. block_size - 1`` use them as trained. POSITION POLICY beyond the context: every later token uses
the last learned position (``block_size - 1``) repeated; the model then runs beyond its trained
positions, and ``generate`` says so (a ``BeyondContextWarning``, and ``info["warnings"]``).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from gaincell.config import GenerateStage, stage_settings
from gaincell.data import check_tokenizer, load_tokenizer
from gaincell.io import atomic_write_json, atomic_write_text
from gaincell.model import GPT, POSITION_POLICY


class BeyondContextWarning(UserWarning):
    """Generation went past the model's learned positions (``block_size``)."""


def beyond_context_message(block_size: int, position: int) -> str:
    return (f"the model runs beyond its trained positions: token position {position} >= context "
            f"block_size={block_size}; policy: {POSITION_POLICY} (position {block_size - 1})")


def _check_args(idx, max_new_tokens, temperature, top_k) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        desc = f"shape {tuple(idx.shape)}, dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx ({desc}): expected int64 token ids of shape (batch, time)")
    if idx.shape[1] < 1:
        raise ValueError("idx has no tokens: expected at least one prompt token per sequence (e.g. end-of-text)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: expected a number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected a positive integer or None")


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, return_info: bool = False):
    """Continue token ids idx (B, T) by ``max_new_tokens`` tokens, one incremental step per token
    (``GPT.generate``), after checking the arguments; warns when the tokens pass the context.

    Args:
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: sample among the k most likely tokens only (None: all).
        seed: seeds sampling (and analog read noise) for reproducible output; ``generator`` instead
            passes a ``torch.Generator`` on the model's device. Neither: torch's global RNG.
        return_info: also return a dict (``warnings``, ``prompt_tokens``, ``new_tokens``, ``seconds``,
            ``tokens_per_s``, ``attention``, ``beyond_context``).

    Returns:
        (B, T + max_new_tokens) ids; with ``return_info``, ``(ids, info)``.
    """
    _check_args(idx, max_new_tokens, temperature, top_k)
    prompt_len, block_size = idx.shape[1], model.config.block_size
    fed = prompt_len + max_new_tokens - 1 if max_new_tokens else 0  # the last sampled token is not fed back
    info: Dict[str, Any] = {"warnings": [], "prompt_tokens": prompt_len, "new_tokens": max_new_tokens,
                            "attention": sorted({core.kind for core in model.attention_cores()}) if fed else []}
    if fed > block_size:
        info["warnings"].append(beyond_context_message(block_size, block_size))
        warnings.warn(info["warnings"][0], BeyondContextWarning, stacklevel=2)
    start = time.perf_counter()
    ids = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, generator=generator)
    seconds = time.perf_counter() - start
    info["seconds"] = seconds if fed else 0.0
    info["tokens_per_s"] = (fed / seconds if seconds > 0 else float("inf")) if fed else float("nan")
    info["beyond_context"] = bool(info["warnings"])
    return (ids, info) if return_info else ids


# --------------------------------------------------------------------------------------------------
# CLI stage
# --------------------------------------------------------------------------------------------------
def run(cfg) -> Dict[str, Any]:
    """``python -m gaincell generate +stage.checkpoint=<ckpt> [+stage.prompt=..] [+stage.max_new_tokens=N]
    [+stage.temperature=T] [+stage.top_k=K] [+stage.seed=S] [+stage.name=NAME] [+stage.device=cpu|cuda]
    [+stage.threads=1]`` (``GenerateStage``).

    Prints the prompt and its continuation; with ``name`` writes ``<results_dir>/samples/<name>.txt``
    (the text) and ``<name>.json`` (settings, speed, warnings). An empty prompt starts from the
    end-of-text token. The tokenizer is the one of ``cfg.data.data_dir``.
    """
    stage = stage_settings(cfg, GenerateStage)
    checkpoint = stage.checkpoint
    if not checkpoint:
        raise ValueError("generate: no checkpoint given: expected +stage.checkpoint=<path to ckpt.pt or final.pt>")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"generate: checkpoint {checkpoint} does not exist")
    prompt, max_new_tokens, temperature, top_k = stage.prompt, stage.max_new_tokens, stage.temperature, stage.top_k
    seed = cfg.seed if stage.seed is None else stage.seed
    name, threads = stage.name, stage.threads
    device = stage.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"generate: +stage.device={device} but no CUDA GPU is available here: expected cpu")
    model = GPT.from_checkpoint(str(checkpoint), map_location=device)
    model.to(device)
    tokenizer = load_tokenizer(cfg.data.data_dir)
    warning = check_tokenizer(model.tokenizer_info, tokenizer.data_dir, checkpoint, tokenizer.fingerprint)
    if warning:
        print(f"[generate] warning: {warning}")
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if not prompt_ids:
        prompt_ids = [int(tokenizer.eot_token)]
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    previous_threads = torch.get_num_threads()
    if device == "cpu":
        # One token's work is too small to split across threads; on a shared machine extra threads
        # stall waiting for each other (measured 20x slower with 2 threads under load).
        torch.set_num_threads(threads)
    try:
        ids, info = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                             return_info=True)
    finally:
        torch.set_num_threads(previous_threads)
    new_ids = ids[0, len(prompt_ids):].tolist()
    text = prompt + tokenizer.decode(new_ids)

    mc = model.config
    header = (f"[generate] {checkpoint}: attention {mc.attention}, window {mc.analog.window}, context "
              f"{mc.block_size}; {len(prompt_ids)} prompt + {len(new_ids)} new tokens, temperature "
              f"{temperature}, top_k {top_k}, seed {seed}; {info['tokens_per_s']:.1f} tokens/s on {device}")
    print(header)
    for message in info["warnings"]:
        print(f"[generate] warning: {message}")
    print(text)
    result = {"checkpoint": str(checkpoint), "attention": mc.attention, "window": mc.analog.window,
              "block_size": mc.block_size, "prompt": prompt, "prompt_tokens": len(prompt_ids),
              "new_tokens": len(new_ids), "temperature": temperature, "top_k": top_k, "seed": seed,
              "device": device, "seconds": info["seconds"], "tokens_per_s": info["tokens_per_s"],
              "beyond_context": info["beyond_context"], "position_policy": POSITION_POLICY,
              "warnings": info["warnings"], "text": text}
    if name:
        out_dir = Path(cfg.results_dir) / "samples"
        atomic_write_text(out_dir / f"{name}.txt", text + "\n")
        atomic_write_json(out_dir / f"{name}.json", result)
        print(f"[generate] wrote {out_dir / f'{name}.txt'}")
    return result


__all__ = ["generate", "run", "BeyondContextWarning"]
