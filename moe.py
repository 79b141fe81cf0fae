"""Mixture of experts of DiffusionGemma: the router and the 128 experts (top-8), plain PyTorch.

Follows transformers 5.17.0 (`DiffusionGemmaTextRouter`, `DiffusionGemmaTextExperts` with the
`grouped_mm` experts implementation, its default on GPU and on CPU with torch >= 2.11).

Router, on the RAW residual stream h (not the pre-FFN-normed input the experts get):
  1. z = RMSNorm_noscale(h) * scale * hidden**-0.5
  2. p = softmax(z @ W_router^T) in fp32, over all experts (softmax BEFORE top-k)
  3. w, idx = top-k of p; w = w / sum(w)            renormalise the k kept weights
  4. w = w * per_expert_scale[idx]                   fp32

Experts, stored stacked as in the checkpoint:
  gate_up_proj (E, 2I, D): rows [0, I) are the gate, rows [I, 2I) the up projection
  down_proj    (E, D, I)
  expert_e(x) = down_e @ (gelu_tanh(gate_e x) * up_e x)
  y_t = sum over the k slots of w_{t,slot} * expert_{idx_{t,slot}}(x_t), summed in fp32, then cast.

Dims legend: T tokens, D hidden, E experts, K experts per token, I expert hidden size,
A = T*K (token, expert) assignments.

    import torch; from moe import Experts, Router
    router, experts = Router(16, num_experts=4, top_k=2), Experts(4, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj); torch.nn.init.normal_(experts.down_proj)
    h = torch.randn(5, 16)                           # (T, D)
    w, idx = router(h); y = experts(h, idx, w)       # (T, K), (T, K) -> (T, D)
"""

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Picks each token's top-k experts and their weights, from the raw residual stream."""
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float = 1e-6):
        super().__init__()
        self.top_k, self.eps = top_k, eps
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        self.scalar_root_size = hidden_size ** -0.5

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """What the projection sees: h RMS-normalised without a weight (in fp32, as attention.RMSNorm
        does), times the router's own scale and 1/sqrt(D)."""
        x = h.float()
        x = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return x.type_as(h) * self.scale * self.scalar_root_size  # (T, D)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, D) -> weights (T, K) fp32, expert ids (T, K)."""
        z = self.normed(h)  # (T, D)
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)  # (T, E)
        weights, idx = torch.topk(probs, k=self.top_k, dim=-1)  # (T, K)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.per_expert_scale[idx]
        return weights, idx


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x (n, D), gate_up (2I, D), down (D, I) -> (n, D)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, I) each
    return F.linear(F.gelu(gate, approximate="tanh") * up, down)


class Experts(nn.Module):
    """The stacked experts, run grouped by expert (plain PyTorch: the specification)."""
    def __init__(self, num_experts: int, hidden_size: int, moe_intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * moe_intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, moe_intermediate_size))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up (2I, D) and down (D, I) of expert e: the one seam a subclass with another storage
        (quant.QuantExperts) overrides."""
        return self.gate_up_proj[e], self.down_proj[e]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D), idx (T, K), weights (T, K) fp32 -> (T, D) in x's dtype.

        Tokens are grouped by expert: each expert runs one matmul over the tokens routed to it, so
        no expert weight is ever copied per token. (The fused kernel, cuda_kernels.FusedExperts,
        replaces this method as a whole.)
        """
        T, D = x.shape
        K = idx.shape[1]
        flat_idx = idx.reshape(-1)  # (A,) assignment a = t * K + slot
        order = torch.argsort(flat_idx, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()
        flat_w = weights.reshape(-1)  # (A,)
        out = torch.zeros(T * K, D, dtype=torch.float32, device=x.device)  # (A, D) fp32
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue  # an expert that no token picked does no work
            a = order[start: start + n]  # its assignments
            start += n
            y = expert_mlp(x[a // K], *self.expert_weights(e, x.dtype))  # (n, D)
            out[a] = y * flat_w[a, None]  # routing weight applied in fp32
        return out.view(T, K, D).sum(dim=1).to(x.dtype)  # sum over the K slots in fp32
