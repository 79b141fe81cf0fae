"""DiffusionGemma: the config, its named sizes, and the transformer (nothing about files: checkpoint.py).

Follows transformers 5.17.0 `models/diffusion_gemma/modeling_diffusion_gemma.py`
(DiffusionGemmaForBlockDiffusion); the README lists the numerical details it copies.

One weight stack, run in two modes (the checkpoint stores it once, under `model.decoder.*`):
  forward_causal(ids, cache)    reads the prompt, or a committed canvas, causally and appends each
                                layer's K/V to the cache ("encoder" in transformers); the tokens
                                of an image take the vision tower's embeddings (vision.py) and
                                attend to each other both ways
  forward_canvas(canvas, cache) one denoising pass: the canvas attends bidirectionally to
                                [cache ; canvas], reads the cache only, returns fp32 logits
                                (B, canvas_length, vocab) ("decoder" + lm_head in transformers)

A layer (identical in both modes):
  h = h + post_attention_norm(attention(input_norm(h)))
  m1 = post_ffw_norm_1(mlp(pre_ffw_norm(h)))                   dense MLP, in every layer
  m2 = post_ffw_norm_2(experts(pre_ffw_norm_2(h), router(h)))  top-8 of 128; router sees raw h
  h = (h + post_ffw_norm(m1 + m2)) * layer_scalar

Copied into another project (with attention.py, moe.py and kvcache.py), the network takes a
checkpoint's bf16 tensors by its own names: a key `model.decoder.X` is the parameter X; the keys
under `model.encoder.` are the vision tower's (vision.py) and copies of the decoder's layer scalars,
equal to them (skip both); the head is tied to the embedding. checkpoint.load_model does this, and
more (shards, sharding, quantized tensors, checks).

    import torch; from kvcache import KVCache; from model import DiffusionGemma, DiffusionGemmaConfig, init_weights
    model = init_weights(DiffusionGemma(DiffusionGemmaConfig.from_name("small")), seed=0)   # random weights
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    model.forward_causal(torch.tensor([[2, 17, 42]]), cache)                  # the prompt
    logits = model.forward_canvas(torch.randint(0, 8192, (1, 32)), cache)     # (1, 32, 8192) fp32
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attention import Attention, RMSNorm, causal_mask, rope_cos_sin, rope_inv_freq
from kvcache import KVCache
from moe import Experts, Router

RELEASED_EOS = [1, 106]  # config.json of the released model: <eos>, <turn|>


@dataclass
class DiffusionGemmaConfig:
    """Text config of DiffusionGemma. The defaults are the released 26B-A4B model."""
    vocab_size: int = 262144
    hidden_size: int = 2816
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    global_head_dim: int | None = 512  # full layers (None: head_dim)
    num_global_key_value_heads: int | None = 2  # full layers (None: num_key_value_heads)
    intermediate_size: int = 2112  # dense MLP and self-conditioning MLP
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    max_position_embeddings: int = 262144
    final_logit_softcapping: float = 30.0
    layer_types: list[str] | None = None  # default: 5 sliding then 1 full, repeated
    rope_parameters: dict | None = None
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: list(RELEASED_EOS))
    dtype: str = "bfloat16"
    # {layer index: {"head_dim": .., "num_key_value_heads": ..}} as transformers >= 5.17 writes it
    # (`per_layer_config`): when not None it is the only source of per-layer sizes (global_* unused)
    per_layer: dict[int, dict] | None = None
    # an image's tokens see each other both ways in the causal pass (use_bidirectional_attention
    # "vision", as released); False: causal like text (null)
    bidirectional_images: bool = True
    image_token_id: int | None = None  # the token an image's soft tokens stand on (released 258880)
    # the "quantization" block of config.json (quant.py), None for unquantized checkpoints
    quantization: dict | None = None
    # top-level config.json entries this text-only implementation carries through untouched
    # (vision_config, image token ids), so that a checkpoint rewritten here keeps them
    passthrough: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0},
            }

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiffusionGemmaConfig":
        """One of CONFIGS, with fields overridden."""
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    def layer_head_dim(self, i: int) -> int:
        if self.per_layer is not None:
            return self.per_layer.get(i, {}).get("head_dim", self.head_dim)
        if self.is_full(i) and self.global_head_dim is not None:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.per_layer is not None:
            return self.per_layer.get(i, {}).get("num_key_value_heads", self.num_key_value_heads)
        if self.is_full(i) and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def kind_head_dim(self, layer_type: str) -> int:
        """head_dim of the first layer of this type (RoPE tables are per layer type)."""
        return self.layer_head_dim(self.layer_types.index(layer_type))

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype; ValueError for a name that is not one of DTYPES."""
        name = self.dtype.replace("torch.", "")
        if name not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The named sizes: the released model and the two bundled ones, each exactly as its config.json says
