"""Our GPT as an lm-evaluation-harness model (``lm_eval.api.model.LM``), registered as ``gaincell``.

The harness asks three things of a model; all are answered from ``model(idx) -> logits (B, T, vocab)``:

* ``loglikelihood``: log P(continuation | context) and whether greedy decoding would produce it;
* ``loglikelihood_rolling``: log P(document) for perplexity, the document scored from the end-of-text
  token with no truncation;
* ``generate_until``: greedy generation until a stop string.

Sequences longer than the model's context (``block_size``) are scored in windows (see
:func:`plan_windows`): every target token is scored exactly once, each window holds at most
``block_size`` input tokens, and a window after the first newly scores at most ``stride`` tokens, so
each of them sees at least ``block_size - stride + 1`` tokens of context. ``stride = block_size`` is
the harness's own scheme for Hugging Face models (disjoint windows); ``stride = 1`` is the exact
sliding window (one forward pass per token). All windows of all requests are sorted by length and
run in batches of ``batch_size``, right-padded (padding after a causal sequence changes nothing before it).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gaincell.data import check_tokenizer, load_tokenizer
from gaincell.model import GPT

log = logging.getLogger(__name__)

Window = Tuple[int, int, int]  # (input_start, target_start, target_end) indices into one token list


def plan_windows(n_tokens: int, first_target: int, max_length: int, stride: int) -> List[Window]:
    """Windows that score tokens ``seq[first_target:n_tokens]`` of a sequence ``seq`` of ``n_tokens``.

    Each window ``(a, t, e)`` feeds ``seq[a:e-1]`` (at most ``max_length`` tokens) to the model and
    scores its last ``e - t`` predictions, i.e. targets ``seq[t:e]``. The first window scores as many
    targets as fit with all of their preceding tokens; later ones score ``stride`` targets each (the
    last one fewer) with a full ``max_length`` input, so each target sees at least
    ``max_length - stride + 1`` tokens of context. Targets are covered once, in order.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: expected a positive context length in tokens")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride}: expected 1 <= stride <= max_length={max_length}")
    if first_target < 1:
        raise ValueError(f"first_target={first_target}: the first scored token needs >= 1 token of context")
    windows: List[Window] = []
    t = first_target
    while t < n_tokens:
        n_pred = min(n_tokens - t, max(stride, max_length + 1 - t))
        start = max(0, t + n_pred - 1 - max_length)
        windows.append((start, t, t + n_pred))
        t += n_pred
    return windows


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval device={device!r} but CUDA is not available; expected cpu or auto")
    return torch.device(device)


def _check_tokenizer(model: Any, tokenizer: Any, source: str) -> None:
    """A checkpoint's recorded tokenizer must be the data folder's (``TokenizerMismatch`` otherwise): a
    retrained tokenizer of the same size scores garbage without any other error. Checked when the
    tokenizer comes from a data folder (``load_tokenizer``) and the model from a gaincell checkpoint."""
    current = getattr(tokenizer, "fingerprint", None)
    if current is None or not hasattr(model, "tokenizer_info"):
        return

    warning = check_tokenizer(model.tokenizer_info, tokenizer.data_dir, source, current)
    if warning:
        log.warning(warning)


