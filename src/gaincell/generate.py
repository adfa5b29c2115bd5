"""Token-by-token generation, as the hardware runs: one token's forward pass per step, with state.

    from gaincell.generate import generate
    out = generate(model, idx, max_new_tokens=200, temperature=0.8, top_k=50, seed=0)   # (B, T + N)

and the CLI stage (prints the text; ``+stage.name`` also writes ``results/<profile>/samples/<name>.txt``
and a ``<name>.json`` with the settings and speed):

    python -m gaincell generate +stage.checkpoint=results/tiny/checkpoints/linear/final.pt \\
        +stage.prompt="ROMEO:" +stage.max_new_tokens=200 +stage.temperature=0.8 +stage.top_k=50 +stage.seed=0

The incremental forward pass is built from the model's nanoGPT submodules (``transformer.wte``,
``wpe``, ``h[i].ln_1``, ``h[i].attn.c_attn``, ``h[i].attn.core``, ``h[i].attn.c_proj``, ``ln_2``,
``mlp``, ``transformer.ln_f``, ``lm_head``). Per layer, the attention state is:

* ``softmax``: the usual key/value cache, holding the last ``block_size`` tokens (the longest history
  the model was trained with; within the context this is the whole history);
* ``softmax_window``: the last ``window`` tokens;
* ``linear_hw`` / ``nonlinear_hw``: an ``AnalogKVDecoder`` (the gain-cell K/V arrays as a ring buffer
  of sub-tiles, spec analog-attention.md §6), with the layer's per-head scalers applied around it.

Positions: the learned position embedding has ``block_size`` rows. Tokens at positions
``0 .. block_size - 1`` use them as trained. POSITION POLICY beyond the context: every later token uses
the last learned position (``block_size - 1``) repeated; the model then runs beyond its trained
positions, and ``generate`` says so (a ``BeyondContextWarning``, and ``info["warnings"]``).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from gaincell.attention import AnalogKVDecoder
from gaincell.attention.module import HW_KINDS

POSITION_POLICY = "last learned position repeated"


class BeyondContextWarning(UserWarning):
    """Generation went past the model's learned positions (``block_size``)."""


def beyond_context_message(block_size: int, position: int) -> str:
    return (f"the model runs beyond its trained positions: token position {position} >= context "
            f"block_size={block_size}; policy: {POSITION_POLICY} (position {block_size - 1})")


class _SoftmaxCache:
    """Key/value ring buffer of ``capacity`` tokens for one softmax layer, (B, H, capacity, D)."""

    def __init__(self, capacity: int, batch: int, heads: int, head_dim: int, device, dtype) -> None:
        self.capacity = capacity
        self.k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.steps = 0

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slot = self.steps % self.capacity
        self.k[:, :, slot], self.v[:, :, slot] = k, v
        self.steps += 1
        filled = min(self.steps, self.capacity)
        # Every cached key is in the past or present of the query: no mask. The order of the keys in
        # the buffer does not change softmax attention.
        return F.scaled_dot_product_attention(q.unsqueeze(2), self.k[:, :, :filled],
                                              self.v[:, :, :filled]).squeeze(2)