# (test_checkpoint.py compares them with weights/ and weights-code/).
CONFIGS: dict[str, dict] = {
    "26b-a4b": {},  # google/diffusiongemma-26B-A4B-it
    "small": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, num_global_key_value_heads=1, global_head_dim=128, intermediate_size=512,
                  num_experts=8, top_k_experts=2, moe_intermediate_size=128, sliding_window=64,
                  max_position_embeddings=4096, canvas_length=32, eos_token_id=[1]),  # weights-code/: code
    "sudoku-6": dict(vocab_size=4 + 36 * 6, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                     intermediate_size=256, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
                     sliding_window=64, max_position_embeddings=80, canvas_length=36,
                     eos_token_id=[1]),  # weights/: 6x6 Sudoku, one canvas a grid (sudoku.py)
    # toy sizes that run in milliseconds: smoke runs of train.py, the tests; and the smallest shape the
    # CUDA kernels take (sizes multiples of 64, head_dim 16k) for scripts/bench.py --tiny
    "tiny": dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 head_dim=16, global_head_dim=32, num_global_key_value_heads=1, intermediate_size=48, num_experts=4,
                 top_k_experts=2, moe_intermediate_size=16, sliding_window=16, canvas_length=8, eos_token_id=[1],
                 max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"]),
    "tiny-kernels": dict(vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                         intermediate_size=128, num_experts=8, top_k_experts=2, moe_intermediate_size=64,
                         sliding_window=48, canvas_length=32),
}


