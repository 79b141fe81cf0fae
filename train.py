"""Train a DiffusionGemma of any size with the block-diffusion recipe (SPEC §4, training).

The recipe (NVIDIA NeMo Automodel's DiffusionGemma training, as published):
  - a sequence is [prefix ; response], the response cut into canvas-sized blocks;
  - per block a noise level t ~ U(eps, 1); each response token becomes a uniformly random token
    with probability t (uniform-state noise: no [MASK] token);
  - one weight stack runs twice: a clean causal pass over the whole sequence builds each layer's
    K/V, and a pass over the noised blocks attends to [clean prefix ; its own block] with the
    block-causal mask (block i sees the prompt and the clean blocks before i, and itself
    bidirectionally; sliding layers also keep a window anchored at the block);
  - loss: flat cross-entropy of the noised pass against the clean tokens, plus (optional) the
    autoregressive next-token loss of the clean pass;
  - self-conditioning, for half of the examples: a first pass without gradient and with zero
    self-conditioning, then the real pass conditioned on its softmax.
Both passes run as one sequence [clean ; noised] with one mask, which is exactly two passes over
one stack: clean queries never see noised keys.

The default run trains the small model bundled under weights/ on the Python standard library.

    python train.py --out runs/small --minutes 30          # resumable: run again to continue
    python train.py --out runs/small --export weights      # write the checkpoint layout
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcache import KVCache
from model import DiffusionGemma, DiffusionGemmaConfig, init_weights, save_checkpoint

PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # at ids 0..3, as the config names them

SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, num_global_key_value_heads=1, global_head_dim=128, intermediate_size=512,
             num_experts=8, top_k_experts=2, moe_intermediate_size=128, sliding_window=64,
             max_position_embeddings=4096, canvas_length=32, eos_token_id=[EOS], dtype="float32",
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                 "rope_theta": 1000000.0}})
# a micro model with the same features, for tests of the training loop
TINY = dict(SMALL, vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
            global_head_dim=32, intermediate_size=48, num_experts=4, moe_intermediate_size=16,
            sliding_window=16, canvas_length=8, layer_types=["sliding_attention", "full_attention"])
PRESETS = {"small": SMALL, "tiny": TINY}


# ---------------------------------------------------------------------------------------------
# Data: the Python standard library of this machine
# ---------------------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The standard library's .py files, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)
             and not p.name.startswith("test_")]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def write_manifest(files: list[Path], path: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root)}" for f in files]
    path.write_text(f"# Python {sys.version.split()[0]} standard library, {len(files)} files\n" + "\n".join(lines) + "\n")


def is_held_out(f: Path) -> bool:
    """About 5% of the files, chosen by name, never trained on."""
    return hashlib.sha256(f.name.encode()).digest()[0] < 13


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    tok.save(str(out))
    return tok


def encode_corpus(tok, files: list[Path]) -> torch.Tensor:
    """All files as one stream of token ids, each file followed by <eos>."""
    ids = []
    for enc in tok.encode_batch([f.read_text(encoding="utf-8", errors="replace") for f in files],
                                add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def training_mask(prefix: int, n_blocks: int, C: int, window: int | None) -> torch.Tensor:
    """(Q, K) bool mask over the sequence [clean (L tokens) ; noised (L - prefix tokens)], Q = K = 2L - prefix.

    clean query q (position q) sees clean keys p <= q (and p > q - window on sliding layers);
    noised query in block i (position q) sees clean keys p < prefix + i*C and noised keys of block i;
    on sliding layers clean keys must also satisfy p > prefix + i*C - window (anchored at the block).
    """
    L = prefix + n_blocks * C
    pos_clean = torch.arange(L)
    pos_noised = torch.arange(prefix, L)
    blk = (pos_noised - prefix) // C  # block of each noised token
    cc = pos_clean[None, :] <= pos_clean[:, None]  # clean -> clean
    start = prefix + blk * C  # first position of each noised query's block
    nc = pos_clean[None, :] < start[:, None]  # noised -> clean: strictly before its block
    nn_ = blk[:, None] == blk[None, :]  # noised -> noised: its own block only
    if window is not None:
        cc &= pos_clean[None, :] > pos_clean[:, None] - window
        nc &= pos_clean[None, :] > start[:, None] - window
    top = torch.cat([cc, torch.zeros(L, L - prefix, dtype=torch.bool)], dim=1)
    bottom = torch.cat([nc, nn_], dim=1)
    return torch.cat([top, bottom], dim=0)


def noise_blocks(response: torch.Tensor, C: int, vocab: int, eps: float, g: torch.Generator):
    """Per block t ~ U(eps, 1); each token becomes a uniform random token with probability t."""
    B, N = response.shape
    t = eps + (1 - eps) * torch.rand(B, N // C, 1, generator=g)
    t = t.expand(B, N // C, C).reshape(B, N)
    flip = torch.rand(B, N, generator=g) < t
    rnd = torch.randint(0, vocab, (B, N), generator=g)
    return torch.where(flip, rnd, response), flip


def forward_train(model: DiffusionGemma, clean: torch.Tensor, noised: torch.Tensor, prefix: int,
                  sc_logits: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None):
    """Both passes as one sequence. clean (B, L), noised (B, L - prefix). Returns the clean pass's
    logits (B, L, V) and the noised pass's (B, L - prefix, V)."""
    c = model.config
    B, L = clean.shape
    n_blocks = (L - prefix) // c.canvas_length
    e_clean = model.embed(clean)
    e_noised = model.embed(noised)
    soft = torch.zeros_like(e_noised)
    if sc_logits is not None:
        soft = model.soft_embed(sc_logits)
        if sc_mask is not None:
            soft = soft * sc_mask.to(soft.dtype)[:, None, None]
    h = torch.cat([e_clean, model.self_conditioning(e_noised, soft)], dim=1)  # (B, 2L - prefix, D)
    positions = torch.cat([torch.arange(L), torch.arange(prefix, L)]).to(clean.device)[None]
    masks = {}
    for kind in set(c.layer_types):
        window = c.sliding_window if kind == "sliding_attention" else None
        masks[kind] = training_mask(prefix, n_blocks, c.canvas_length, window).to(clean.device)[None, None]
    cache = KVCache(c.layer_types, 10 ** 9)  # a throwaway cache: nothing is kept between calls
    h = model.run_layers(h, positions, cache, [masks[t] for t in c.layer_types], "causal")
    logits = model.logits(model.norm(h))
    return logits[:, :L], logits[:, L:]


