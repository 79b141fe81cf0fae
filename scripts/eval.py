"""Evaluate the small bundled models: the code model on held-out standard-library code, the Sudoku
model on held-out puzzles.

Code (the default):
  1. held-out loss per token of the denoiser at noise levels 0.25, 0.5 and 0.75;
  2. infill: in held-out 64-token windows, hide the 16 tokens after the first 32 and let the model
     fill them with the left context as the prompt and the right 16 tokens pinned after the gap;
     exact-token accuracy against two baselines: the most frequent training token (unigram), and
     the same model given only the left context.
Sudoku (--sudoku): exact-solve rate on 500 unique-solution puzzles never seen in training with
many givens, and on a harder slice with few, single sample and best-of-8 with the rules as the check.
--compare: what a second checkpoint (e.g. quantized) changes: committed-token agreement and loss.

    python scripts/eval.py --model weights-code --snippets 20 --skip-loss
    python scripts/eval.py --model weights --sudoku --puzzles 50
    python scripts/eval.py --model weights-code --compare weights-code --prompts 4
"""

import argparse
import json
import sys
from pathlib import Path
from collections import Counter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project: python scripts/eval.py

import data  # noqa: E402
import sudoku  # noqa: E402
import train  # noqa: E402
from generate import load, settings_for  # noqa: E402
from sampler import block_diffusion  # noqa: E402
from terminal import Parser  # noqa: E402


def held_out_stream(tokenizer) -> torch.Tensor:
    """The held-out files as one stream of token ids."""
    return data.encode_corpus(tokenizer.tok, [f for f in data.stdlib_files() if data.is_held_out(f)])


def windows(stream: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """n random windows of `length` tokens from a stream (seeded)."""
    starts = torch.randint(0, len(stream) - length, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s: s + length] for s in starts]).long()


def unigram_token(tokenizer) -> int:
    """The most frequent token of the training files."""
    counts = Counter(data.encode_corpus(tokenizer.tok, [f for f in data.stdlib_files()
                                                         if not data.is_held_out(f)]).tolist())
    counts.pop(data.EOS, None)
    return counts.most_common(1)[0][0]


@torch.no_grad()
def infill_accuracy(model, stream: torch.Tensor, *, n: int = 200, left: int = 32, gap: int = 16, right: int = 16,
                    seed: int = 0, steps: int | None = None, entropy_bound: float | None = None) -> dict:
    """Exact-token accuracy of infill, with both contexts and with the left one only."""
    w = windows(stream, n, left + gap + right, seed)
    truth = w[:, left: left + gap]
    prompts = [row[:left].tolist() for row in w]
    settings = settings_for(model, max_new_tokens=gap + right, steps=steps, entropy_bound=entropy_bound,
                            eos_token_ids=())  # fixed-length fills
    both_pins = [{gap + i: int(t) for i, t in enumerate(row[left + gap:])} for row in w]
    torch.manual_seed(seed)
    both = block_diffusion(model, prompts, settings, pins=both_pins).sequences[:, left: left + gap].cpu()
    torch.manual_seed(seed)
    left_only = block_diffusion(model, prompts, settings).sequences[:, left: left + gap].cpu()
    return {"both": (both == truth).float().mean().item(), "left_only": (left_only == truth).float().mean().item(),
            "truth": truth}


def loss_at(model, stream, prefix: int, t: float) -> float:
    """Held-out loss per token at noise level t, over 64 windows."""
    batch = windows(stream, 64, prefix + 2 * model.config.canvas_length, seed=1).to(model.device)
    return train.heldout_loss(model, batch, prefix, t, seed=1)


@torch.no_grad()
def compare(args) -> dict:
    """Committed-token agreement of a second checkpoint with the first over held-out prompts (same
    seed, same settings), and the change in held-out loss."""
    dtype = torch.float32 if args.device == "cpu" else None  # bf16 matmuls are slow on CPUs
    ref, tok = load(args.model, device=args.device, dtype=dtype)
    other, _ = load(args.compare, device=args.device, dtype=dtype)
    stream = held_out_stream(tok)
    prompts = [row[:32].tolist() for row in windows(stream, args.prompts, 64, seed=2)]
    settings = settings_for(ref, max_new_tokens=ref.config.canvas_length, eos_token_ids=())
    out = []
    for m in (ref, other):
        torch.manual_seed(0)
        out.append(block_diffusion(m, prompts, settings).sequences[:, 32:])
    agree = (out[0] == out[1]).float().mean().item()
    losses = [loss_at(m, stream, args.prefix, 0.5) for m in (ref, other)]
    print(f"| {args.compare} vs {args.model} | value |\n|---|---|")
    print(f"| committed-token agreement, {args.prompts} prompts x {ref.config.canvas_length} tokens | {agree:.4f} |")
    print(f"| held-out loss at t=0.5 | {losses[0]:.4f} -> {losses[1]:.4f} ({losses[1] - losses[0]:+.4f}) |")
    return {"agreement": agree, "loss": losses}