class IncrementalGPT:
    """A ``gaincell.model.GPT`` run one token per step for a batch of sequences.

    ``step(tokens)`` takes token ids (B,) at the next position and returns the next-token logits
    (B, vocab_size). The attention kind of every layer is read once, when this object is built.

    Args:
        model: the GPT (put in eval mode by the caller; dropout would make steps random).
        batch: sequences decoded together.
        max_steps: optional limit on tokens consumed (passed to the analog decoders).
        generator: draws the analog readout noise (only when the config has ``readout_noise > 0``;
            None: each layer's own noise stream, ``gaincell.attention.noise``).
    """

    def __init__(self, model, batch: int, max_steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r}: expected a positive integer")
        self.model = model
        self.batch = batch
        self.config = model.config
        self.block_size = int(model.config.block_size)
        self.n_head = int(model.config.n_head)
        self.n_embd = int(model.config.n_embd)
        self.head_dim = self.n_embd // self.n_head
        self.vocab_size = int(model.config.vocab_size)
        self.max_steps = max_steps
        weight = model.transformer.wte.weight
        device, dtype = weight.device, weight.dtype
        self.states: List[Any] = []
        self.kinds: List[str] = []
        for block in model.transformer.h:
            core = block.attn.core
            if core.n_head != self.n_head:
                raise ValueError(f"attention core has n_head={core.n_head}, the model config n_head={self.n_head}")
            if core.kind in HW_KINDS:
                state = AnalogKVDecoder(core.layer_analog, batch=batch, heads=self.n_head, head_dim=self.head_dim,
                                        max_steps=max_steps, device=device, dtype=dtype, generator=generator)
            elif core.kind == "softmax_window":
                state = _SoftmaxCache(core.analog.window, batch, self.n_head, self.head_dim, device, dtype)
            elif core.kind == "softmax":
                state = _SoftmaxCache(self.block_size, batch, self.n_head, self.head_dim, device, dtype)
            else:  # pragma: no cover - AttentionCore validates its kind
                raise ValueError(f"attention kind {core.kind!r}: no incremental form")
            self.states.append(state)
            self.kinds.append(core.kind)
        self.position = 0  # position of the next token
        self.device = device

    def check_finite(self) -> None:
        """Raise ValueError if an analog layer's attention inputs held NaN (reads each decoder's device
        flag: one host synchronisation, so call it once per prompt, not per step)."""
        for state in self.states:
            if isinstance(state, AnalogKVDecoder):
                state.check_finite()

    @property
    def beyond_context(self) -> bool:
        """Whether a token past the learned positions has been consumed."""
        return self.position > self.block_size

    def _attention(self, layer: int, block, x: torch.Tensor) -> torch.Tensor:
        """One layer's attention for one token: x (B, C) after ln_1 -> (B, C) after c_proj."""
        attn = block.attn
        q, k, v = attn.c_attn(x).split(self.n_embd, dim=-1)
        shape = (self.batch, self.n_head, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        state = self.states[layer]
        if self.kinds[layer] in HW_KINDS:
            core = attn.core
            y = self._scaled(core, "out", state.step(self._scaled(core, "q", q), self._scaled(core, "k", k),
                                                     self._scaled(core, "v", v)))
        else:
            y = state.step(q, k, v)
        # (B, H, D) -> (B, C): the head-major concatenation of the parallel forward.
        return attn.resid_dropout(attn.c_proj(y.reshape(self.batch, self.n_embd)))

    def _scaled(self, core, stage: str, t: torch.Tensor) -> torch.Tensor:
        """A hardware core's scaler (spec §1 / §7), per head, on (B, H, ...) tensors."""
        shape = (1, -1) + (1,) * (t.dim() - 2)
        a = getattr(core, f"{stage}_scale").view(shape).to(t.dtype)
        b = getattr(core, f"{stage}_bias").view(shape).to(t.dtype)
        return a * t + b

    def _attention_prompt(self, layer: int, block, x: torch.Tensor) -> torch.Tensor:
        """One layer's attention for T prompt tokens at once: x (B, T, C) after ln_1 -> (B, T, C)."""
        attn = block.attn
        tokens = x.shape[1]
        q, k, v = attn.split_heads(x)                                  # (B, H, T, D) each
        state = self.states[layer]
        if self.kinds[layer] in HW_KINDS:
            core = attn.core
            y = self._scaled(core, "out", state.prefill(self._scaled(core, "q", q), self._scaled(core, "k", k),
                                                        self._scaled(core, "v", v)))
        else:  # the softmax caches: token by token (their step is one fused kernel)
            y = torch.stack([state.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)
        return attn.resid_dropout(attn.c_proj(y.transpose(1, 2).reshape(self.batch, tokens, self.n_embd)))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume a prompt, ids (B, T), at once: the transformer runs on all T positions together and
        each analog layer's arrays take the prompt with ``AnalogKVDecoder.prefill`` (exactly the outputs
        of stepping it token by token). Returns the logits after the last prompt token (B, vocab_size).
        The state is that of T calls of ``step``; positions past the context follow POSITION_POLICY."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected ({self.batch}, T >= 1)")
        tf = self.model.transformer
        count = tokens.shape[1]
        positions = torch.clamp(torch.arange(self.position, self.position + count, device=self.device),
                                max=self.block_size - 1)
        x = tf.drop(tf.wte(tokens.to(self.device)) + tf.wpe(positions))
        for layer, block in enumerate(tf.h):
            x = x + self._attention_prompt(layer, block, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        self.position += count
        return self.model.lm_head(tf.ln_f(x[:, -1]))[..., : self.vocab_size]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume one token per sequence, ids (B,); return next-token logits (B, vocab_size)."""
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected ({self.batch},), one id per sequence")
        tf = self.model.transformer
        position = min(self.position, self.block_size - 1)  # POSITION_POLICY past the context
        pos = torch.full((self.batch,), position, dtype=torch.long, device=self.device)
        x = tf.drop(tf.wte(tokens.to(self.device)) + tf.wpe(pos))
        for layer, block in enumerate(tf.h):
            x = x + self._attention(layer, block, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        self.position += 1
        return self.model.lm_head(tf.ln_f(x))[..., : self.vocab_size]


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next ids (B, 1) from logits (B, V): greedy for temperature 0, else top-k softmax sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


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


def _warn_beyond_context(info: Dict[str, Any], block_size: int, position: int) -> None:
    message = beyond_context_message(block_size, position)
    info["warnings"].append(message)
    warnings.warn(message, BeyondContextWarning, stacklevel=4)  # past generate and torch.no_grad's wrapper


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, return_info: bool = False):
    """Continue token ids idx (B, T) by ``max_new_tokens`` tokens, one incremental step per token.

    The prompt goes in at once (``IncrementalGPT.prefill``: the analog K/V arrays are written as token
    by token, with the same outputs), then one step per new token; prompts and generations may be
    longer than the window and than the context (see the module's position policy). With readout
    noise and a shared ``generator`` the layers draw in another order than stepping token by token
    (same statistics).

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
    if max_new_tokens == 0:
        info0 = {"warnings": [], "prompt_tokens": idx.shape[1], "new_tokens": 0, "seconds": 0.0,
                 "tokens_per_s": float("nan"), "beyond_context": False, "attention": []}
        return (idx, info0) if return_info else idx
    device = model.transformer.wte.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    batch, prompt_len = idx.shape
    block_size = int(model.config.block_size)
    info: Dict[str, Any] = {"warnings": [], "prompt_tokens": prompt_len, "new_tokens": max_new_tokens}
    try:
        state = IncrementalGPT(model, batch, generator=generator)
        info["attention"] = sorted(set(state.kinds))
        idx = idx.to(device)
        out = [idx]
        start = time.perf_counter()
        total = prompt_len + max_new_tokens
        if prompt_len > block_size:
            _warn_beyond_context(info, block_size, block_size)
        logits = state.prefill(idx)  # the prompt at once (the analog arrays exactly as token by token)
        state.check_finite()  # once per prompt: a NaN would poison a whole window
        out.append(sample_next(logits, temperature, top_k, generator))
        for _ in range(max_new_tokens - 1):  # the last sampled token is not fed back
            if state.position == block_size and not info["warnings"]:
                _warn_beyond_context(info, block_size, state.position)
            out.append(sample_next(state.step(out[-1][:, 0]), temperature, top_k, generator))
        state.check_finite()
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    info["seconds"] = seconds
    info["tokens_per_s"] = (total - 1) / seconds if seconds > 0 else float("inf")
    info["beyond_context"] = bool(info["warnings"])
    ids = torch.cat(out, dim=1)
    return (ids, info) if return_info else ids


# --------------------------------------------------------------------------------------------------
# CLI stage
# --------------------------------------------------------------------------------------------------
def _stage_value(cfg, key: str, default: Any = None) -> Any:
    stage = cfg.get("stage") if hasattr(cfg, "get") else None
    if stage is None:
        return default
    value = stage.get(key, default) if hasattr(stage, "get") else default
    return default if value is None else value


def run(cfg) -> Dict[str, Any]:
    """``python -m gaincell generate +stage.checkpoint=<ckpt> [+stage.prompt=..] [+stage.max_new_tokens=N]
    [+stage.temperature=T] [+stage.top_k=K] [+stage.seed=S] [+stage.name=NAME] [+stage.device=cpu|cuda]
    [+stage.threads=1]``.

    Prints the prompt and its continuation; with ``name`` writes ``<results_dir>/samples/<name>.txt``
    (the text) and ``<name>.json`` (settings, speed, warnings). An empty prompt starts from the
    end-of-text token. The tokenizer is the one of ``cfg.data.data_dir``.
    """
    from gaincell.data import check_tokenizer, load_tokenizer
    from gaincell.io import atomic_write_json, atomic_write_text
    from gaincell.model import GPT

    checkpoint = _stage_value(cfg, "checkpoint")
    if not checkpoint:
        raise ValueError("generate: no checkpoint given: expected +stage.checkpoint=<path to ckpt.pt or final.pt>")
    if not Path(str(checkpoint)).is_file():
        raise FileNotFoundError(f"generate: checkpoint {checkpoint} does not exist")
    prompt = str(_stage_value(cfg, "prompt", ""))
    max_new_tokens = int(_stage_value(cfg, "max_new_tokens", 200))
    temperature = float(_stage_value(cfg, "temperature", 1.0))
    top_k = _stage_value(cfg, "top_k")
    top_k = None if top_k in (None, "", "null", "None") else int(top_k)
    seed = _stage_value(cfg, "seed", int(cfg.seed) if "seed" in cfg else None)
    seed = None if seed is None else int(seed)
    name = _stage_value(cfg, "name")
    device = str(_stage_value(cfg, "device", "cuda" if torch.cuda.is_available() else "cpu"))
    threads = int(_stage_value(cfg, "threads", 1))

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"generate: +stage.device={device} but no CUDA GPU is available here: expected cpu")
    model = GPT.from_checkpoint(str(checkpoint), map_location=device)
    model.to(device)
    tokenizer = load_tokenizer(Path(str(cfg.data.data_dir)))
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
        out_dir = Path(str(cfg.results_dir)) / "samples"
        atomic_write_text(out_dir / f"{name}.txt", text + "\n")
        atomic_write_json(out_dir / f"{name}.json", result)
        print(f"[generate] wrote {out_dir / f'{name}.txt'}")
    return result


__all__ = ["generate", "run", "IncrementalGPT", "BeyondContextWarning", "POSITION_POLICY", "sample_next"]
