"""Evaluate a small DiffusionGemma trained by train.py on held-out standard-library code.

  1. held-out loss per token of the denoiser at noise levels 0.25, 0.5 and 0.75;
  2. infill: in 200 held-out 64-token windows, hide the 16 tokens after the first 32 and let the
     model fill them with the left context as the prompt and the right 16 tokens pinned after the
     gap; exact-token accuracy against two baselines: the most frequent training token (unigram),
     and the same model given only the left context.

    python eval.py --model weights
    python eval.py --model weights --compare weights-int4     # what quantization changes (50 prompts)
"""

import argparse
import json
import sys
from collections import Counter

import torch

import train
from generate import block_diffusion, load, settings_for


def held_out_stream(tokenizer) -> torch.Tensor:
    files = [f for f in train.stdlib_files() if train.is_held_out(f)]
    return train.encode_corpus(tokenizer.tok, files)


def unigram_token(tokenizer) -> int:
    """The most frequent token of the training files."""
    files = [f for f in train.stdlib_files() if not train.is_held_out(f)]
    counts = Counter(train.encode_corpus(tokenizer.tok, files).tolist())
    counts.pop(train.EOS, None)
    return counts.most_common(1)[0][0]


@torch.no_grad()
def infill_accuracy(model, data: torch.Tensor, n: int = 200, left: int = 32, gap: int = 16, right: int = 16,
                    seed: int = 0, steps: int | None = None, entropy_bound: float | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    W = left + gap + right
    starts = torch.randint(0, len(data) - W, (n,), generator=g)
    windows = torch.stack([data[s: s + W] for s in starts]).long()
    truth = windows[:, left: left + gap]
    prompts = [w[:left].tolist() for w in windows]
    settings = settings_for(model, max_new_tokens=gap + right, steps=steps, entropy_bound=entropy_bound)
    settings.eos_token_ids = ()  # fixed-length fills
    both_pins = [{gap + i: int(t) for i, t in enumerate(w[left + gap:])} for w in windows]
    torch.manual_seed(seed)
    both = block_diffusion(model, prompts, settings, pins=both_pins).sequences[:, left: left + gap].cpu()
    torch.manual_seed(seed)
    left_only = block_diffusion(model, prompts, settings).sequences[:, left: left + gap].cpu()
    return {"both": (both == truth).float().mean().item(), "left_only": (left_only == truth).float().mean().item(),
            "truth": truth}


@torch.no_grad()
def compare(a) -> int:
    """Committed-token agreement of a second checkpoint (e.g. quantized) with the first over 50 held-out
    prompts (same seed, same settings), and the change in held-out loss."""
    dtype = torch.float32 if a.device == "cpu" else None  # bf16 matmuls are slow on CPUs
    ref, tok = load(a.model, device=a.device, dtype=dtype)
    other, _ = load(a.compare, device=a.device, dtype=dtype)
    data = held_out_stream(tok)
    g = torch.Generator().manual_seed(2)
    starts = torch.randint(0, len(data) - 64, (a.prompts,), generator=g)
    prompts = [data[s: s + 32].tolist() for s in starts]
    settings = settings_for(ref, max_new_tokens=ref.config.canvas_length)
    settings.eos_token_ids = ()
    out = []
    for m in (ref, other):
        torch.manual_seed(0)
        out.append(block_diffusion(m, prompts, settings).sequences[:, 32:])
    agree = (out[0] == out[1]).float().mean().item()
    c = ref.config
    losses = [train.heldout_loss(m, data, a.prefix, a.prefix + 2 * c.canvas_length, 0.5, n=64, seed=1)
              for m in (ref, other)]
    print(f"| {a.compare} vs {a.model} | value |\n|---|---|")
    print(f"| committed-token agreement, {a.prompts} prompts x {c.canvas_length} tokens | {agree:.4f} |")
    print(f"| held-out loss at t=0.5 | {losses[0]:.4f} -> {losses[1]:.4f} ({losses[1] - losses[0]:+.4f}) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"agreement": agree, "loss": losses}, f, indent=2)
    return 0


def main(a) -> int:
    if a.compare:
        return compare(a)
    model, tok = load(a.model, device=a.device, dtype=torch.float32)
    data = held_out_stream(tok)
    c = model.config
    res = {"loss": {}}
    for t in (() if a.skip_loss else (0.25, 0.5, 0.75)):
        res["loss"][t] = train.heldout_loss(model, data, a.prefix, a.prefix + 2 * c.canvas_length, t, n=64, seed=1)
    inf = infill_accuracy(model, data, n=a.snippets, steps=a.steps, entropy_bound=a.entropy_bound)
    uni = unigram_token(tok)
    res["infill"] = {"both_contexts": inf["both"], "left_only": inf["left_only"],
                     "unigram": (inf["truth"] == uni).float().mean().item(), "snippets": a.snippets}
    print("| noise level t | held-out loss per token |\n|---|---|")
    for t, v in res["loss"].items():
        print(f"| {t} | {v:.3f} |")
    i = res["infill"]
    print(f"\n| infill, {a.snippets} snippets, 16-token gaps | exact-token accuracy |\n|---|---|")
    print(f"| model, left + right context | {i['both_contexts']:.3f} |")
    print(f"| model, left context only | {i['left_only']:.3f} |")
    print(f"| unigram (most frequent token) | {i['unigram']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Held-out loss and infill accuracy of a small DiffusionGemma.")
    p.add_argument("--model", default="weights", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--snippets", type=int, default=200, help="infill snippets (default 200)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--entropy-bound", type=float, help="sampler entropy bound (default: the checkpoint's)")
    p.add_argument("--skip-loss", action="store_true", help="only the infill part")
    p.add_argument("--prefix", type=int, default=48, help="clean prefix of the loss windows (as in training)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compare", help="a second checkpoint (e.g. quantized): token agreement and loss change")
    p.add_argument("--prompts", type=int, default=50, help="prompts for --compare (default 50)")
    sys.exit(main(p.parse_args()))
