"""The harness wrapper scores exactly what the model's own forward pass says, windowed when long."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows

from gaincell.evaluate.lm import GaincellLM, plan_windows


def _ll_request(context: str, continuation: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def _rolling_request(text: str) -> Instance:
    return Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)


def _tiny_gpt(block_size: int, vocab: int):
    from gaincell.model import GPT, GPTConfig

    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    return model.double().eval()  # float64: sums compared at LL_ATOL whatever the CPU's kernels


def _forward_logprobs(model, tokens):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([tokens]))[0].double(), dim=-1)


@pytest.mark.parametrize("n_tokens,first_target,max_length,stride", [
    (1, 1, 4, 4), (5, 1, 4, 4), (23, 1, 8, 8), (23, 1, 8, 3), (23, 1, 8, 1), (40, 1, 16, 5), (9, 1, 8, 8)])
def test_windows_match_the_harness_rolling_windows(n_tokens, first_target, max_length, stride):
    """For a rolling request the planner yields the harness's own (input, prediction) windows."""
    seq = list(range(100, 100 + n_tokens))  # seq[0] plays the prefix (end-of-text) token
    ours = [(seq[a:e - 1], seq[t:e]) for a, t, e in plan_windows(n_tokens, first_target, max_length, stride)]
    theirs = list(get_rolling_token_windows(seq[1:], seq[0], max_length, max_length - stride + 1))
    assert ours == [(list(i), list(p)) for i, p in theirs]


@pytest.mark.parametrize("n_tokens,first_target,max_length,stride", [
    (30, 7, 8, 3), (30, 25, 8, 8), (9, 3, 8, 2), (50, 1, 6, 1), (12, 11, 4, 4)])
def test_windows_cover_each_target_once_with_enough_context(n_tokens, first_target, max_length, stride):
    covered = []
    for a, t, e in plan_windows(n_tokens, first_target, max_length, stride):
        assert e - 1 - a <= max_length               # the input fits the context
        assert t - a >= min(t, max_length - stride + 1)  # first target's context
        covered += list(range(t, e))
    assert covered == list(range(first_target, n_tokens))


def test_bad_window_arguments_are_rejected():
    with pytest.raises(ValueError, match="stride=9"):
        plan_windows(20, 1, 8, 9)
    with pytest.raises(ValueError, match="first_target=0"):
        plan_windows(20, 0, 8, 8)