@register_model("gaincell")
class GaincellLM(TemplateLM):
    """lm-eval model wrapping a ``gaincell.model.GPT`` (or any module with the same contract).

    Args:
        model: the network: ``model(idx)`` maps (B, T) token ids to (B, T, vocab) logits and
            ``model.config.block_size`` is its context length in tokens. A string is read as a
            checkpoint path (``GPT.from_checkpoint``).
        tokenizer: object with ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and
            ``eot_token``; a string is read as a data folder (``gaincell.data.load_tokenizer``).
        batch_size: windows per forward pass.
        device: ``auto`` | ``cpu`` | ``cuda[:n]``.
        dtype: ``auto`` (bfloat16 autocast on CUDA, float32 on CPU) | ``float32`` | ``bfloat16``.
            Log-probabilities are taken in float32, or float64 when the model's logits are float64.
        max_length: context in tokens (default ``model.config.block_size``).
        stride: tokens newly scored per window after the first (default ``max_length``: the
            harness's disjoint windows). See :func:`plan_windows`.
        max_gen_toks: default cap on generated tokens for ``generate_until``.
    """

    backend = "causal"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, device: str = "auto",
                 dtype: str = "auto", max_length: Optional[int] = None, stride: Optional[int] = None,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        self._device = resolve_device(str(device))
        source = model if isinstance(model, str) else "the model"
        if isinstance(model, str):
            model = GPT.from_checkpoint(model, map_location=str(self._device))
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        _check_tokenizer(model, tokenizer, source)
        self.model = model.to(self._device).eval()
        self.tokenizer_obj = tokenizer
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        model_vocab = getattr(model.config, "vocab_size", None)
        if tok_vocab is not None and model_vocab is not None and int(tok_vocab) > int(model_vocab):
            raise ValueError(f"tokenizer has {tok_vocab} tokens but the model's vocab_size is {model_vocab}: "
                             f"expected the tokenizer the model was trained with (data.data_dir)")
        block_size = int(model.config.block_size)
        self._max_length = int(max_length) if max_length else block_size
        if self._max_length > block_size:
            raise ValueError(f"max_length={self._max_length} exceeds the model's block_size={block_size}")
        self.stride = int(stride) if stride else self._max_length
        if not 1 <= self.stride <= self._max_length:
            raise ValueError(f"stride={self.stride}: expected 1 <= stride <= max_length={self._max_length}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype={dtype!r}: expected auto, float32 or bfloat16")
        use_bf16 = dtype == "bfloat16" or (dtype == "auto" and self._device.type == "cuda")
        self._autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.max_gen_toks = int(max_gen_toks)
        # Counters for tests and logs: forward passes and windows run.
        self.forward_calls = 0
        self.windows_scored = 0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """``lm_eval`` style ``model_args``: ``checkpoint=PATH,data_dir=DIR[,batch_size=..]``."""
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        """The harness's CLI form (``--model_args checkpoint=PATH data_dir=DIR``, parsed to a dict) plus its
        ``--batch_size`` / ``--device``; keys the wrapper has no use for (``max_batch_size``) are dropped."""
        args = dict(arg_dict)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        if "checkpoint" not in args or "data_dir" not in args:
            raise ValueError(f"gaincell model_args {arg_dict!r}: expected checkpoint=PATH,data_dir=DIR")
        model = str(args.pop("checkpoint"))
        tokenizer = str(args.pop("data_dir"))
        if str(args.get("batch_size", "")).startswith("auto"):
            args.pop("batch_size")  # no automatic batch sizing: the default
        args = {k: v for k, v in args.items() if k in
                ("batch_size", "device", "dtype", "max_length", "stride", "max_gen_toks")}
        for key in ("batch_size", "max_length", "stride", "max_gen_toks"):
            if key in args:
                args[key] = int(args[key])
        return cls(model, tokenizer, **args)

    # ------------------------------------------------------------------ harness properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer_obj.eot_token)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer_obj).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.tokenizer_obj.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_obj.decode(list(tokens))

    # ------------------------------------------------------------------ scoring core
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for a (B, T) batch, under autocast if asked."""
        self.forward_calls += 1
        with torch.inference_mode():
            if self._autocast_dtype is not None:
                with torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype):
                    return self.model(batch)
            return self.model(batch)

    def score_sequences(self, sequences: Sequence[Tuple[Sequence[int], int]],
                        disable_tqdm: bool = False, desc: str = "scoring") -> List[Tuple[float, bool]]:
        """For each ``(tokens, first_target)``: (sum of log P(tokens[i] | tokens[:i]) over
        ``i >= first_target``, whether every such token is the model's argmax), windowed and batched."""
        work: List[Tuple[int, List[int], int]] = []  # (sequence index, window input ids, targets scored)
        targets: List[List[int]] = []
        for index, (tokens, first_target) in enumerate(sequences):
            tokens = list(tokens)
            for start, t, end in plan_windows(len(tokens), first_target, self._max_length, self.stride):
                work.append((index, tokens[start:end - 1], len(targets)))
                targets.append(tokens[t:end])
        totals = [0.0] * len(sequences)
        greedy = [True] * len(sequences)
        # Longest first: a batch pads to its first row, and memory trouble shows at once.
        order = sorted(range(len(work)), key=lambda i: -len(work[i][1]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch_ids in tqdm(batches, desc=desc, disable=disable_tqdm or len(batches) < 2):
            width = len(work[batch_ids[0]][1])
            batch = torch.zeros((len(batch_ids), width), dtype=torch.long)
            for row, wi in enumerate(batch_ids):
                inp = work[wi][1]
                batch[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self._forward(batch.to(self._device))
            for row, wi in enumerate(batch_ids):
                index, inp, ti = work[wi]
                tgt = targets[ti]
                # The last len(tgt) positions of this row's input predict the targets.
                row_logits = logits[row, len(inp) - len(tgt):len(inp)]
                if row_logits.dtype != torch.float64:  # at least float32 (bf16 autocast logits widened)
                    row_logits = row_logits.float()
                logprobs = F.log_softmax(row_logits, dim=-1)
                tgt_t = torch.tensor(tgt, dtype=torch.long, device=logprobs.device)
                totals[index] += float(logprobs.gather(-1, tgt_t[:, None]).sum())
                greedy[index] = greedy[index] and bool((logprobs.argmax(-1) == tgt_t).all())
            self.windows_scored += len(batch_ids)
        return list(zip(totals, greedy))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        sequences = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc:
                raise ValueError("loglikelihood: empty context after tokenization (expected the "
                                 "harness to insert the end-of-text prefix token)")
            sequences.append((list(context_enc) + list(continuation_enc), len(context_enc)))
        results = self.score_sequences(sequences, disable_tqdm=disable_tqdm, desc="loglikelihood")
        for (pair, _, _), answer in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        sequences = []
        for request in requests:
            (text,) = request.args[:1]
            sequences.append(([self.prefix_token_id] + self.tok_encode(text), 1))
        results = self.score_sequences(sequences, disable_tqdm=disable_tqdm, desc="loglikelihood_rolling")
        out = []
        for request, (total, _) in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy decoding; requests with equal (truncated) context length and settings share a batch."""
        prepared = []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = gen_kwargs.pop("until", None)
            if isinstance(until, str):
                until = [until]
            until = list(until or [])
            eot_text = self.tok_decode([self.eot_token_id])
            if eot_text and eot_text not in until:
                until.append(eot_text)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0)) > 0:
                log.warning("generate_until: sampling requested (%s); decoding greedily", gen_kwargs)
            ctx = self.tok_encode(context) if context else [self.prefix_token_id]
            # Keep room for the generated tokens inside the context, as the harness's HF model does.
            keep = max(1, self._max_length - max_new)
            prepared.append((ctx[-keep:], until, max_new))
        outputs: List[Optional[str]] = [None] * len(prepared)
        groups: Dict[Tuple[int, Tuple[str, ...], int], List[int]] = {}
        for i, (ctx, until, max_new) in enumerate(prepared):
            groups.setdefault((len(ctx), tuple(until), max_new), []).append(i)
        chunks = []
        for key, ids in groups.items():
            chunks += [(key, ids[j:j + self.batch_size]) for j in range(0, len(ids), self.batch_size)]
        for (_, until, max_new), ids in tqdm(chunks, desc="generate_until", disable=disable_tqdm or len(chunks) < 2):
            texts = self._greedy_batch([prepared[i][0] for i in ids], list(until), max_new)
            for i, text in zip(ids, texts):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [o if o is not None else "" for o in outputs]

    def _greedy_batch(self, contexts: List[List[int]], until: List[str], max_new: int) -> List[str]:
        seqs = torch.tensor(contexts, dtype=torch.long, device=self._device)
        generated: List[List[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_new):
            logits = self._forward(seqs[:, -self._max_length:])
            nxt = logits[:, -1].float().argmax(-1)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            for row, tok in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                generated[row].append(tok)
                text = self.tok_decode(generated[row])
                if any(stop in text for stop in until):
                    done[row] = True
            if all(done):
                break
        results = []
        for toks in generated:
            text = self.tok_decode(toks)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            results.append(text)
        return results