def sudoku_eval(args) -> dict:
    """Exact-solve rates of a Sudoku model on the easy and hard held-out slices."""
    model, tok = load(args.model, device=args.device, dtype=torch.float32)
    shape = sudoku.shape_of(tok)
    if shape is None:
        raise SystemExit(f"error: {args.model} is not a Sudoku model")
    settings = settings_for(model, steps=args.steps, entropy_bound=args.entropy_bound)
    res = {"grid": shape.n, "puzzles": args.puzzles}
    print(f"| {shape.n}x{shape.n}, {args.puzzles} held-out puzzles | givens | solved, 1 sample | solved, best of 8 |")
    print("|---|---|---|---|")
    for name, givens in (("easy", sudoku.EASY[shape.n]), ("hard", sudoku.HARD[shape.n])):
        pairs = sudoku.eval_puzzles(shape, args.puzzles, givens, seed=sudoku.TEST_SEED + givens[0])
        one = sudoku.solve_rate(model, pairs, shape, settings, samples=1)
        best = sudoku.solve_rate(model, pairs, shape, settings, samples=8)
        res[name] = {"givens": list(givens), "solved_1": one, "solved_best_of_8": best}
        print(f"| {name} | {givens[0]}-{givens[1]} | {one:.3f} | {best:.3f} |", flush=True)
    return res


def code_eval(args) -> dict:
    """Held-out loss and infill accuracy of the code model, against a unigram baseline."""
    model, tok = load(args.model, device=args.device, dtype=torch.float32)
    stream = held_out_stream(tok)
    res = {"loss": {t: loss_at(model, stream, args.prefix, t) for t in (() if args.skip_loss else (0.25, 0.5, 0.75))}}
    inf = infill_accuracy(model, stream, n=args.snippets, steps=args.steps, entropy_bound=args.entropy_bound)
    res["infill"] = {"both_contexts": inf["both"], "left_only": inf["left_only"],
                     "unigram": (inf["truth"] == unigram_token(tok)).float().mean().item(), "snippets": args.snippets}
    if res["loss"]:  # not with --skip-loss
        print("| noise level t | held-out loss per token |\n|---|---|")
        for t, v in res["loss"].items():
            print(f"| {t} | {v:.3f} |")
        print()
    i = res["infill"]
    print(f"| infill, {args.snippets} snippets, 16-token gaps | exact-token accuracy |\n|---|---|")
    print(f"| model, left + right context | {i['both_contexts']:.3f} |")
    print(f"| model, left context only | {i['left_only']:.3f} |")
    print(f"| unigram (most frequent token) | {i['unigram']:.3f} |")
    return res


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/eval.py."""
    p = Parser(description="Evaluate a small DiffusionGemma (code or Sudoku).")
    p.add_argument("--model", default="weights-code", help="checkpoint directory (default: the bundled code model)")
    p.add_argument("--sudoku", action="store_true", help="exact-solve rate of a Sudoku model")
    p.add_argument("--puzzles", type=int, default=500, help="--sudoku: puzzles per slice (default 500)")
    p.add_argument("--snippets", type=int, default=200, help="infill snippets (default 200)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--entropy-bound", type=float, help="sampler entropy bound (default: the checkpoint's)")
    p.add_argument("--skip-loss", action="store_true", help="only the infill part")
    p.add_argument("--prefix", type=int, default=48, help="clean prefix of the loss windows (as in training)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compare", help="a second checkpoint (e.g. quantized): token agreement and loss change")
    p.add_argument("--prompts", type=int, default=50, help="prompts for --compare (default 50)")
    return p


def main(args: argparse.Namespace) -> int:
    res = compare(args) if args.compare else sudoku_eval(args) if args.sudoku else code_eval(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