def test_loglikelihood_equals_forward_pass_sum_within_context(tokenizer, ll_atol):
    model = _tiny_gpt(block_size=32, vocab=257)
    lm = GaincellLM(model, tokenizer, batch_size=3, device="cpu")
    pairs = [("The cat", " sat on"), ("x", " a"), ("ab", "c"), ("", "hello")]
    got = lm.loglikelihood([_ll_request(c, x) for c, x in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx = tokenizer.encode(context) if context else [tokenizer.eot_token]
        tokens = ctx + tokenizer.encode(continuation)
        logprobs = _forward_logprobs(model, tokens[:-1])
        positions = range(len(ctx) - 1, len(tokens) - 1)
        expected = sum(float(logprobs[p, tokens[p + 1]]) for p in positions)
        assert ll == pytest.approx(expected, abs=ll_atol)
        assert greedy == all(int(logprobs[p].argmax()) == tokens[p + 1] for p in positions)


def test_rolling_longer_than_context_equals_exact_sliding_window(tokenizer, ll_atol):
    """stride=1: every token is scored with its full block_size-token history, one forward pass per
    token; the reference runs those passes one by one."""
    block = 8
    model = _tiny_gpt(block_size=block, vocab=257)
    lm = GaincellLM(model, tokenizer, batch_size=4, device="cpu", stride=1)
    text = "a long sentence, much longer than eight tokens"
    (got,) = lm.loglikelihood_rolling([_rolling_request(text)])
    tokens = [tokenizer.eot_token] + tokenizer.encode(text)
    expected = 0.0
    for i in range(1, len(tokens)):
        history = tokens[max(0, i - block):i]
        expected += float(_forward_logprobs(model, history)[-1, tokens[i]])
    assert len(tokens) > 5 * block
    assert got == pytest.approx(expected, abs=ll_atol)


def test_loglikelihood_with_continuation_longer_than_context(tokenizer, ll_atol):
    block = 8
    model = _tiny_gpt(block_size=block, vocab=257)
    lm = GaincellLM(model, tokenizer, batch_size=2, device="cpu", stride=1)
    context, continuation = "Once upon", " a time there was a king"
    ((got, _),) = lm.loglikelihood([_ll_request(context, continuation)])
    ctx = tokenizer.encode(context)
    tokens = ctx + tokenizer.encode(continuation)
    expected = sum(float(_forward_logprobs(model, tokens[max(0, i - block):i])[-1, tokens[i]])
                   for i in range(len(ctx), len(tokens)))
    assert got == pytest.approx(expected, abs=ll_atol)


@pytest.mark.parametrize("stride", [8, 6])
def test_windowed_scoring_equals_full_forward_for_a_local_model(toys, tokenizer, stride, ll_atol):
    """Windows give the log-likelihood of one pass over the whole text when each target sees at least
    the model's receptive field: 3 tokens for the local model (block 8 - stride 6 + 1), 1 for the bigram
    with the harness's disjoint windows (stride = block)."""
    torch.manual_seed(0)
    model = (toys.LocalConvToy(block_size=8) if stride <= 6 else toys.BigramToy(block_size=8)).double()
    lm = GaincellLM(model, tokenizer, batch_size=5, device="cpu", stride=stride)
    texts = ["the quick brown fox jumps over the lazy dog", "ab", "x" * 17]
    got = lm.loglikelihood_rolling([_rolling_request(t) for t in texts])
    model.strict = False
    for text, value in zip(texts, got):
        tokens = [tokenizer.eot_token] + tokenizer.encode(text)
        logprobs = _forward_logprobs(model, tokens[:-1])
        expected = sum(float(logprobs[i - 1, tokens[i]]) for i in range(1, len(tokens)))
        assert value == pytest.approx(expected, abs=ll_atol)


def test_batch_size_does_not_change_scores(tokenizer, ll_atol):
    model = _tiny_gpt(block_size=16, vocab=257)
    texts = ["short", "a bit longer text here", "the longest text of them all, over sixteen bytes"]
    one = GaincellLM(model, tokenizer, batch_size=1, device="cpu").loglikelihood_rolling(
        [_rolling_request(t) for t in texts])
    many = GaincellLM(model, tokenizer, batch_size=7, device="cpu").loglikelihood_rolling(
        [_rolling_request(t) for t in texts])
    assert many == pytest.approx(one, abs=ll_atol)


def test_generate_until_is_greedy_and_stops(toys, tokenizer):
    lm = GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu")
    # greedy from 'x' (a letter): ' ', then 'a', ' ', 'a', ...
    reqs = [Instance(request_type="generate_until", doc={}, idx=0, arguments=("x", {"until": ["b"], "max_gen_toks": 5})),
            Instance(request_type="generate_until", doc={}, idx=0, arguments=("x", {"until": ["a a"], "max_gen_toks": 20})),
            Instance(request_type="generate_until", doc={}, idx=0, arguments=("ab cd ef gh ij", {"until": ["zz"], "max_gen_toks": 3}))]
    assert lm.generate_until(reqs) == [" a a ", " ", " a "]


def test_rejects_bad_arguments(toys, tokenizer):
    with pytest.raises(ValueError, match="stride=9"):
        GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu", stride=9)
    with pytest.raises(ValueError, match="max_length=16"):
        GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu", max_length=16)
    with pytest.raises(ValueError, match="dtype='half'"):
        GaincellLM(toys.BigramToy(block_size=8), tokenizer, device="cpu", dtype="half")


def test_known_probabilities_give_exact_loglikelihood(toys, tokenizer, ll_atol):
    lm = GaincellLM(toys.BigramToy(block_size=4), tokenizer, device="cpu")
    # eot->a 1/2, a->b 1/8, b->' ' 1/2, ' '->a 1/2, ... : 5 x "ab" and 4 spaces (14 bytes > block 4)
    (got,) = lm.loglikelihood_rolling([_rolling_request("ab ab ab ab ab")])
    assert got == pytest.approx(5 * math.log(1 / 2 * 1 / 8) + 4 * math.log(1 / 2), abs=ll_atol)


@pytest.mark.parametrize("stride", [1, 3])
def test_greedy_flag_spans_every_window(toys, tokenizer, stride, ll_atol):
    """is_greedy holds only if every continuation token, in whichever window, is the argmax."""
    lm = GaincellLM(toys.BigramToy(block_size=4), tokenizer, device="cpu", stride=stride)
    # bigram argmax: after a letter ' ', after a space 'a'
    (all_greedy, not_greedy) = lm.loglikelihood([_ll_request("x", " a a a a a"), _ll_request("x", " a a b a a")])
    assert all_greedy[1] is True
    assert not_greedy[1] is False  # the 'b' sits in an early window; later windows are all greedy
    # ' '|x, a|' ', ' '|a, a|' ', ' '|a: 1/2 each; b|' ' 1/4; ' '|b, a|' ', ' '|a, a|' ': 1/2 each
    assert not_greedy[0] == pytest.approx(9 * math.log(1 / 2) + math.log(1 / 4), abs=ll_atol)
