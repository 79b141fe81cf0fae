"""Shared test fixtures: tiny DiffusionGemma checkpoints written by transformers, and tokenizers.

The checkpoints have every feature of the released model (sliding and full layers, K = V and
proportional RoPE on the full layers, dense MLP + MoE, self-conditioning, a vision tower that the
loader must skip) at the sizes of model.CONFIGS["test-*"], which run in milliseconds on a CPU.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from hfconfig import config_to_hf
from data import train_tokenizer
from model import RELEASED_EOS, DiffusionGemmaConfig
from sampler import RELEASED_GENERATION_EOS

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "shared" / "fixtures"  # test-only files kept beside the repository
GEMMA4_TOKENIZER = FIXTURES / "gemma4-tokenizer" / "tokenizer.json"
TEMPLATES = FIXTURES / "gemma4-chat-templates"
needs_gemma4 = pytest.mark.skipif(not GEMMA4_TOKENIZER.exists(), reason="the Gemma 4 tokenizer fixture is absent")

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)
GENERATION_CONFIG = {"max_new_tokens": 256, "max_denoising_steps": 48,
                     "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
                     "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
                     "eos_token_id": list(RELEASED_GENERATION_EOS), "pad_token_id": 0}


def build_hf_model(name: str, seed: int = 0):
    """A transformers DiffusionGemmaForBlockDiffusion of CONFIGS[name] with random weights, every
    norm and scalar perturbed too so that a mix-up of any two of them shows."""
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion
    ours = DiffusionGemmaConfig.from_name(name)
    cfg = HFConfig(vision_config=dict(TINY_VISION), eos_token_id=list(RELEASED_EOS), canvas_length=ours.canvas_length,
                   text_config=config_to_hf(ours)["text_config"])
    torch.manual_seed(seed)
    hf = DiffusionGemmaForBlockDiffusion(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.03))
        for i, layer in enumerate(hf.model.decoder.layers):  # the two copies are equal, as released
            layer.layer_scalar.uniform_(0.7, 1.3)
            hf.model.encoder.language_model.layers[i].layer_scalar.copy_(layer.layer_scalar)
    return hf


def write_hf_checkpoint(name: str, path: Path, seed: int = 0):
    """Save build_hf_model(name) with transformers; return transformers' model read back from it."""
    hf = build_hf_model(name, seed)
    hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    tiny_tokenizer_json(path, 300)  # every checkpoint a user downloads has one
    # the reference reads the very files we read (generation_config.json included)
    return type(hf).from_pretrained(path, dtype=torch.float32).eval()


def tiny_tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE over a little English and Python, with the special tokens at ids 0-3."""
    text = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 3,
            "for i in range(10):\n    print(i)\n"] * 20
    train_tokenizer(text, vocab_size, path / "tokenizer.json")
    return path / "tokenizer.json"


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_a")
    return path, write_hf_checkpoint("test-a", path)


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_b")
    return path, write_hf_checkpoint("test-b", path, seed=1)


@pytest.fixture(scope="session")
def ckpt_c(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_c")
    return path, write_hf_checkpoint("test-c", path, seed=4)


@pytest.fixture(scope="session")
def chat_free_ckpt(tmp_path_factory):
    """test-b plus a tiny tokenizer (vocab 300 of the model's 320, no chat markers): runs the CLI end to end."""
    path = tmp_path_factory.mktemp("ckpt_cli")
    write_hf_checkpoint("test-b", path, seed=2)
    return path


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A checkpoint whose tokenizer is the Gemma 4 one (vocab 262,144, so the model is wide but
    shallow): the chat format with real ids, end to end."""
    if not GEMMA4_TOKENIZER.exists():
        pytest.skip("the Gemma 4 tokenizer fixture is absent")
    from checkpoint import save_checkpoint
    from model import DiffusionGemma, init_weights
    path = tmp_path_factory.mktemp("ckpt_chat") / "ckpt"
    cfg = DiffusionGemmaConfig.from_name("tiny", vocab_size=262144, hidden_size=16, intermediate_size=16,
                                         moe_intermediate_size=16, head_dim=8, global_head_dim=8,
                                         eos_token_id=list(RELEASED_EOS), max_position_embeddings=4096)
    save_checkpoint(init_weights(DiffusionGemma(cfg), std=0.5, seed=0), path, max_shard_bytes=2 ** 30,
                    generation_config=GENERATION_CONFIG, extra_files=[GEMMA4_TOKENIZER])
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
