"""GPT-2 with a pluggable attention core, in one readable file (after nanoGPT).

    from gaincell.model import GPT, GPTConfig
    model = GPT.from_pretrained("gpt2", attention="softmax")   # hub name or save_pretrained folder
    logits = model(idx)                                        # (B, T) int64 -> (B, T, vocab)
    logits, loss = model(idx, targets)

The module names are nanoGPT's (and so GPT-2's): ``transformer.wte``, ``.wpe``, ``.drop``,
``.h[i].ln_1``, ``.h[i].attn.c_attn``, ``.h[i].attn.c_proj``, ``.h[i].ln_2``, ``.h[i].mlp.c_fc``,
``.h[i].mlp.c_proj``, ``transformer.ln_f`` and ``lm_head`` (tied to ``wte``). Each attention layer
splits ``c_attn``'s output into (B, H, T, D) queries, keys and values and hands them to ``self.core``,
an ``AttentionCore`` that is softmax attention or one of the analog gain-cell models; ``c_proj`` follows.

Generation runs as the hardware does, one token per step with state (``start_decoding``, ``step``,
``generate``): every layer keeps a key/value cache (softmax) or the gain-cell K/V arrays (hardware
attention, ``AnalogKVDecoder``), and ``CausalSelfAttention.step`` computes one token's attention.

The token embedding may be padded to a multiple of 64 rows for speed (GPT-2's 50,257 -> 50,304, as in
the paper); the padded rows are never returned: logits and the loss cover the real vocabulary only.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gaincell.analog_projections import AnalogProjectionConfig, convert_projections, projection_config_from_dict
from gaincell.attention import AnalogAttentionConfig, AttentionCore
from gaincell.attention.config import analog_config_from_settings
from gaincell.attention.module import KINDS, split_heads

CHECKPOINT_FORMAT = "gaincell-gpt-v1"


@dataclass
class GPTConfig:
    """Shape of the network and choice of attention.

    Attributes:
        vocab_size: real vocabulary (logits have this many entries).
        block_size: context length, tokens (the learned positional embedding's rows).
        n_layer, n_head, n_embd: depth, heads per layer, width; head dim = n_embd / n_head.
        dropout: dropout probability on embeddings, attention output and MLP output.
        bias: biases in the Linear layers and LayerNorms (GPT-2: True).
        attention: ``softmax`` | ``softmax_window`` | ``linear_hw`` | ``nonlinear_hw``.
        analog: hardware knobs of the analog models; its ``window`` is also softmax_window's window.
        pad_vocab_multiple: embedding rows are padded up to a multiple of this (1: no padding).
        attention_implementation: passed to ``AttentionCore`` (auto | dense | blocked | triton).
        layer_norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
        projections: which block projections run on analog weight tiles, and how
            (``gaincell.analog_projections``; default digital: the model is unchanged).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "softmax"
    analog: AnalogAttentionConfig = field(default_factory=AnalogAttentionConfig)
    pad_vocab_multiple: int = 64
    attention_implementation: str = "auto"
    layer_norm_eps: float = 1e-5
    projections: AnalogProjectionConfig = field(default_factory=AnalogProjectionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.analog, dict):
            self.analog = analog_config_from_dict(self.analog)
        self.projections = projection_config_from_dict(self.projections)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: expected a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attention not in KINDS:
            raise ValueError(f"GPTConfig.attention={self.attention!r}: expected one of {KINDS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: expected a probability in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python form (stored in checkpoints); ``GPTConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        if d["analog"].get("coefficients") is not None:
            d["analog"]["coefficients"] = list(d["analog"]["coefficients"])
        return d


def analog_config_from_dict(d: Dict[str, Any]) -> AnalogAttentionConfig:
    """AnalogAttentionConfig from its ``asdict`` form; unknown keys are an error naming them."""
    known = set(inspect.signature(AnalogAttentionConfig).parameters)  # fields and the old name read_noise
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"analog attention config has unknown keys {unknown}; expected a subset of {sorted(known)}")
    d = dict(d)
    if d.get("coefficients") is not None:
        d["coefficients"] = tuple(float(c) for c in d["coefficients"])
    return AnalogAttentionConfig(**d)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's ``bias=False`` needs torch >= 2.1; kept explicit)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    """QKV projection -> AttentionCore on (B, H, T, D) -> output projection."""

    def __init__(self, config: GPTConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.core = AttentionCore(config.attention, config.n_head, config.analog,
                                  implementation=config.attention_implementation, layer_index=layer_index)

    def split_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, H, T, D), unscaled (the core applies its own scaling)."""
        return split_heads(self.c_attn(x), self.n_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        y = self.core(*split_heads(qkv, self.n_head), qkv=qkv)   # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def new_state(self, batch: int, context: int, max_steps: Optional[int] = None, device=None, dtype=None,
                  generator: Optional[torch.Generator] = None):
        """This layer's decoding state (KV cache or gain-cell arrays) for ``step``."""
        return self.core.new_state(batch, self.n_embd // self.n_head, context, max_steps, device, dtype, generator)

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        """One token per sequence, x (B, C) -> (B, C): ``forward`` at the newest position, the earlier
        tokens held by ``state`` (from ``new_state``), which is advanced."""
        q, k, v = self.split_heads(x.unsqueeze(1))             # (B, H, 1, D)
        y = self.core.step(q, k, v, state)                      # (B, H, 1, D)
        return self.resid_dropout(self.c_proj(y.reshape(x.shape)))

    def prefill(self, x: torch.Tensor, state) -> torch.Tensor:
        """T tokens per sequence at once, x (B, T, C) -> (B, T, C): T calls of ``step`` (state advanced)."""
        B, T, C = x.shape
        y = self.core.prefill(*self.split_heads(x), state)     # (B, H, T, D)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        """One token per sequence, x (B, C) -> (B, C) (see ``CausalSelfAttention.step``)."""
        x = x + self.attn.step(self.ln_1(x), state)
        return x + self.mlp(self.ln_2(x))

    def prefill(self, x: torch.Tensor, state) -> torch.Tensor:
        """T tokens per sequence at once, x (B, T, C) -> (B, T, C) (see ``CausalSelfAttention.prefill``)."""
        x = x + self.attn.prefill(self.ln_1(x), state)
        return x + self.mlp(self.ln_2(x))


# Past the context, every token takes the last learned position embedding (see ``GPT.step``).
POSITION_POLICY = "last learned position repeated"


@dataclass
class DecodingState:
    """Every layer's attention state of a batch decoded one token at a time (``GPT.start_decoding``),
    and the position of the next token."""

    layers: List[Any]
    position: int = 0

    def check_finite(self) -> None:
        """Raise ValueError if an analog layer's attention inputs held NaN (one host synchronisation per
        analog layer: call it once per prompt, not per step)."""
        for layer in self.layers:
            layer.check_finite()


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


class GPT(nn.Module):
    """GPT-2 language model; see the module docstring for the API."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer_info: Optional[Dict[str, Any]] = None  # set from a checkpoint (gaincell.data records)
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer_index) for layer_index in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():  # padded rows: never predicted, never embedded
            self.transformer.wte.weight[config.vocab_size:].zero_()
        convert_projections(self, config.projections)  # analog weight tiles, if configured

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token one is tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """idx (B, T) token ids -> logits (B, T, vocab_size); with targets (B, T) also the mean
        next-token cross-entropy (targets == -1 are ignored): returns (logits, loss)."""
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: expected (batch, time)")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    def attention_cores(self) -> List[AttentionCore]:
        """Every layer's AttentionCore, first layer first."""
        return [block.attn.core for block in self.transformer.h]

    def set_attention(self, kind: str, analog_cfg: Optional[AnalogAttentionConfig] = None) -> None:
        """Switch every layer's attention model in place (weights and scalers are kept)."""
        for core in self.attention_cores():
            core.set_kind(kind, analog_cfg)
        self.config.attention = kind
        if analog_cfg is not None:
            self.config.analog = analog_cfg

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context (fewer positional embeddings), e.g. to fine-tune GPT-2 at 256 tokens."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size={block_size}: expected 1..{self.config.block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    # ------------------------------------------------------------------------------------------------
    # token-by-token decoding, as the hardware runs (one token's forward pass per step, with state)
    # ------------------------------------------------------------------------------------------------
    def start_decoding(self, batch: int, max_steps: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> "DecodingState":
        """Empty attention states of every layer for decoding ``batch`` sequences with ``step``.

        ``generator`` draws the analog readout noise (when ``readout_noise > 0``; None: each layer's own
        stream); ``max_steps`` optionally limits the tokens the analog arrays may consume."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r}: expected a positive integer")
        weight = self.transformer.wte.weight
        return DecodingState([block.attn.new_state(batch, self.config.block_size, max_steps, weight.device,
                                                   weight.dtype, generator) for block in self.transformer.h])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: "DecodingState") -> torch.Tensor:
        """Consume one token per sequence, ids (B,) at position ``state.position``; return the next-token
        logits (B, vocab_size), equal to ``forward``'s at that position within the context. Past the
        context every token takes the last learned position (``POSITION_POLICY``)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected (batch,), one id per sequence")
        device = self.transformer.wte.weight.device
        position = min(state.position, self.config.block_size - 1)
        pos = torch.full(tokens.shape, position, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(tokens.to(device)) + self.transformer.wpe(pos))
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block.step(x, layer_state)
        state.position += 1
        return self.lm_head(self.transformer.ln_f(x))[..., : self.config.vocab_size]

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, state: "DecodingState") -> torch.Tensor:
        """Consume a prompt, ids (B, T), at positions ``state.position ..`` at once: what T calls of
        ``step`` do (the same state; the analog arrays' outputs exactly, ``AnalogKVDecoder.prefill``),
        with the rest of the network batched over the prompt. Returns the logits after its last token
        (B, vocab_size)."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: expected (batch, T >= 1) token ids")
        device = self.transformer.wte.weight.device
        count = idx.shape[1]
        pos = torch.clamp(torch.arange(state.position, state.position + count, device=device),
                          max=self.config.block_size - 1)  # POSITION_POLICY past the context
        x = self.transformer.drop(self.transformer.wte(idx.to(device)) + self.transformer.wpe(pos))
        for block, layer_state in zip(self.transformer.h, state.layers):
            x = block.prefill(x, layer_state)
        state.position += count
        return self.lm_head(self.transformer.ln_f(x[:, -1]))[..., : self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue idx (B, T) by ``max_new_tokens`` sampled tokens -> (B, T + max_new_tokens).

        The prompt goes in at once (``prefill``: the K/V arrays written as token by token, with the
        same outputs), then one ``step`` per new token; prompts and generations may be longer than
        the window and the context. (With readout noise and one shared ``generator`` the layers draw
        in another order than when stepping the prompt: the same statistics.) ``temperature=0`` is greedy;
        ``seed`` (or a ``generator`` on the model's device) makes sampling and readout noise
        reproducible. ``gaincell.generate.generate`` adds argument checks, warnings and timing.
        """
        if max_new_tokens == 0:
            return idx
        device = self.transformer.wte.weight.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            idx = idx.to(device)
            state = self.start_decoding(idx.shape[0], generator=generator)
            logits = self.prefill(idx, state)  # the prompt at once (the arrays as token by token)
            state.check_finite()  # once per prompt: a NaN would poison a whole window
            for i in range(max_new_tokens):
                next_id = sample_next(logits, temperature, top_k, generator)
                idx = torch.cat((idx, next_id), dim=1)
                if i < max_new_tokens - 1:  # the last sampled token is not fed back
                    logits = self.step(next_id[:, 0], state)
            state.check_finite()
        finally:
            self.train(was_training)
        return idx

    @torch.no_grad()
    def generate_recompute(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                           top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reference sampler: full forward pass over the last block_size tokens for each new token.
        ``temperature=0`` picks the most likely token."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :]
            idx = torch.cat((idx, sample_next(logits, temperature, top_k, generator)), dim=1)
        return idx

    # ------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """What ``from_checkpoint`` needs: the config and the weights (and the tokenizer record, if known)."""
        state = {"format": CHECKPOINT_FORMAT, "model_config": self.config.to_dict(), "model": self.state_dict()}
        if self.tokenizer_info:
            state["tokenizer"] = self.tokenizer_info
        return state

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], map_location: Any = "cpu",
                        attention: Optional[str] = None,
                        analog_cfg: Optional[AnalogAttentionConfig] = None) -> "GPT":
        """Load a model saved by the trainer (``ckpt.pt`` / ``final.pt``) or ``checkpoint_state``.

        ``attention``/``analog_cfg`` switch the attention after loading (weights are kept).
        """
        ckpt = load_checkpoint_file(path, map_location)
        model = model_from_checkpoint_dict(ckpt, path)
        if attention is not None:
            model.set_attention(attention, analog_cfg)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], attention: str = "softmax",
                        analog_cfg: Optional[AnalogAttentionConfig] = None, **overrides: Any) -> "GPT":
        """GPT-2 weights from Hugging Face ``transformers`` (hub name such as ``gpt2`` or a folder
        written by ``save_pretrained``), with the attention chosen here (``overrides``: e.g.
        ``dropout=0.1``, ``pad_vocab_multiple=1``)."""
        from transformers import GPT2LMHeadModel

        try:
            hf = GPT2LMHeadModel.from_pretrained(str(name_or_path))
        except Exception as exc:
            raise OSError(f"cannot load GPT-2 weights from {str(name_or_path)!r} with transformers: {exc}") from exc
        hf_cfg = hf.config
        unsupported = {
            "activation_function": (hf_cfg.activation_function, ("gelu_new", "gelu_pytorch_tanh")),
            "scale_attn_weights": (hf_cfg.scale_attn_weights, (True,)),
            "scale_attn_by_inverse_layer_idx": (hf_cfg.scale_attn_by_inverse_layer_idx, (False,)),
        }
        for key, (value, allowed) in unsupported.items():
            if value not in allowed:
                raise ValueError(f"{name_or_path}: config {key}={value!r} is not supported (expected one of {allowed})")
        cfg = GPTConfig(vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.n_positions, n_layer=hf_cfg.n_layer,
                        n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd, bias=True, attention=attention,
                        analog=analog_cfg if analog_cfg is not None else AnalogAttentionConfig(),
                        layer_norm_eps=hf_cfg.layer_norm_epsilon, dropout=0.0)
        cfg = dataclasses.replace(cfg, **overrides)
        model = cls(cfg)
        model.load_hf_gpt2_state_dict(hf.state_dict())
        return model

    @torch.no_grad()
    def load_hf_gpt2_state_dict(self, hf_sd: Dict[str, torch.Tensor]) -> None:
        """Copy a transformers GPT2LMHeadModel state dict in (its Conv1D weights are transposed)."""
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        own = self.state_dict()
        hf_sd = {k: v for k, v in hf_sd.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        expected = {k for k in own if k != "lm_head.weight" and ".core." not in k}
        missing = sorted(expected - set(hf_sd))
        extra = sorted(set(hf_sd) - expected)
        if missing or extra:
            raise ValueError(f"GPT-2 state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in hf_sd.items():
            target = own[k]
            if k.endswith(transposed):
                v = v.t()
            if k == "transformer.wte.weight":
                target.zero_()
                target[: v.shape[0]].copy_(v)
                continue
            if v.shape != target.shape:
                raise ValueError(f"GPT-2 weight {k}: shape {tuple(v.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(v)


# ----------------------------------------------------------------------------------------------------
# checkpoint files
# ----------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit what is asked of it."""


def load_checkpoint_file(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    """torch.load a checkpoint with a clear error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if "cuda" in str(map_location) and not torch.cuda.is_available():  # not a corrupt file: no GPU here
        raise RuntimeError(f"cannot load checkpoint {path} onto {map_location}: no CUDA GPU is available "
                           f"here (expected device cpu)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, not a torch file, ...
        if "CUDA" in str(exc) and not torch.cuda.is_available():
            raise RuntimeError(f"cannot load checkpoint {path}: it asks for a CUDA GPU and none is available "
                               f"here ({exc}); load it with map_location='cpu'") from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} is not a gaincell GPT checkpoint "
                              f"(expected keys 'model' and 'model_config', found {keys})")
    return ckpt


def _strip_wrapper_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_from_checkpoint_dict(ckpt: Dict[str, Any], path: Union[str, Path] = "<memory>") -> GPT:
    """Build the GPT a checkpoint describes and load its weights, naming any mismatch."""
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid model_config: {exc}") from exc
    model = GPT(config)
    load_model_weights(model, ckpt["model"], path)
    # The tokenizer the weights were trained with (gaincell.data.tokenizer_fingerprint), for the checks
    # of evaluate/generate; carried into checkpoints written from this model.
    model.tokenizer_info = ckpt.get("tokenizer")
    return model


def load_model_weights(model: GPT, state_dict: Dict[str, torch.Tensor], path: Union[str, Path] = "<memory>") -> None:
    """Strict load with an error naming the file and the first mismatching keys or shapes."""
    sd = _strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing keys {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"checkpoint {path}: weight {k} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


def config_from_settings(model_section: Any, attention_section: Any, vocab_size: int) -> GPTConfig:
    """GPTConfig from the Hydra ``model`` and ``attention`` sections (and the data's vocabulary)."""
    m = model_section
    return GPTConfig(vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd, dropout=m.dropout, bias=m.bias, attention=str(attention_section.kind),
                     analog=analog_config_from_settings(attention_section), pad_vocab_multiple=m.pad_vocab_multiple,
                     attention_implementation=str(attention_section.implementation))


__all__ = ["GPT", "GPTConfig", "CheckpointError", "load_checkpoint_file", "model_from_checkpoint_dict",
           "load_model_weights", "config_from_settings"]
