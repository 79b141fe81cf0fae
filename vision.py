"""The vision tower: an image's patches in, soft tokens of the text model's width out.

Follows transformers 5.17.0 `models/gemma4/modeling_gemma4.py` (Gemma4VisionModel, with
Gemma4VisionPatchEmbedder, Gemma4VisionEncoder, Gemma4VisionRotaryEmbedding, Gemma4VisionPooler)
and `models/diffusion_gemma/modeling_diffusion_gemma.py` (DiffusionGemmaMultimodalEmbedder).

An image arrives as P patches of p x p x 3 pixels in [0, 1] (images.py cuts them), each with its
place (x, y) in the patch grid; an image with fewer patches than the budget is padded with patches
whose place is (-1, -1). Per image, D the tower's width:
  1. patch embedding  h = input_proj(2 * pixels - 1) + table[0][x] + table[1][y]     (P, D)
                      (padding patches get no position embedding)
  2. N layers, bidirectional over the real patches (padding keys hidden):
       h = h + post_attention_norm(attention(input_norm(h)))
       h = h + post_ffw_norm(mlp(pre_ffw_norm(h)))            mlp: down(gelu_tanh(gate h) * up h)
     attention as in the text model (q/k RMSNorm per head, v RMSNorm without weight, scale 1.0)
     with 2D RoPE: the first half of each head's channels rotates with x, the second half with y,
     at frequencies 1 / theta^(2i / (d/2)), theta = 100
  3. pooling          the mean of each k x k square of patches (k = pooling_kernel_size), times
                      sqrt(D), in fp32: P / k^2 soft tokens; those of padding squares dropped
  4. standardisation  (h - std_bias) * std_scale, fp32 (config.standardize; the released model does)
  5. embedding        embedding_projection(rms_norm(h))  -> (n_soft, text hidden), the norm without weight

The module names are the checkpoint's: `Vision.state_dict()` keys are the tensor names after
`model.encoder.` (vision_tower.* and embed_vision.*). The released tower: 27 layers, D 1152, 16 heads
of 72, patch 16, k 3, 280 soft tokens per image, about 0.55B parameters.

    import torch; from vision import Vision, VisionConfig
    v = Vision(VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16, patch_size=4), text_hidden=64)
    pixels, places = torch.rand(1, 36, 48), torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(1, 36, 2)
    soft = v(pixels, places)   # (4, 64): a 6x6 patch grid pooled 3x3
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from attention import RMSNorm, attend, rotate_half


@dataclass
class VisionConfig:
    """vision_config of config.json (transformers' Gemma4VisionConfig); its defaults where a key is absent."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    standardize: bool = False
    use_clipped_linears: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """From a config.json vision_config; ValueError for what this tower does not compute."""
        c = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        if c.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {c.hidden_activation!r} (supported: gelu_pytorch_tanh)")
        if c.rope_parameters.get("rope_type", "axial") != "axial":
            raise ValueError(f"rope_type {c.rope_parameters.get('rope_type')!r} (supported: axial)")
        if c.head_dim % 4:
            raise ValueError(f"head_dim {c.head_dim} is not a multiple of 4 (2D RoPE rotates pairs on two axes)")
        return c


class ClippedLinear(nn.Module):
    """A linear layer without bias, its input and output clamped to stored bounds when the config
    says so (use_clipped_linears; the released tower does not)."""

    def __init__(self, c: VisionConfig, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.clipped = c.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(float("inf") if name.endswith("max") else -float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = self.linear(x)
        return torch.clamp(y, self.output_min, self.output_max) if self.clipped else y


def rope_2d(places: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin (B, P, head_dim) for patch places (B, P, 2): per axis the frequencies
    1 / theta^(2i / (head_dim/2)) of head_dim/4 pairs, laid out [x, x, y, y] (each axis half-split)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device=places.device) / half))
    freqs = places[..., None].float() * inv_freq  # (B, P, 2, head_dim/4)
    fx, fy = freqs[..., 0, :], freqs[..., 1, :]
    emb = torch.cat([fx, fx, fy, fy], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, P, heads, d): each half of the channels rotated with its axis' half of cos/sin (B, P, d)."""
    d = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    parts = [x[..., a * d:(a + 1) * d] * cos[..., a * d:(a + 1) * d]
             + rotate_half(x[..., a * d:(a + 1) * d]) * sin[..., a * d:(a + 1) * d] for a in (0, 1)]
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    """Step 2's attention over one image's patches (all heads see all real patches)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = ClippedLinear(c, c.hidden_size, c.num_attention_heads * c.head_dim)
        self.k_proj = ClippedLinear(c, c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = ClippedLinear(c, c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = ClippedLinear(c, c.num_attention_heads * c.head_dim, c.hidden_size)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.v_norm = RMSNorm(c.head_dim, c.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor | None) -> torch.Tensor:
        B, P, _ = x.shape
        q = apply_rope_2d(self.q_norm(self.q_proj(x).view(B, P, -1, self.head_dim)), cos, sin).transpose(1, 2)
        k = apply_rope_2d(self.k_norm(self.k_proj(x).view(B, P, -1, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(B, P, -1, self.head_dim)).transpose(1, 2)
        y = attend(q, k, v, mask)  # (B, H, P, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, P, -1))


class VisionMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), with the checkpoint's `.linear` names."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = ClippedLinear(c, c.hidden_size, c.intermediate_size)
        self.up_proj = ClippedLinear(c, c.hidden_size, c.intermediate_size)
        self.down_proj = ClippedLinear(c, c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionLayer(nn.Module):
    """One of step 2's layers: attention and MLP, each between a pre- and a post-norm."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(c.hidden_size, c.rms_norm_eps))

    def forward(self, h, cos, sin, mask) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    """Step 1: a patch's pixels projected, plus its x and its y embedding."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * c.patch_size ** 2, c.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, c.position_embedding_size, c.hidden_size))

    def forward(self, pixels: torch.Tensor, places: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        p = places.clamp(min=0)
        pos = F.embedding(p[..., 0], self.position_embedding_table[0]) + F.embedding(p[..., 1], self.position_embedding_table[1])
        return h + torch.where(padding.unsqueeze(-1), 0.0, pos)


class Encoder(nn.Module):
    """The layers (a module of its own for the checkpoint's `encoder.layers.N` names)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(c) for _ in range(c.num_hidden_layers)])


class VisionTower(nn.Module):
    """Steps 1-4: patches (B, P, 3p^2) and places (B, P, 2) -> soft tokens (sum of n_soft, D)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embedder = PatchEmbedder(c)
        self.encoder = Encoder(c)
        if c.standardize:
            self.register_buffer("std_bias", torch.zeros(c.hidden_size))
            self.register_buffer("std_scale", torch.ones(c.hidden_size))

    def forward(self, pixels: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        c = self.config
        k = c.pooling_kernel_size
        n_out = pixels.shape[1] // (k * k)  # soft tokens of a full patch budget
        padding = (places == -1).all(dim=-1)  # (B, P)
        h = self.patch_embedder(pixels, places, padding)  # 1.
        mask = None if not bool(padding.any()) else (~padding)[:, None, None, :]  # (B, 1, 1, P): the real keys
        cos, sin = rope_2d(places, c.head_dim, c.rope_parameters.get("rope_theta", 100.0), h.dtype)
        for layer in self.encoder.layers:  # 2.
            h = layer(h, cos, sin, mask)
        pooled, real = pool(h.masked_fill(padding.unsqueeze(-1), 0.0), places, n_out)  # 3.
        pooled = pooled.float() * c.hidden_size ** 0.5
        soft = pooled[real]  # (sum of n_soft, D): the images' soft tokens one after the other
        if c.standardize:  # 4.
            soft = (soft - self.std_bias.float()) * self.std_scale.float()
        return soft.to(h.dtype)


def pool(h: torch.Tensor, places: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of each k x k square of patches, k = sqrt(P / n_out): (B, n_out, D) in h's dtype,
    and (B, n_out) True where a square holds patches. Square (i, j) of a grid W patches wide is
    soft token i + (W / k) j."""
    B, P, _ = h.shape
    if P == n_out:
        return h, torch.ones(B, P, dtype=torch.bool, device=h.device)
    k = int((P // n_out) ** 0.5)
    p = places.clamp(min=0)
    width = p[..., 0].max(dim=-1, keepdim=True)[0] + 1  # (B, 1) patches across
    square = torch.div(p, k, rounding_mode="floor")
    index = square[..., 0] + (width // k) * square[..., 1]  # (B, P)
    weights = F.one_hot(index.long(), n_out).float() / (k * k)  # (B, P, n_out)
    out = weights.transpose(1, 2) @ h.float()
    return out.to(h.dtype), ~(weights == 0).all(dim=1)


class MultimodalEmbedder(nn.Module):
    """Step 5: soft tokens into the text model's width."""

    def __init__(self, c: VisionConfig, text_hidden: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(c.hidden_size, text_hidden, bias=False)

    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(soft))


class Vision(nn.Module):
    """The tower and its embedder: patches of B images (B, P, 3p^2), places (B, P, 2) -> the
    embeddings (n_soft of image 1 + ... + n_soft of image B, text hidden) that replace the images'
    tokens in the prompt, in order."""

    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.embed_vision = MultimodalEmbedder(config, text_hidden)

    def forward(self, pixels: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        return self.embed_vision(self.vision_tower(pixels, places))
