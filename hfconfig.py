"""config.json and generation_config.json as transformers 5.17.0 writes them, and what they mean here.

config.json (DiffusionGemmaConfig in transformers' configuration_diffusion_gemma.py) has the text
model's sizes under `text_config`, the canvas length and the stop ids at the top, and a vision tower
this text-only implementation skips but keeps. generation_config.json (DiffusionGemmaGenerationConfig)
holds the sampler's settings. Both are checked as they are read: a value that cannot be right is a
CheckpointError naming the file.

    from hfconfig import config_from_hf, config_to_hf, generation_config_to_hf, generation_settings
    from model import DiffusionGemmaConfig; from sampler import GenerationSettings
    again = config_from_hf(config_to_hf(DiffusionGemmaConfig.from_name("small")))
    settings = generation_settings(generation_config_to_hf(GenerationSettings()), [1])
"""

import json
from pathlib import Path

from model import DiffusionGemmaConfig
from sampler import GenerationSettings, SamplerSettings

MODEL_TYPE = "diffusion_gemma"
QUANT_FORMAT = "diffusiongemma-weight-only"  # config.json's quantization.format (quant.py writes and reads it)
PASSTHROUGH = ("vision_config", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image")
# transformers cannot build DiffusionGemma without a vision config; a checkpoint trained here has no
# vision tower, so it names the smallest one (transformers initialises it at load; text never uses it)
MINIMAL_VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "head_dim": 8, "position_embedding_size": 64}
# text_config keys read into DiffusionGemmaConfig fields of the same name
TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "num_experts", "top_k_experts", "moe_intermediate_size",
             "rms_norm_eps", "sliding_window", "max_position_embeddings", "final_logit_softcapping",
             "layer_types", "rope_parameters", "pad_token_id", "bos_token_id")
POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "num_experts", "top_k_experts", "moe_intermediate_size",
            "sliding_window", "max_position_embeddings", "canvas_length")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def config_from_hf(d: dict, where: str = "config.json") -> DiffusionGemmaConfig:
    """Read a transformers `config.json` (top level `diffusion_gemma`, nested `text_config`)."""
    if d.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where} is for model_type {d.get('model_type')!r}, not {MODEL_TYPE!r}: "
                              "use a DiffusionGemma checkpoint")
    t = d.get("text_config")
    if not isinstance(t, dict):
        raise CheckpointError(f"{where} has no text_config: the file is incomplete; download it again")
    if t.get("use_bidirectional_attention") == "all":
        raise CheckpointError(f"{where}: use_bidirectional_attention='all' is not supported (released: 'vision')")
    if d.get("quantization_config") or t.get("quantization_config"):
        raise CheckpointError(f"{where} has a quantization_config (another tool's format, e.g. NVFP4): "
                              "use the bf16 checkpoint, and quantize.py for int8/int4")
    block = d.get("quantization")
    if block is not None and (not isinstance(block, dict) or block.get("format") != QUANT_FORMAT):
        raise CheckpointError(f"{where}: unknown quantization block {block!r}; write it with quantize.py")
    if not d.get("tie_word_embeddings", True):
        raise CheckpointError(f"{where}: an untied lm_head is not supported (the released model ties it)")
    kw = {k: t[k] for k in TEXT_KEYS if t.get(k) is not None}
    eos = d.get("eos_token_id", t.get("eos_token_id"))
    if eos is not None:
        kw["eos_token_id"] = eos if isinstance(eos, list) else [eos]
    kw["canvas_length"] = d.get("canvas_length", 256)
    kw["dtype"] = str(d.get("dtype") or t.get("dtype") or d.get("torch_dtype") or "bfloat16")
    kw["passthrough"] = {k: d[k] for k in PASSTHROUGH if d.get(k) is not None}
    kw["quantization"] = block
    kw["bidirectional_images"] = t.get("use_bidirectional_attention") == "vision"
    kw["image_token_id"] = d.get("image_token_id")
    # full layers: transformers 5.17 reads `per_layer_config` when present (written since 5.17, even
    # empty); else global_head_dim (absent: 512) and num_global_key_value_heads (absent: the sliding
    # layers' count); it writes null for both when the full layers use the sliding layers' sizes
    kw["global_head_dim"] = t.get("global_head_dim", 512)
    kw["num_global_key_value_heads"] = t.get("num_global_key_value_heads")
    try:
        cfg = DiffusionGemmaConfig(**kw)
        if "per_layer_config" in t:
            cfg.per_layer = {}
            for key, over in (t["per_layer_config"] or {}).items():
                layers = [int(key)] if str(key).isdigit() else [i for i, lt in enumerate(cfg.layer_types) if lt == key]
                for i in layers:
                    cfg.per_layer.setdefault(i, {}).update(over)
        validate_config(cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where} is not a valid DiffusionGemma config ({e}); download it again") from None
    return cfg


