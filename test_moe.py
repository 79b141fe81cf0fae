"""The mixture of experts: the router by hand, and the grouped experts against a per-token loop."""

import torch

from moe import Experts, Router, expert_mlp


def test_experts_group_by_expert_equals_per_token_loop():
    torch.manual_seed(0)
    E, D, I, T, K = 5, 8, 6, 7, 2
    ex = Experts(E, D, I)
    torch.nn.init.normal_(ex.gate_up_proj)
    torch.nn.init.normal_(ex.down_proj)
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:, 0] = 1  # expert 1 gets every token; some experts get none
    w = torch.rand(T, K)
    y = ex(x, idx, w)
    ref = torch.stack([sum(w[t, s] * expert_mlp(x[t:t + 1], ex.gate_up_proj[idx[t, s]], ex.down_proj[idx[t, s]])[0]
                           for s in range(K)) for t in range(T)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_expert_gate_comes_first():
    """gate_up rows [0, I) are the gate: with up = 1 and down = identity the output is gelu(gate x)."""
    D = I = 4
    gate, up = torch.eye(I, D) * 2.0, torch.zeros(I, D)
    up[:, 0] = 1.0  # up(x) = x[0] for every unit
    x = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    y = expert_mlp(x, torch.cat([gate, up]), torch.eye(D, I))
    torch.testing.assert_close(y, torch.nn.functional.gelu(2 * x, approximate="tanh") * 1.0)


def test_router_by_hand():
    router = Router(2, num_experts=3, top_k=2)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        router.per_expert_scale.copy_(torch.tensor([2.0, 1.0, 1.0]))
    h = torch.tensor([[3.0, 0.0]])  # RMSNorm -> (sqrt 2, 0); times scale 1 and 2 ** -0.5 -> (1, 0)
    w, idx = router(h)
    p = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), -1)  # softmax BEFORE top-k, over all experts
    assert idx[0, 0].item() == 0 and idx[0, 1].item() in (1, 2)
    kept = torch.stack([p[0], p[1]]) / (p[0] + p[1])  # renormalised over the kept two
    torch.testing.assert_close(w[0], kept * torch.tensor([2.0, 1.0]), atol=1e-6, rtol=1e-6)
    assert w.dtype == torch.float32
