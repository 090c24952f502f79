"""The shared optimiser: the fused kernel where torch has one, and the same update as the default one."""

import pytest
import torch

from rlhf_base.optim import adam


@pytest.mark.parametrize("decoupled", [True, False])
def test_fused_adam_makes_the_same_steps_as_the_default(decoupled):
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = adam(a.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1, decoupled=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    assert type(fused) is cls and fused.defaults["fused"] is True
    plain = cls(b.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(a.weight, torch.nn.Linear(8, 4).weight)


def test_falls_back_where_no_fused_kernel_exists():
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))  # no fused kernel on the meta device
    opt = adam([meta], lr=1e-3)
    assert not opt.defaults.get("fused")