def validate_config(cfg: DiffusionGemmaConfig) -> None:
    """Raise ValueError on sizes that cannot describe a DiffusionGemma."""
    for name in POSITIVE:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive whole number, not {v!r}")
    if not isinstance(cfg.layer_types, list) or len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ValueError(f"layer_types must list num_hidden_layers ({cfg.num_hidden_layers}) entries")
    if set(cfg.layer_types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"unknown layer type in {sorted(set(cfg.layer_types))}")
    if cfg.layer_types[-1] != "full_attention":
        raise ValueError("the last layer must be a full_attention layer")
    if cfg.top_k_experts > cfg.num_experts:
        raise ValueError(f"top_k_experts {cfg.top_k_experts} > num_experts {cfg.num_experts}")
    for i in range(cfg.num_hidden_layers):
        d, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        if not (isinstance(d, int) and d > 0 and d % 2 == 0 and isinstance(kv, int) and kv > 0):
            raise ValueError(f"layer {i}: head_dim {d!r} must be a positive even number and kv heads {kv!r} positive")
        if cfg.num_attention_heads % kv:
            raise ValueError(f"layer {i}: {cfg.num_attention_heads} attention heads do not split over {kv} kv heads")
    for kind in set(cfg.layer_types):
        if not isinstance((cfg.rope_parameters or {}).get(kind), dict):
            raise ValueError(f"rope_parameters has nothing for {kind}")
    if not all(isinstance(e, int) and 0 <= e < cfg.vocab_size for e in cfg.eos_token_id):
        raise ValueError(f"eos_token_id {cfg.eos_token_id} is not a list of token ids below vocab_size")
    cfg.torch_dtype()  # a dtype torch has


def config_to_hf(cfg: DiffusionGemmaConfig) -> dict:
    """The `config.json` that transformers 5.17.0 reads (and writes for the released model)."""
    text = {
        "model_type": "diffusion_gemma_text",
        **{k: getattr(cfg, k) for k in TEXT_KEYS},
        "eos_token_id": cfg.eos_token_id[0],
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": "vision" if cfg.bidirectional_images else None,
        "tie_word_embeddings": True,
        "dtype": cfg.dtype,
    }
    if cfg.per_layer is not None:
        text["per_layer_config"] = {str(i): dict(o) for i, o in cfg.per_layer.items()}
    else:  # the sizes the full layers really have (the last layer is always a full one)
        text["global_head_dim"] = cfg.layer_head_dim(cfg.num_hidden_layers - 1)
        text["num_global_key_value_heads"] = cfg.layer_kv_heads(cfg.num_hidden_layers - 1)
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": MODEL_TYPE,
        "canvas_length": cfg.canvas_length,
        "eos_token_id": list(cfg.eos_token_id),
        "tie_word_embeddings": True,
        "dtype": cfg.dtype,
        "text_config": text,
        "vision_config": MINIMAL_VISION_CONFIG,
        **({"image_token_id": cfg.image_token_id} if cfg.image_token_id is not None else {}),
        **cfg.passthrough,
        **({"quantization": cfg.quantization} if cfg.quantization else {}),
    }


