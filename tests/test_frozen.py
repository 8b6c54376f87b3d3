"""Packed products through frozen weights: the same product and input gradient as the plain
path, the run's compute dtype only, packed again after an in-place load."""

from __future__ import annotations

import pytest
import torch

from gptcli.frozen import FrozenPacks, packable_dtypes


def test_frozen_packs_compute_the_product_and_the_inputs_gradient():
    """float32: forward and the input's gradient as the plain product's (another summation
    order: 1e-5 relative); off, or for a weight that trains, they step aside (None); a weight
    changed in place is packed again."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 96, generator=g) * 0.1, torch.randn(96, generator=g)
    x = torch.randn(40, 64, generator=g)
    grad_out = torch.randn(40, 96, generator=g)

    def run(product):
        xi = x.clone().requires_grad_()
        y = product(xi)
        y.backward(grad_out)
        return y.detach(), xi.grad

    packs = FrozenPacks()
    assert packs.product(x, w, b) is None  # not enabled
    packs.dtype = torch.float32
    assert packs.product(x, w.clone().requires_grad_(), b) is None  # a weight that trains
    assert packs.product(x, w, b.clone().requires_grad_()) is None  # a bias that trains
    y, gx = run(lambda xi: packs.product(xi, w, b))
    y_ref, gx_ref = run(lambda xi: torch.addmm(b, xi, w))
    assert packs.packs is not None
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w.mul_(2)  # a load into the frozen weight
    y2, _ = run(lambda xi: packs.product(xi, w, b))
    assert torch.allclose(y2, torch.addmm(b, x, w), rtol=1e-5, atol=1e-5)
    packs.release()
    assert packs.product(x, w, b) is None and packs.packs is None


def test_frozen_packs_under_bf16_autocast_match_autocasts_own_product():
    if torch.bfloat16 not in packable_dtypes():
        pytest.skip("oneDNN has no bf16 on this CPU (needs avx512_bf16/AMX or avx512bw)")
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 96, generator=g) * 0.1, torch.randn(40, 64, generator=g)
    packs = FrozenPacks()
    packs.dtype = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = packs.product(x, w, None), x @ w
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert (y.float() - y_ref.float()).norm() / y_ref.float().norm() < 1e-2
    made = packs.packs
    # without autocast (sampling during a bf16 run): the plain path, the bf16 copies kept
    assert packs.product(x, w, None) is None and packs.packs is made
