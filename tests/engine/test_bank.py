"""The bank's attention helpers against their plain definitions."""

import os
import subprocess
import sys

import pytest
import torch

from mmca.engine.bank import key_logits, max_over, own_stats


@pytest.mark.parametrize("shape,dim", [((3, 4, 36, 20), -2), ((2, 16, 21, 7), -2), ((5, 1), 0), ((2, 3, 17), -1),
                                       ((2, 3, 1, 4), -2)])
def test_max_over_equals_amax_in_a_new_tensor(shape, dim):
    x = torch.randn(*shape)
    x[0].view(-1)[0] = float("-inf")
    m = max_over(x, dim)
    assert torch.equal(m, x.amax(dim=dim))
    x.zero_()  # the callers subtract the max from x in place
    assert not torch.equal(m, torch.zeros_like(m))


@pytest.mark.parametrize("masked", [False, True])
def test_key_logits_is_the_transposed_product_with_padded_keys_at_minus_inf(masked):
    q, k = torch.randn(3, 4, 5, 8), torch.randn(3, 4, 7, 8)
    mask = torch.rand(3, 7) > 0.3 if masked else None
    want = (q @ k.transpose(-1, -2)).transpose(-1, -2)
    if masked:
        want = want.masked_fill(~mask[:, None, :, None], float("-inf"))
    torch.testing.assert_close(key_logits(q, k, mask), want)


@pytest.mark.parametrize("length", [1, 6])
def test_own_stats_give_the_softmax_attention(length):
    q, k, v = (torch.randn(2, 4, length, 8) for _ in range(3))
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, 4:] = False
    m, l, o = own_stats(q, k, v, mask)
    logits = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(o / l.unsqueeze(-1), torch.softmax(logits, -1) @ v)
    torch.testing.assert_close(m, logits.amax(-1))


def test_retain_freed_memory_keeps_big_blocks_mapped():
    """In a fresh process (the setting is process-wide): a block's worth of 8 MB tensors freed
    and allocated again is fetched from the kernel again by default (the heap top is trimmed)
    and reused once the memory is retained."""
    code = """
import resource, torch
from mmca.runtime import retain_freed_memory
def block():
    parts = [torch.empty(2 << 20).fill_(1.0) for _ in range(6)]
    del parts
def faults():
    block()
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10): block()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
before = faults()
on = retain_freed_memory()
print(on, before, faults(), retain_freed_memory())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: mallopt is not available here")
    assert int(out[2]) < int(out[1]) // 10 and out[3] == "True"
    env = {**os.environ, "MMCA_RETAIN_MEMORY": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert off[0] == "False" and off[3] == "False"
