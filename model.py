"""DiffusionGemma: the config, the transformer, and reading/writing its checkpoints.

Follows transformers 5.17.0 `modeling_diffusion_gemma.py`; see ../shared/SPEC.md for every quirk.

One weight stack, run in two modes (the checkpoint stores it once, under `model.decoder.*`):
  forward_causal(ids, cache)    reads the prompt, or a committed canvas, causally and appends each
                                layer's K/V to the cache ("encoder" in transformers)
  forward_canvas(canvas, cache) one denoising pass: the canvas attends bidirectionally to
                                [cache ; canvas], reads the cache only, returns fp32 logits
                                (B, canvas_length, vocab) ("decoder" + lm_head in transformers)

A layer (identical in both modes):
  h = h + post_attention_norm(attention(input_norm(h)))
  m1 = post_ffw_norm_1(mlp(pre_ffw_norm(h)))                   dense MLP, in every layer
  m2 = post_ffw_norm_2(experts(pre_ffw_norm_2(h), router(h)))  top-8 of 128; router sees raw h
  h = (h + post_ffw_norm(m1 + m2)) * layer_scalar

    model = load_model("path/to/checkpoint", device="cuda")
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    model.forward_causal(prompt_ids, cache)
    logits = model.forward_canvas(canvas, cache)
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attention import Attention, RMSNorm, canvas_mask, causal_mask, rope_cos_sin, rope_inv_freq
from kvcache import KVCache
from moe import Experts, Router

MODEL_TYPE = "diffusion_gemma"
PREFIX = "model.decoder."  # where the checkpoint keeps the shared text stack
ENCODER_SCALAR = "model.encoder.language_model.layers.{}.layer_scalar"  # untied buffer copies


PASSTHROUGH = ("vision_config", "boi_token_id", "eoi_token_id", "image_token_id", "vision_soft_tokens_per_image")
# transformers cannot build DiffusionGemma without a vision config; a checkpoint trained here has no
# vision tower, so it names the smallest one (transformers initialises it at load; text never uses it)
MINIMAL_VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "head_dim": 8, "position_embedding_size": 64}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@dataclass
class DiffusionGemmaConfig:
    """Text config of DiffusionGemma. The defaults are the released 26B-A4B model (SPEC §1)."""
    vocab_size: int = 262144
    hidden_size: int = 2816
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    num_global_key_value_heads: int | None = 2  # full layers (None: same as sliding)
    global_head_dim: int = 512  # full layers
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
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106, 50])
    dtype: str = "bfloat16"
    # per-layer overrides {layer index: {"head_dim": .., "num_key_value_heads": ..}}, as written by
    # transformers >= 5.17 (`per_layer_config`); when empty the global_* fields apply to full layers
    per_layer: dict[int, dict] = field(default_factory=dict)
    # the "quantization" block of config.json (quantize.py), None for bf16 checkpoints
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

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    def layer_head_dim(self, i: int) -> int:
        if i in self.per_layer and "head_dim" in self.per_layer[i]:
            return self.per_layer[i]["head_dim"]
        return self.global_head_dim if self.is_full(i) and not self.per_layer else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if i in self.per_layer and "num_key_value_heads" in self.per_layer[i]:
            return self.per_layer[i]["num_key_value_heads"]
        if self.is_full(i) and not self.per_layer and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def kind_head_dim(self, layer_type: str) -> int:
        """head_dim of the first layer of this type (RoPE tables are per layer type)."""
        return self.layer_head_dim(self.layer_types.index(layer_type))

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "DiffusionGemmaConfig":
        """Read a transformers `config.json` (top level `diffusion_gemma`, nested `text_config`)."""
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise CheckpointError(f"{where} is for model_type {mt!r}, not {MODEL_TYPE!r}: "
                                  "give --model a DiffusionGemma checkpoint")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise CheckpointError(f"{where} has no text_config: the file is incomplete; download it again")
        if t.get("use_bidirectional_attention") == "all":
            raise CheckpointError(f"{where}: use_bidirectional_attention='all' is not supported (released: 'vision')")
        if d.get("quantization_config") or t.get("quantization_config"):
            raise CheckpointError(f"{where} has a quantization_config (another tool's format, e.g. NVFP4): "
                                  "use the bf16 checkpoint, and quantize.py for int8/int4")
        qb = d.get("quantization")
        if qb is not None and (not isinstance(qb, dict) or qb.get("format") != "diffusiongemma-weight-only"):
            raise CheckpointError(f"{where}: unknown quantization block {qb!r}; write it with quantize.py")
        if not d.get("tie_word_embeddings", True):
            raise CheckpointError(f"{where}: untied lm_head is not supported (the released model ties it)")
        names = {f for f in cls.__dataclass_fields__
                 if f not in ("per_layer", "passthrough", "eos_token_id", "canvas_length", "dtype", "quantization")}
        kw = {k: v for k, v in t.items() if k in names and v is not None}
        eos = d.get("eos_token_id", t.get("eos_token_id", [1, 106, 50]))
        kw["eos_token_id"] = eos if isinstance(eos, list) else [eos]
        kw["canvas_length"] = d.get("canvas_length", 256)
        kw["dtype"] = str(d.get("dtype") or t.get("dtype") or d.get("torch_dtype") or "bfloat16")
        kw["per_layer"] = {}
        kw["passthrough"] = {k: d[k] for k in PASSTHROUGH if d.get(k) is not None}
        kw["quantization"] = d.get("quantization")
        try:
            cfg = cls(**kw)
            for key, over in (t.get("per_layer_config") or {}).items():
                layers = ([int(key)] if str(key).isdigit() else
                          [i for i, lt in enumerate(cfg.layer_types) if lt == key])
                for i in layers:
                    cfg.per_layer.setdefault(i, {}).update(over)
            if cfg.layer_types[-1] != "full_attention":
                raise ValueError("the last layer must be a full_attention layer")
            if len(cfg.layer_types) != cfg.num_hidden_layers:
                raise ValueError("layer_types does not have num_hidden_layers entries")
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where} is not a valid DiffusionGemma config: {e}") from None
        return cfg

    def to_hf_dict(self) -> dict:
        """The `config.json` that transformers 5.17.0 reads (and the released checkpoint uses)."""
        text = {
            "model_type": "diffusion_gemma_text",
            **{k: getattr(self, k) for k in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "num_experts", "top_k_experts",
                "moe_intermediate_size", "rms_norm_eps", "sliding_window", "max_position_embeddings",
                "final_logit_softcapping", "layer_types", "rope_parameters", "pad_token_id", "bos_token_id")},
            "eos_token_id": self.eos_token_id[0],
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": "vision",
            "tie_word_embeddings": True,
            "dtype": self.dtype,
        }
        if self.per_layer:
            text["per_layer_config"] = {str(i): dict(o) for i, o in self.per_layer.items()}
        else:
            text["global_head_dim"] = self.global_head_dim
            text["num_global_key_value_heads"] = self.num_global_key_value_heads
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": MODEL_TYPE,
            "canvas_length": self.canvas_length,
            "eos_token_id": list(self.eos_token_id),
            "tie_word_embeddings": True,
            "dtype": self.dtype,
            "text_config": text,
            "vision_config": MINIMAL_VISION_CONFIG,
            **self.passthrough,
            **({"quantization": self.quantization} if self.quantization else {}),
        }

    def torch_dtype(self) -> torch.dtype:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
            self.dtype.replace("torch.", ""), torch.bfloat16)


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

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor) -> torch.Tensor:
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))


class Block(nn.Module):
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
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, D)  # (B*S, D)
        weights, idx = self.router(flat)  # routed on the raw residual stream
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), idx, weights).reshape(B, S, D)
        h = h + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(routed))
        return h * self.layer_scalar


class DiffusionGemma(nn.Module):
    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_conditioning = SelfConditioning(c.hidden_size, c.intermediate_size, c.rms_norm_eps)
        self.inv_freq = {t: rope_inv_freq(c.kind_head_dim(t), p["rope_theta"], p["rope_type"],
                                          p.get("partial_rotary_factor", 1.0))
                         for t, p in c.rope_parameters.items() if t in c.layer_types}

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
        """E (V, D): the embedding, dequantized when it is stored quantized (quantize.py)."""
        dequant = getattr(self.embed_tokens, "dequantize", None)
        return dequant() if dequant is not None else self.embed_tokens.weight

    def soft_embed(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ E * embed_scale: the expected embedding under the previous prediction."""
        E = self.embedding_matrix()
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(E.dtype)  # (B, C, V)
        return torch.matmul(probs, E) * self.embed_scale()  # (B, C, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied lm_head (no embedding scale), fp32, softcapped: tanh(x / 30) * 30."""
        x = F.linear(h, self.embedding_matrix()).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(x / cap) * cap

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        return {t: rope_cos_sin(f, positions, dtype) for t, f in self.inv_freq.items()}

    def run_layers(self, h, positions, cache: KVCache, masks: list, mode: str) -> torch.Tensor:
        tables = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = tables[self.config.layer_types[i]]
            h = layer(h, cos, sin, cache.layers[i], masks[i], mode)
        return h

    # -- the two modes ------------------------------------------------------------------------
    def forward_causal(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over new tokens ids (B, S); appends their K/V to cache. Returns the final
        normed hidden states (B, S, D). valid (B, S) marks real tokens in a left-padded batch."""
        B, S = ids.shape
        c = self.config
        cache.extend_valid(valid, B, S, ids.device)
        positions = torch.arange(cache.length, cache.length + S, device=ids.device)[None]  # (1, S)
        masks = [causal_mask(cache, i, S, self.layers[i].sliding_window, ids.device)
                 for i in range(c.num_hidden_layers)]
        h = self.run_layers(self.embed(ids), positions, cache, masks, "causal")
        cache.length += S
        return self.norm(h)

    def forward_canvas(self, canvas: torch.Tensor, cache: KVCache,
                       self_conditioning_logits: torch.Tensor | None = None, masks: list | None = None) -> torch.Tensor:
        """One denoising pass. canvas (B, C) token ids; self_conditioning_logits (B, C, V) are the
        previous step's temperature-scaled logits (None on the first step). Returns fp32 logits
        (B, C, V). The cache is only read. masks: canvas_masks(cache, C), when already made."""
        B, C = canvas.shape
        e = self.embed(canvas)  # (B, C, D)
        if self_conditioning_logits is None:
            soft = torch.zeros_like(e)
        else:
            soft = self.soft_embed(self_conditioning_logits)
        h = self.self_conditioning(e, soft)
        positions = torch.arange(cache.length, cache.length + C, device=canvas.device)[None]  # (1, C)
        masks = masks if masks is not None else self.canvas_masks(cache, C)
        h = self.run_layers(h, positions, cache, masks, "canvas")
        return self.logits(self.norm(h))

    def canvas_masks(self, cache: KVCache, C: int) -> list:
        return [canvas_mask(cache, i, C) for i in range(self.config.num_hidden_layers)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints: locate, read, write
# ---------------------------------------------------------------------------------------------

def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot of repo_id in the local Hugging Face cache (refs/main first, else the newest)."""
    for base in hf_cache_dirs():
        repo = base / ("models--" + repo_id.replace("/", "--"))
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
            return snaps / ref.read_text().strip()
        candidates = sorted((p for p in snaps.iterdir() if (p / "config.json").exists()),
                            key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


def resolve_checkpoint(model: str) -> Path:
    """A local directory, or a Hugging Face repo id found in the cache or downloaded."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{model} is a file; --model takes a checkpoint directory or a repo id")
        return path
    looks_like_repo = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"{model} does not exist: give --model a checkpoint directory or a Hugging Face repo id")
    cached = find_in_hf_cache(model)
    if cached is not None:
        return cached
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{model} is not in the local Hugging Face cache and huggingface_hub is not installed: "
            f"`pip install huggingface_hub` or `hf download {model} --local-dir DIR` and pass --model DIR") from None
    try:
        return Path(huggingface_hub.snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # network, auth, unknown repo: one line, what to do
        raise CheckpointError(f"could not download {model} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "download it yourself and pass --model DIR") from None


def read_config(path: Path) -> DiffusionGemmaConfig:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a checkpoint directory")
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); download it again") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg} is not a JSON object; download it again")
    return DiffusionGemmaConfig.from_hf_dict(d, where=str(cfg))


def weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); download it again") from None
        for shard in sorted(set(wm.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / shard} (listed in {index.name}) is missing; download it again")
        return {name: path / shard for name, shard in wm.items()}
    if single.is_file():
        try:
            from safetensors import safe_open
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{single} is not a readable safetensors file (truncated or corrupted?): "
                                  f"{str(e).splitlines()[0]}") from None
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_model(model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DiffusionGemma:
    """Build the model from a checkpoint, tensor by tensor, straight onto `device` in `dtype`.

    Only the text stack under `model.decoder.*` is read (the encoder copies are tied to it, the vision
    tower is skipped). Peak host memory stays near one tensor: each is opened from its shard and
    moved to the device before the next is read.
    """
    from safetensors import safe_open

    path = resolve_checkpoint(str(model))
    config = read_config(path)
    dtype = dtype or config.torch_dtype()
    device = torch.device(device)
    with torch.device("meta"):
        net = DiffusionGemma(config).to(dtype)
        if config.quantization:  # swap in the quantized modules (quantize.py)
            from quantize import convert_for_runtime
            convert_for_runtime(net, config.quantization)
    wmap = weight_map(path)
    expected = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if PREFIX + name not in wmap:
            where = next(iter(wmap.values())).name if len(set(wmap.values())) == 1 else "any shard"
            raise CheckpointError(f"tensor {PREFIX + name} is missing from {where} in {path}; "
                                  "the checkpoint is incomplete or not DiffusionGemma")
        by_file.setdefault(wmap[PREFIX + name], []).append(name)
    state = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names:
                    shape = tuple(f.get_slice(PREFIX + name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"tensor {PREFIX + name} in {file} has shape {list(shape)}, "
                                              f"expected {list(expected[name])} from config.json")
                    t = f.get_tensor(PREFIX + name)
                    state[name] = t.to(dtype) if t.is_floating_point() and not name.endswith(("_scale",)) else t
        except CheckpointError:
            raise
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                                  f"{str(e).splitlines()[0]}") from None
    net.load_state_dict(state, assign=True, strict=True)
    net.inv_freq = {t: f.to(device) for t, f in net.inv_freq.items()}
    return net.eval().requires_grad_(False)


def save_checkpoint(net: DiffusionGemma, out_dir: str | Path, max_shard_bytes: int = 16 * 2 ** 20,
                    generation_config: dict | None = None) -> None:
    """Write config.json and safetensors shards in the layout transformers reads and writes.

    Files are written to a temporary directory next to out_dir and moved into place at the end, so
    an interrupted save leaves no half-written checkpoint.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    for i, layer in enumerate(net.layers):
        tensors[ENCODER_SCALAR.format(i)] = layer.layer_scalar.detach().clone().cpu()
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    shards.append(cur)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out_dir.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            wm = {}
            for j, shard in enumerate(shards):
                fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                wm.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(net.config.to_hf_dict(), indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
            stale.unlink()
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def init_weights(net: DiffusionGemma, std: float = 0.02, seed: int | None = None) -> DiffusionGemma:
    """Random weights (normal(0, std) matrices, unit norms): for tests, benchmarks and training."""
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
            elif "per_expert_scale" in name or name.endswith("scale") or "norm" in name:
                p.fill_(1.0)
        for layer in net.layers:
            layer.layer_scalar.fill_(1.0)
    return net