# ---------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense MLP of every layer, and of self-conditioning."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class SelfConditioning(MLP):
    """Feeds the previous step's prediction back in: x = RMSNorm_noscale(e + MLP(pre_norm(s))).

    s is the soft embedding softmax(previous logits) @ E * embed_scale, or 0 on the first step of a
    canvas, where the MLP gives exactly 0 and x = RMSNorm_noscale(e).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__(hidden_size, intermediate_size)
        self.pre_norm = RMSNorm(hidden_size, eps)
        self.post_norm = RMSNorm(hidden_size, eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, sc_embeds: torch.Tensor) -> torch.Tensor:
        return self.post_norm(embeds + super().forward(self.pre_norm(sc_embeds)))


class Block(nn.Module):
    """One layer: attention, then the dense MLP and the routed experts side by side."""
    def __init__(self, c: DiffusionGemmaConfig, i: int):
        super().__init__()
        D, eps = c.hidden_size, c.rms_norm_eps
        self.sliding_window = None if c.is_full(i) else c.sliding_window
        self.self_attn = Attention(D, c.num_attention_heads, c.layer_kv_heads(i), c.layer_head_dim(i),
                                   k_eq_v=c.is_full(i), eps=eps)
        self.mlp = MLP(D, c.intermediate_size)
        self.router = Router(D, c.num_experts, c.top_k_experts, eps)
        self.experts = Experts(c.num_experts, D, c.moe_intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(D, eps))
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, cos, sin, layer_cache, mask, mode: str) -> torch.Tensor:
        B, S, D = h.shape
        h = h + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(h), cos, sin, layer_cache, mask, mode))
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        flat = h.reshape(-1, D)  # (B*S, D)
        weights, idx = self.router(flat)  # routed on the raw residual stream
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), idx, weights).reshape(B, S, D)
        return self.combine(h, dense, routed)

    def combine(self, h, dense, routed) -> torch.Tensor:
        """(h + post_ffw_norm(post_ffw_norm_1(dense) + post_ffw_norm_2(routed))) * layer_scalar. A
        seam: a fast path (cuda_kernels.FusedBlock) does it in one kernel."""
        both = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(routed)
        return (h + self.post_feedforward_layernorm(both)) * self.layer_scalar


class DiffusionGemma(nn.Module):
    """The text stack: embedding, layers, final norm, tied lm_head, self-conditioning."""
    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_conditioning = SelfConditioning(c.hidden_size, c.intermediate_size, c.rms_norm_eps)
        # RoPE inverse frequencies, fp32, made on the CPU as transformers makes them; kept out of the
        # module's tensors so that .to(bfloat16) cannot round them; copied once to each device used
        self._inv_freq = {t: rope_inv_freq(c.kind_head_dim(t), p["rope_theta"], p["rope_type"],
                                           p.get("partial_rotary_factor", 1.0))
                          for t, p in c.rope_parameters.items() if t in c.layer_types}
        self._inv_freq_on: dict[torch.device, dict] = {}

    # -- pieces shared by both modes --------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the unquantized weights)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed_scale(self) -> torch.Tensor:
        # sqrt(hidden) rounded to the weights' dtype: 53.066 becomes 53.0 in bf16, as in the reference
        return torch.tensor(self.config.hidden_size ** 0.5).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale()

    def embedding_matrix(self) -> torch.Tensor:
        """E (V, D). A quantized embedding (quant.QuantEmbedding) gives it through dequantize()."""
        dequant = getattr(self.embed_tokens, "dequantize", None)
        return dequant() if dequant is not None else self.embed_tokens.weight

    def sc_embed(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ E * embed_scale: the expected embedding under the previous prediction."""
        E = self.embedding_matrix()
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(E.dtype)  # (B, C, V)
        return torch.matmul(probs, E) * self.embed_scale()  # (B, C, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied lm_head (no embedding scale), fp32, softcapped: tanh(x / 30) * 30. A seam: a fast
        path (cuda_kernels.FusedHead) softcaps in one kernel."""
        x = F.linear(h, self.embedding_matrix()).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(x / cap) * cap

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{layer type: (cos, sin)} for positions (1, S)."""
        device = positions.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = {t: f.to(device) for t, f in self._inv_freq.items()}
        return {t: rope_cos_sin(f, positions, dtype) for t, f in self._inv_freq_on[device].items()}

    def run_layers(self, h, positions, cache: KVCache | None, masks: list, mode: str) -> torch.Tensor:
        """h (B, S, D) through every layer; cache None: a causal pass that keeps nothing (training)."""
        tables = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = tables[self.config.layer_types[i]]
            h = layer(h, cos, sin, None if cache is None else cache.layers[i], masks[i], mode)
        return h

    # -- the two modes ------------------------------------------------------------------------
    def forward_causal(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                       image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over new tokens ids (B, S); appends their K/V to cache. Returns the final
        normed hidden states (B, S, D). valid (B, S) marks real tokens in a left-padded batch.
        image_embeds (N, D): the vision tower's embeddings of the N image tokens
        (config.image_token_id) of ids, row by row; they take the place of the tokens' own, and each
        run of them attends within itself both ways."""
        B, S = ids.shape
        cache.extend_valid(valid, B, S, ids.device)
        positions = cache.positions(S, ids.device)  # (1, S)
        if image_embeds is None:
            h, blocks = self.embed(ids), None
        else:
            where = ids == self.config.image_token_id  # (B, S)
            if valid is not None:
                where &= valid
            if int(where.sum()) != len(image_embeds):
                raise ValueError(f"the ids hold {int(where.sum())} image tokens but {len(image_embeds)} image embeddings "
                                 "were given")
            h = self.embed(ids.masked_fill(where, self.config.pad_token_id))
            h = h.masked_scatter(where[..., None], image_embeds.to(h.dtype))
            blocks = None
            if self.config.bidirectional_images:
                starts = where & ~F.pad(where[:, :-1], (1, 0), value=False)  # the first token of each image
                blocks = torch.where(where, starts.long().cumsum(dim=1) - 1, -1)  # (B, S): image number, text -1
        masks = [causal_mask(cache, i, S, layer.sliding_window, ids.device, blocks) for i, layer in enumerate(self.layers)]
        h = self.run_layers(h, positions, cache, masks, "causal")
        cache.length += S
        return self.norm(h)

    def forward_canvas(self, canvas: torch.Tensor, cache: KVCache,
                       self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising pass. canvas (B, C) token ids; self_conditioning_logits (B, C, V) are the
        previous step's temperature-scaled logits (None on the first step). Returns fp32 logits
        (B, C, V). The cache is only read."""
        e = self.embed(canvas)  # (B, C, D)
        sc = torch.zeros_like(e) if self_conditioning_logits is None else self.sc_embed(self_conditioning_logits)
        h = self.self_conditioning(e, sc)
        positions = cache.positions(canvas.shape[1], canvas.device)  # (1, C)
        valids = [cache.canvas_valid(i) for i in range(self.config.num_hidden_layers)]  # the keys each layer may see
        h = self.run_layers(h, positions, cache, valids, "canvas")
        return self.logits(self.norm(h))


def init_weights(net: DiffusionGemma, std: float = 0.02, seed: int | None = None) -> DiffusionGemma:
    """Random weights in place (normal(0, std) matrices, unit norms and scales), drawn on the
    model's own device: for tests, benchmarks and training. Returns net."""
    g = torch.Generator(device=net.device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,))))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * std)
            else:  # norms, router scales, per-expert scales
                p.fill_(1.0)
        for layer in net.layers:
            layer.layer_scalar.fill_(1.0)
    return net