def read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file, or a CheckpointError naming it."""
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); download it again") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file} is not a JSON object; download it again")
    return d


def read_config(path: str | Path) -> DiffusionGemmaConfig:
    """The DiffusionGemmaConfig of a checkpoint directory."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a checkpoint directory")
    return config_from_hf(read_json(cfg), where=str(cfg))


def read_generation_config(path: str | Path | None, config_eos: list[int]) -> GenerationSettings:
    """The checkpoint's generation_config.json over the transformers defaults. Without one, the stop
    ids come from config.json (transformers would not stop at all)."""
    file = None if path is None else Path(path) / "generation_config.json"
    if file is None or not file.is_file():
        return generation_settings({}, config_eos)
    return generation_settings(read_json(file), config_eos, str(file))


def generation_settings(g: dict, config_eos: list[int], where: str = "generation_config.json") -> GenerationSettings:
    """GenerationSettings from the fields of a generation_config.json (unset fields: null or absent)."""
    g = {k: v for k, v in g.items() if v is not None}
    s = SamplerSettings()
    try:
        s.max_steps = g.get("max_denoising_steps", s.max_steps)
        s.entropy_bound = (g.get("sampler_config") or {}).get("entropy_bound", s.entropy_bound)
        s.t_min, s.t_max = g.get("t_min", s.t_min), g.get("t_max", s.t_max)
        s.stability_threshold = g.get("stability_threshold", s.stability_threshold)
        s.confidence_threshold = g.get("confidence_threshold", s.confidence_threshold)
        eos = g.get("eos_token_id", config_eos)
        eos = tuple(eos if isinstance(eos, list) else [eos])
        settings = GenerationSettings(max_new_tokens=g.get("max_new_tokens", 256), sampler=s, eos_token_ids=eos,
                                      pad_token_id=g.get("pad_token_id", 0))
        validate_generation(settings)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where} has a bad value ({e}); fix it or download it again") from None
    return settings


def generation_config_to_hf(g: GenerationSettings) -> dict:
    """The generation_config.json of these settings, as transformers writes DiffusionGemmaGenerationConfig."""
    s = g.sampler
    return {"max_new_tokens": g.max_new_tokens, "max_denoising_steps": s.max_steps,
            "sampler_config": {"entropy_bound": s.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": s.t_min, "t_max": s.t_max, "stability_threshold": s.stability_threshold,
            "confidence_threshold": s.confidence_threshold, "eos_token_id": list(g.eos_token_ids),
            "pad_token_id": g.pad_token_id}


def validate_generation(g: GenerationSettings) -> None:
    """Raise ValueError on generation settings that cannot be used."""
    def whole(name, v, least):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be a whole number >= {least}, not {v!r}")
    s = g.sampler
    whole("max_new_tokens", g.max_new_tokens, 1)
    whole("max_denoising_steps", s.max_steps, 1)
    whole("stability_threshold", s.stability_threshold, 0)
    whole("pad_token_id", g.pad_token_id, 0)
    for name, v in (("entropy_bound", s.entropy_bound), ("t_min", s.t_min), ("t_max", s.t_max)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name} must be a number > 0, not {v!r}")
    if s.t_min > s.t_max:
        raise ValueError(f"t_min {s.t_min} is above t_max {s.t_max}")
    if s.confidence_threshold is not None and not (isinstance(s.confidence_threshold, (int, float))
                                                   and s.confidence_threshold >= 0):
        raise ValueError(f"confidence_threshold must be a number >= 0, not {s.confidence_threshold!r}")
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in g.eos_token_ids):
        raise ValueError(f"eos_token_id {list(g.eos_token_ids)} must be token ids")
