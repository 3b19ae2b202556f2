"""Prefill and token-by-token decode with mlx-lm's KV cache: the loop every command drives.

The loop pipelines like mlx-lm's ``generate_step``: step n+1 is queued (``mx.async_eval``) before
step n's token is read back, so the GPU never waits on Python. Token arrival times are recorded
as they are read back; the per-token latencies are their differences. ``Decoder`` is the loop in
pieces, for benchmarks that let several paths take turns.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

Sampler = Callable[[mx.array], mx.array]


def random_prompt(vocab_size: int, length: int, seed: int) -> mx.array:
    """A deterministic random prompt of ``length`` token ids."""
    return mx.random.randint(0, vocab_size, (length,), key=mx.random.key(seed))


def make_sampler(temperature: float, seed: int) -> Sampler:
    """Greedy at temperature 0; otherwise seeded categorical sampling (same seed, same draws)."""
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    state = {"key": mx.random.key(seed)}

    def sample(logits: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logits * (1.0 / temperature), key=sub)

    return sample


@dataclass
class DecodeResult:
    tokens: list[int]
    prefill_s: float  # prompt in, first token out
    token_times_s: list[float] = field(default_factory=list)  # arrival of tokens 2.. after the first

    @property
    def latencies_s(self) -> list[float]:
        edges = [0.0, *self.token_times_s]
        return [b - a for a, b in itertools.pairwise(edges)]

    @property
    def decode_s(self) -> float:
        return self.token_times_s[-1] if self.token_times_s else 0.0


class Decoder:
    """One sequence on its own KV cache, decoded in pieces so that several can take turns.

    Pipelined like mlx-lm's ``generate_step``: before a token is read back, its successor is
    already queued. ``drain`` finishes the queued step untimed, so a piece timed after a pause
    pays only for its own steps, never for another sequence's.
    """

    def __init__(self, model: nn.Module, prompt: mx.array, sampler: Sampler) -> None:
        self._model, self._sampler = model, sampler
        self._cache = make_prompt_cache(model)
        self.tokens: list[int] = []
        self._pending = self._step(prompt)
        mx.async_eval(self._pending)

    def _step(self, tokens: mx.array) -> mx.array:
        logits = self._model(tokens[None], cache=self._cache)[:, -1, :]
        return self._sampler(logits)

    def advance(self, n: int) -> list[float]:
        """Read the next ``n`` tokens; return each one's arrival time (``time.perf_counter``)."""
        arrivals = []
        for _ in range(n):
            queued = self._step(self._pending)
            mx.async_eval(queued)
            self.tokens.append(self._pending.item())
            arrivals.append(time.perf_counter())
            self._pending = queued
        return arrivals

    def drain(self) -> None:
        mx.eval(self._pending)


def generate(model: nn.Module, prompt: mx.array, max_tokens: int, sampler: Sampler) -> DecodeResult:
    """Prefill ``prompt``, then decode until ``max_tokens`` tokens exist (EOS is not special).

    Token 1 comes from the prefill; tokens 2..max_tokens are decode steps, timed from the arrival
    of token 1.
    """
    start = time.perf_counter()
    decoder = Decoder(model, prompt, sampler)
    first = decoder.advance(1)[0]
    rest = decoder.advance(max_tokens - 1)
    return DecodeResult(decoder.tokens, first - start, [t - first for t in rest])


def teacher_forced_logits(model: nn.Module, tokens: mx.array, prompt_len: int) -> list[mx.array]:
    """Feed ``tokens`` one decode step at a time after a ``prompt_len`` prefill; return the logits
    of every decode step (the same inputs to any path, whatever it predicts).

    The inputs are known in advance, so every step is queued without waiting for the previous one
    (the same kernels run; only the host stops idling between steps)."""
    cache = make_prompt_cache(model)
    model(tokens[None, :prompt_len], cache=cache)
    out = []
    for i in range(prompt_len, tokens.shape[0]):
        logits = model(tokens[None, i : i + 1], cache=cache)[0, -1]
        mx.async_eval(logits)
        out.append(logits)
    mx.eval(out)
    return out
