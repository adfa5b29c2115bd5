"""Stand-in models and tokenizer for the evaluation tests.

``ByteTokenizer``: one token per UTF-8 byte (ids 0..255), end-of-text 256.
``BigramToy``: a model with hand-set probabilities that depend only on the previous token:

    after a letter (a-z, A-Z):  ' ' 1/2,  'a' 1/4,  'b' 1/8,  each of the other 254 tokens 1/(8*254)
    after anything else:        'a' 1/2,  'b' 1/4,  ' ' 1/8,  each of the other 254 tokens 1/(8*254)

so every log-likelihood in a test can be written down by hand.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

VOCAB = 257
EOT = 256
OTHER = 1.0 / (8 * 254)

# Tolerance of a summed log-likelihood when model and scoring run in float64 (the toys, the tiny GPT in
# double). Unit roundoff 2**-53 = 1.1e-16; a sum here has at most ~100 log-probabilities of magnitude
# < 20, each a log-softmax over 257 logits whose reductions may run in another order (batching, padding,
# windows, CPU kernels): worst case 100 * 257 * 20 * 1.1e-16 = 6e-11 absolute. 1e-9 leaves margin and is
# still 1e4 below float32's resolution of such a sum (~1e-5: the float32 tests that failed on other CPUs).
LL_ATOL = 1e-9
# The same sums through the harness's metrics (exp of a mean over >= 3 words): relative error
# <= LL_ATOL / 3 on a perplexity; 1e-9 relative.
PPL_RTOL = 1e-9


class ByteTokenizer:
    eot_token = EOT
    vocab_size = VOCAB

    def encode(self, text: str):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out = bytearray()
        text = ""
        for i in ids:
            if int(i) == EOT:
                text += out.decode("utf-8", errors="replace") + "<|endoftext|>"
                out = bytearray()
            else:
                out.append(int(i))
        return text + out.decode("utf-8", errors="replace")


def _is_letter(token: int) -> bool:
    return token < 256 and chr(token).isascii() and chr(token).isalpha()


class BigramToy(nn.Module):
    """Logits = log P(next | previous) from the table in the module docstring."""

    def __init__(self, block_size: int = 8, strict: bool = True) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=VOCAB)
        self.strict = strict
        table = torch.full((VOCAB, VOCAB), math.log(OTHER), dtype=torch.float64)
        for prev in range(VOCAB):
            first, second, third = ((ord(" "), ord("a"), ord("b")) if _is_letter(prev)
                                    else (ord("a"), ord("b"), ord(" ")))
            table[prev, first] = math.log(1 / 2)
            table[prev, second] = math.log(1 / 4)
            table[prev, third] = math.log(1 / 8)
        # float64: the tests' hand-computed log-likelihoods are exact to ~1e-14, not float32's ~1e-5
        self.register_buffer("table", table)
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.strict and idx.shape[1] > self.config.block_size:
            raise AssertionError(f"input of {idx.shape[1]} tokens exceeds block_size={self.config.block_size}")
        self.calls += 1
        return self.table[idx]


class LocalConvToy(nn.Module):
    """A random model whose logits at position t depend on tokens t-2..t only (receptive field 3) and
    that accepts any length when ``strict=False``: its full-sequence forward is the reference for the
    windowed scoring of sequences longer than ``block_size``."""

    def __init__(self, block_size: int = 8, vocab: int = VOCAB, dim: int = 16, strict: bool = True) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab)
        self.strict = strict
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.strict and idx.shape[1] > self.config.block_size:
            raise AssertionError(f"input of {idx.shape[1]} tokens exceeds block_size={self.config.block_size}")
        x = self.emb(idx).transpose(1, 2)
        x = torch.tanh(self.conv(nn.functional.pad(x, (2, 0))))  # causal: left padding only
        return self.head(x.transpose(1, 2))


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def toys():
    return SimpleNamespace(ByteTokenizer=ByteTokenizer, BigramToy=BigramToy, LocalConvToy=LocalConvToy,
                           OTHER=OTHER, EOT=EOT, VOCAB=VOCAB, LL_ATOL=LL_ATOL, PPL_RTOL=PPL_RTOL)


WORDS = ("the king queen lord lady night day sword crown heart love death fair foul speak hear "
         "come go stay fly sleep dream wake fire water earth stone bright dark sweet bitter noble "
         "gentle friend enemy castle garden storm thunder silver golden morning evening").split()


def make_text(n_words: int = 3000, seed: int = 0) -> str:
    """Pseudo-verse: short capitalised lines ending in punctuation, speaker names, blank lines."""
    import random

    rng = random.Random(seed)
    lines, count = [], 0
    while count < n_words:
        if rng.random() < 0.1:
            lines += ["", rng.choice(["KING.", "QUEEN.", "LORD.", "LADY."])]
        n = rng.randint(5, 11)
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([",", ".", ";", "!", "?", ""]))
        count += n
    return "\n".join(lines) + "\n"


@pytest.fixture
def heldout_text() -> str:
    return make_text()


@pytest.fixture
def ll_atol() -> float:
    return LL_ATOL


@pytest.fixture
def ppl_rtol() -> float:
    return PPL_RTOL