def loss_fn(model, batch: torch.Tensor, prefix: int, g: torch.Generator, ar_weight: float, sc_prob: float,
            eps: float = 1e-3):
    c = model.config
    response = batch[:, prefix:]
    noised, _ = noise_blocks(response.cpu(), c.canvas_length, c.vocab_size, eps, g)
    noised = noised.to(batch.device)
    sc_logits = sc_mask = None
    if sc_prob > 0:
        sc_mask = (torch.rand(batch.shape[0], generator=g) < sc_prob).to(batch.device)
        if sc_mask.any():
            with torch.no_grad():  # pass 1: no gradient, no self-conditioning
                _, first = forward_train(model, batch, noised, prefix)
            sc_logits = first.detach()
    clean_logits, logits = forward_train(model, batch, noised, prefix, sc_logits, sc_mask)
    diff = F.cross_entropy(logits.reshape(-1, c.vocab_size).float(), response.reshape(-1))
    ar = F.cross_entropy(clean_logits[:, :-1].reshape(-1, c.vocab_size).float(), batch[:, 1:].reshape(-1))
    return diff + ar_weight * ar, diff.detach(), ar.detach()


@torch.no_grad()
def heldout_loss(model, data: torch.Tensor, prefix: int, L: int, t: float, n: int = 16, seed: int = 0) -> float:
    """Cross-entropy per token of the noised pass at a fixed noise level t, on held-out windows."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - L, (n,), generator=g)
    batch = torch.stack([data[s: s + L] for s in starts]).long().to(next(model.parameters()).device)
    response = batch[:, prefix:].cpu()
    flip = torch.rand(response.shape, generator=g) < t
    noised = torch.where(flip, torch.randint(0, c.vocab_size, response.shape, generator=g), response)
    _, logits = forward_train(model, batch, noised.to(batch.device), prefix)
    return F.cross_entropy(logits.reshape(-1, c.vocab_size).float(), batch[:, prefix:].reshape(-1)).item()


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# a small, weakly trained model is rarely sure of any token: a larger entropy budget lets each step
# keep several tokens (measured on the infill eval: 0.1 -> 4.0%, 3 -> 4.7%, 10 -> 5.5% exact tokens)
GENERATION_CONFIG = {"max_new_tokens": 64, "max_denoising_steps": 32,
                     "sampler_config": {"entropy_bound": 10.0, "_cls_name": "EntropyBoundSamplerConfig"},
                     "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
                     "eos_token_id": [EOS], "pad_token_id": PAD}


def prepare(out: Path, vocab_size: int, max_files: int | None = None):
    """Tokenizer, manifest and the encoded corpus, made once per run directory."""
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    if max_files:
        train_files = [f for f in files if not is_held_out(f)][:max_files]
        files = train_files + [f for f in files if is_held_out(f)][:max(1, max_files // 4)]
    if not (out / "tokenizer.json").exists():
        write_manifest(files, out / "manifest.txt")
        train_tokenizer([f for f in files if not is_held_out(f)], vocab_size, out / "tokenizer.json")
    if not (out / "data.pt").exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        torch.save({"train": encode_corpus(tok, [f for f in files if not is_held_out(f)]),
                    "heldout": encode_corpus(tok, [f for f in files if is_held_out(f)])}, out / "data.pt")
    return torch.load(out / "data.pt")


def main(a) -> int:
    out = Path(a.out)
    cfg = DiffusionGemmaConfig(**PRESETS[a.preset])
    data = prepare(out, cfg.vocab_size, a.max_files)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(a.seed)
    model = init_weights(DiffusionGemma(cfg), seed=a.seed).to(device)
    model.inv_freq = {k: v.to(device) for k, v in model.inv_freq.items()}
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = out / "state.pt"
    step, tokens, elapsed = 0, 0, 0.0
    if state_path.exists():  # resume
        st = torch.load(state_path, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, tokens, elapsed = st["step"], st["tokens"], st["elapsed"]
    if a.export:
        model.config.dtype = a.export_dtype
        model.to(getattr(torch, a.export_dtype))
        save_checkpoint(model, a.export, generation_config=GENERATION_CONFIG)
        import shutil
        for f in ("tokenizer.json", "manifest.txt"):
            shutil.copy(out / f, Path(a.export) / f)
        print(f"wrote {a.export} (step {step}, {tokens / 1e6:.2f}M tokens, {elapsed / 60:.1f} min)")
        return 0
    L = a.prefix + a.blocks * cfg.canvas_length
    train_data = data["train"]
    g = torch.Generator().manual_seed(a.seed + step)
    from tqdm import tqdm
    bar = tqdm(total=a.steps, initial=step, file=sys.stderr, dynamic_ncols=True)
    t_start, deadline = time.time(), time.time() + a.minutes * 60
    log = open(out / "log.txt", "a")
    while step < a.steps and time.time() < deadline:
        starts = torch.randint(0, len(train_data) - L, (a.batch,), generator=g)
        batch = torch.stack([train_data[s: s + L] for s in starts]).long().to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.warmup, a.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, diff, ar = loss_fn(model, batch, a.prefix, g, a.ar_weight, a.sc_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        now = time.time()
        bar.set_postfix(loss=f"{diff.item():.3f}", ar=f"{ar.item():.3f}",
                        tok_s=f"{tokens / max(elapsed + now - t_start, 1e-9):.0f}")
        bar.update(1)
        if step % a.eval_every == 0 or step == a.steps or now >= deadline:
            model.eval()
            ev = heldout_loss(model, data["heldout"], a.prefix, L, 0.5)
            model.train()
            print(f"step {step} tokens {tokens} diffusion {diff.item():.4f} ar {ar.item():.4f} "
                  f"heldout@0.5 {ev:.4f} minutes {(elapsed + now - t_start) / 60:.1f}", file=log, flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens": tokens,
                        "elapsed": elapsed + time.time() - t_start}, state_path)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens": tokens,
                "elapsed": elapsed + time.time() - t_start}, state_path)
    bar.close()
    return 0


def build_parser():
    p = argparse.ArgumentParser(description="Train DiffusionGemma (the small bundled model by default).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (tiny: for tests)")
    p.add_argument("--max-files", type=int, help="train on only the first N standard-library files (tests)")
    p.add_argument("--out", default="runs/small", help="run directory (tokenizer, data, resumable state, log)")
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps (sets the cosine schedule)")
    p.add_argument("--minutes", type=float, default=1e9, help="stop after this many minutes (resume later)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--prefix", type=int, default=64, help="clean prefix tokens before the noised blocks")
    p.add_argument("--blocks", type=int, default=2, help="noised canvas-sized blocks per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--ar-weight", type=float, default=0.5, help="weight of the autoregressive loss (0: off)")
    p.add_argument("--sc-prob", type=float, default=0.5, help="share of examples trained with self-conditioning")
    p.add_argument("--eval-every", type=int, default=50, help="held-out evaluation and checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--export", help="write the trained model as a checkpoint directory and exit")
    p.add_argument("--export-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the exported weights (default bfloat16: half the size)")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
