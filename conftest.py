"""Shared test fixtures: tiny DiffusionGemma checkpoints written by transformers, and a tiny tokenizer.

The checkpoints have every feature of the released model (sliding and full layers, K = V and
proportional RoPE on the full layers, dense MLP + MoE, self-conditioning, a vision tower that the
loader must skip) at a size that runs in milliseconds on a CPU.
"""

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parent.parent / "shared"
GEMMA4_TOKENIZER = SHARED / "fixtures" / "gemma4-tokenizer" / "tokenizer.json"

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)

# two shapes: A has a prompt longer than its sliding window and many canvases; B has a different
# layer pattern, head sizes and routing
CONFIGS = {
    "A": dict(canvas_length=16, text_config=dict(
        vocab_size=300, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, intermediate_size=96, num_experts=8,
        top_k_experts=2, moe_intermediate_size=32, sliding_window=16)),
    "B": dict(canvas_length=8, text_config=dict(
        vocab_size=320, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        head_dim=12, global_head_dim=24, num_global_key_value_heads=2, intermediate_size=80, num_experts=6,
        top_k_experts=3, moe_intermediate_size=16, sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    # the shapes the CUDA kernels take (hidden and expert sizes multiples of 64, head_dim of 16)
    "K": dict(canvas_length=32, text_config=dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, global_head_dim=64, num_global_key_value_heads=1, intermediate_size=128, num_experts=8,
        top_k_experts=2, moe_intermediate_size=64, sliding_window=48)),
}

GENERATION_CONFIG = {"max_new_tokens": 256, "max_denoising_steps": 48,
                     "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
                     "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
                     "eos_token_id": [1, 106, 50], "pad_token_id": 0}


def build_hf_model(name: str, seed: int = 0):
    """A transformers DiffusionGemmaForBlockDiffusion with random weights, every norm and scalar
    perturbed too so that a mix-up of any two of them shows."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    spec = CONFIGS[name]
    cfg = DiffusionGemmaConfig(vision_config=dict(TINY_VISION), eos_token_id=[1, 106, 50],
                               canvas_length=spec["canvas_length"],
                               text_config=dict(spec["text_config"], use_bidirectional_attention="vision"))
    torch.manual_seed(seed)
    hf = DiffusionGemmaForBlockDiffusion(cfg).float().eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.03))
        for i, layer in enumerate(hf.model.decoder.layers):  # the two copies are equal, as released
            layer.layer_scalar.uniform_(0.7, 1.3)
            hf.model.encoder.language_model.layers[i].layer_scalar.copy_(layer.layer_scalar)
    return hf


def write_hf_checkpoint(name: str, path: Path, seed: int = 0):
    hf = build_hf_model(name, seed)
    hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    # the reference reads the very files we read (generation_config.json included)
    return type(hf).from_pretrained(path, dtype=torch.float32).eval()


def tiny_tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE over a little English and Python, with the special tokens at ids 0-3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 3,
            "for i in range(10):\n    print(i)\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_a")
    hf = write_hf_checkpoint("A", path)
    return path, hf


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_b")
    hf = write_hf_checkpoint("B", path, seed=1)
    return path, hf


@pytest.fixture(scope="session")
def ckpt_k(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_k")
    hf = write_hf_checkpoint("K", path, seed=3)
    return path, hf


@pytest.fixture(scope="session")
def chat_free_ckpt(tmp_path_factory):
    """Checkpoint B plus a tiny tokenizer (vocab 300 of the model's 320, no chat markers): runs the CLI end to end."""
    path = tmp_path_factory.mktemp("ckpt_cli")
    write_hf_checkpoint("B", path, seed=2)
    tiny_tokenizer_json(path, 300)
    return path
