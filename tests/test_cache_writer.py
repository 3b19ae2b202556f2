"""kernel_kv's cache rule, on the CPU: the buffers it writes in place are its own, grown and
padded as mlx-lm's KVCache grows them; a cache it did not leave as it is gets a copy first.
(The write itself is the kernel's: tests/test_kernel_kv_gpu.py.)"""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from fusedqk.attention import CacheWriter

B, KV, D = 1, 2, 8


def prefilled(length: int) -> KVCache:
    cache = KVCache()
    k = mx.random.normal((B, KV, length, D), key=mx.random.key(1)).astype(mx.bfloat16)
    cache.update_and_fetch(k, k + 1)
    return cache


def room(writer: CacheWriter, cache: KVCache):
    return writer.room_for_one(cache, B, KV, D, mx.bfloat16)


def test_a_prefilled_cache_is_copied_once_then_written_in_its_own_buffers():
    writer, cache = CacheWriter(), prefilled(5)
    given, given_values = cache.keys, cache.values
    keys, values = room(writer, cache)
    assert keys is cache.keys and keys is not given and values is not given_values
    assert keys.shape == given.shape == (B, KV, KVCache.step, D)
    assert mx.array_equal(keys, given).item() and mx.array_equal(values, given_values).item()
    writer.wrote_one(cache)
    assert cache.offset == 6
    assert room(writer, cache)[0] is keys  # its own now: no copy


def test_growth_is_mlx_lms_one_step_with_zeros_after_the_positions():
    writer, cache = CacheWriter(), prefilled(3)
    room(writer, cache)
    for _ in range(KVCache.step - 3):
        room(writer, cache)
        writer.wrote_one(cache)
    full = cache.keys
    keys, _ = room(writer, cache)  # position 256: a new step
    assert keys is not full and keys.shape == (B, KV, 2 * KVCache.step, D)
    assert mx.array_equal(keys[..., :KVCache.step, :], full).item()
    assert not mx.any(keys[..., KVCache.step:, :]).item()
    # mlx-lm's own growth at the same position gives the same shape.
    reference = prefilled(KVCache.step)
    reference.update_and_fetch(*(mx.zeros((B, KV, 1, D), mx.bfloat16),) * 2)
    assert reference.keys.shape == keys.shape


def test_a_trimmed_copied_or_replaced_cache_gets_a_buffer_of_its_own():
    writer, cache = CacheWriter(), prefilled(4)
    room(writer, cache)
    writer.wrote_one(cache)
    mine = cache.keys
    twin = copy.deepcopy(cache)  # a prompt cache's copy may share the buffer
    given = twin.keys
    assert room(writer, twin)[0] is not given and twin.keys is not mine
    cache.trim(2)  # positions before the end will be written again
    assert room(writer, cache)[0] is not mine
    writer.wrote_one(cache)
    cache.keys = cache.keys + 0  # replaced by someone else
    replaced = cache.keys
    assert room(writer, cache)[0] is not replaced
