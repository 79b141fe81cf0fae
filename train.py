"""Train a DiffusionGemma of any size with the block-diffusion recipe.

The recipe (NVIDIA NeMo Automodel's DiffusionGemma training, as published):
  - a sequence is [prefix ; response], the response cut into canvas-sized blocks;
  - per block a noise level t ~ U(eps, 1); each response token becomes a uniformly random token
    with probability t (uniform-state noise: no [MASK] token);
  - one weight stack runs twice: a clean causal pass builds each layer's K/V, and a pass over the
    noised blocks attends to [clean prefix ; its own block] with the block-causal mask (block i
    sees the prompt and the clean blocks before i, and itself bidirectionally; sliding layers also
    keep a window anchored at the block);
  - loss: flat cross-entropy of the noised pass against the clean tokens, plus (optional) the
    autoregressive next-token loss of the clean pass;
  - self-conditioning, for a share of the examples: a first pass without gradient and with zero
    self-conditioning, then the real pass conditioned on its softmax.
Both passes run as one sequence [clean ; noised] with one mask, which is exactly two passes over
one stack: clean queries never see noised keys. Without the AR loss the last clean block is not
needed (no noised block sees it) and is left out; the first self-conditioning pass runs only on the
rows that use it, and its logits only on the noised positions.

Two tasks: `code`, the Python standard library (data.py, the bundled code model), and `sudoku`,
solved grids as one canvas each (sudoku.py, the bundled Sudoku solver).

    python train.py --out runs/small --minutes 30                   # resumable: run again to continue
    python train.py --out runs/small --export weights-code --force  # write the checkpoint layout
    python train.py --task sudoku --grid 6 --out runs/sudoku6 --minutes 120
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import sudoku
from checkpoint import save_checkpoint
from model import CONFIGS, DiffusionGemma, DiffusionGemmaConfig, init_weights
from sampler import GenerationSettings, SamplerSettings
from terminal import Parser

# --preset: the named sizes (model.CONFIGS: "tiny" trains in seconds, for smoke runs) and the 9x9 Sudoku model's
PRESETS = {**CONFIGS, "sudoku-9": sudoku.SUDOKU_9}


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def training_mask(prefix: int, n_blocks: int, C: int, window: int | None, clean_blocks: int | None = None):
    """(Q, K) bool mask over [clean (prefix + clean_blocks*C tokens) ; noised (n_blocks*C tokens)].

    clean query q (position q) sees clean keys p <= q (and p > q - window on sliding layers);
    noised query in block i (position q) sees clean keys p < prefix + i*C and noised keys of block i;
    on sliding layers clean keys must also satisfy p > prefix + i*C - window (anchored at the block).
    clean_blocks (default n_blocks) may be n_blocks - 1: the last block's clean tokens are only
    needed by the AR loss.
    """
    L = prefix + (n_blocks if clean_blocks is None else clean_blocks) * C
    pos_clean = torch.arange(L)
    blk = torch.arange(n_blocks * C) // C  # block of each noised token
    cc = pos_clean[None, :] <= pos_clean[:, None]  # clean -> clean
    start = prefix + blk * C  # first position of each noised query's block
    nc = pos_clean[None, :] < start[:, None]  # noised -> clean: strictly before its block
    nn_ = blk[:, None] == blk[None, :]  # noised -> noised: its own block only
    if window is not None:
        cc &= pos_clean[None, :] > pos_clean[:, None] - window
        nc &= pos_clean[None, :] > start[:, None] - window
    top = torch.cat([cc, torch.zeros(L, n_blocks * C, dtype=torch.bool)], dim=1)
    bottom = torch.cat([nc, nn_], dim=1)
    return torch.cat([top, bottom], dim=0)


def noise_blocks(response: torch.Tensor, C: int, vocab: int, g: torch.Generator, eps: float = 1e-3,
                 t: float | None = None) -> torch.Tensor:
    """Each token becomes a uniformly random token with probability t: per block t ~ U(eps, 1), or
    the fixed t given (held-out evaluation)."""
    B, N = response.shape
    if t is None:
        level = eps + (1 - eps) * torch.rand(B, N // C, 1, generator=g)
        level = level.expand(B, N // C, C).reshape(B, N)
    else:
        level = torch.full((B, N), t)
    flip = torch.rand(B, N, generator=g) < level
    return torch.where(flip, torch.randint(0, vocab, (B, N), generator=g), response)


def forward_train(model: DiffusionGemma, clean: torch.Tensor, noised: torch.Tensor, prefix: int,
                  sc_embeds: torch.Tensor | None = None, clean_logits: bool = True):
    """Both passes as one sequence. clean (B, Lc), noised (B, N) with N a whole number of canvases;
    sc_embeds (B, N, D): the self-conditioning embeddings (None: zero). Returns the clean pass's
    logits (B, Lc, V) (None unless clean_logits) and the noised pass's (B, N, V)."""
    c = model.config
    B, Lc = clean.shape
    N = noised.shape[1]
    n_blocks, clean_blocks = N // c.canvas_length, (Lc - prefix) // c.canvas_length
    e_noised = model.embed(noised)
    sc_embeds = torch.zeros_like(e_noised) if sc_embeds is None else sc_embeds
    h = torch.cat([model.embed(clean), model.self_conditioning(e_noised, sc_embeds)], dim=1)  # (B, Lc + N, D)
    positions = torch.cat([torch.arange(Lc), torch.arange(prefix, prefix + N)]).to(clean.device)[None]
    masks = {kind: training_mask(prefix, n_blocks, c.canvas_length,
                                 c.sliding_window if kind == "sliding_attention" else None,
                                 clean_blocks).to(clean.device)[None, None]
             for kind in set(c.layer_types)}
    h = model.norm(model.run_layers(h, positions, None, [masks[t] for t in c.layer_types], "causal"))
    return (model.logits(h[:, :Lc]) if clean_logits else None), model.logits(h[:, Lc:])


def loss_fn(model, batch: torch.Tensor, prefix: int, g: torch.Generator, ar_weight: float, sc_prob: float):
    """(loss, diffusion loss, AR loss) of a batch (B, prefix + blocks * canvas_length)."""
    c = model.config
    response = batch[:, prefix:]
    noised = noise_blocks(response.cpu(), c.canvas_length, c.vocab_size, g).to(batch.device)
    clean = batch if ar_weight > 0 else batch[:, : batch.shape[1] - c.canvas_length]
    sc_embeds = None
    rows = (torch.rand(batch.shape[0], generator=g) < sc_prob).nonzero().flatten().to(batch.device)
    if len(rows):
        with torch.no_grad():  # pass 1, on the rows that use it: no gradient, no self-conditioning
            _, first = forward_train(model, clean[rows], noised[rows], prefix, clean_logits=False)
            sc = model.sc_embed(first)  # (rows, N, D)
            sc_embeds = torch.zeros(*noised.shape, c.hidden_size, dtype=sc.dtype, device=batch.device).index_copy(0, rows, sc)
    clean_logits, logits = forward_train(model, clean, noised, prefix, sc_embeds, clean_logits=ar_weight > 0)
    diff = F.cross_entropy(logits.reshape(-1, c.vocab_size).float(), response.reshape(-1))
    ar = torch.zeros((), device=batch.device)
    if ar_weight > 0:
        ar = F.cross_entropy(clean_logits[:, :-1].reshape(-1, c.vocab_size).float(), batch[:, 1:].reshape(-1))
    return diff + ar_weight * ar, diff.detach(), ar.detach()


@torch.no_grad()
def heldout_loss(model, batch: torch.Tensor, prefix: int, t: float, seed: int = 0) -> float:
    """Cross-entropy per token of the noised pass at a fixed noise level t."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    noised = noise_blocks(batch[:, prefix:].cpu(), c.canvas_length, c.vocab_size, g, t=t).to(batch.device)
    _, logits = forward_train(model, batch[:, : batch.shape[1] - c.canvas_length], noised, prefix, clean_logits=False)
    return F.cross_entropy(logits.reshape(-1, c.vocab_size).float(), batch[:, prefix:].reshape(-1)).item()


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------------------------
# Tasks: what a batch is, how a run is judged, what an exported checkpoint carries
# ---------------------------------------------------------------------------------------------

class CodeTask:
    """Windows of the standard library: a clean prefix, then `blocks` noised canvases."""
    # a small, weakly trained model is rarely sure of any token: a larger entropy budget lets each step
    # keep several tokens (measured on the infill eval: 0.1 -> 4.0%, 3 -> 4.7%, 10 -> 5.5% exact tokens)
    settings = GenerationSettings(max_new_tokens=64, sampler=SamplerSettings(max_steps=32, entropy_bound=10.0),
                                  eos_token_ids=(data.EOS,), pad_token_id=data.PAD)

    def __init__(self, args, config: DiffusionGemmaConfig, out: Path):
        self.prefix, self.length = args.prefix, args.prefix + args.blocks * config.canvas_length
        self.corpus = data.prepare(out, config.vocab_size, args.max_files)
        self.files = [out / "tokenizer.json", out / "manifest.txt"]

    def batch(self, g: torch.Generator, size: int) -> torch.Tensor:
        train = self.corpus["train"]
        starts = torch.randint(0, len(train) - self.length, (size,), generator=g)
        return torch.stack([train[s: s + self.length] for s in starts]).long()

    def evaluate(self, model) -> dict:
        held = self.corpus["heldout"]
        starts = torch.randint(0, len(held) - self.length, (16,), generator=torch.Generator().manual_seed(0))
        batch = torch.stack([held[s: s + self.length] for s in starts]).long().to(model.device)
        return {"heldout@0.5": heldout_loss(model, batch, self.prefix, 0.5)}


class SudokuTask:
    """Solved grids: <bos>, then one canvas of one token per cell."""
    prefix = 1

    def __init__(self, args, config: DiffusionGemmaConfig, out: Path):
        self.shape = sudoku.SHAPES[args.grid]
        self.pool = sudoku.base_pool(self.shape, args.pool, seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        sudoku.write_tokenizer(self.shape, out / "tokenizer.json")
        self.files = [out / "tokenizer.json"]
        self.puzzles = sudoku.eval_puzzles(self.shape, 100, sudoku.EASY[self.shape.n], seed=sudoku.VALIDATION_SEED)
        self.settings = sudoku.generation_settings(self.shape)

    def batch(self, g: torch.Generator, size: int) -> torch.Tensor:
        grids = sudoku.to_tokens(sudoku.augmented(self.pool, self.shape, size, g), self.shape)
        return torch.cat([torch.full((size, 1), data.BOS), grids], dim=1)

    def evaluate(self, model) -> dict:
        return {"solved@1": sudoku.solve_rate(model, self.puzzles, self.shape, self.settings, samples=1)}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def save_state(path: Path, state: dict) -> None:
    """torch.save under a temporary name, then an atomic rename: a kill mid-save leaves the
    previous state intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export(model, task, out: Path, dtype: str, force: bool) -> None:
    """Write the model as a checkpoint directory in `dtype` (the model itself is left as it is)."""
    save_checkpoint(model, out, generation=task.settings, extra_files=task.files, force=force,
                    dtype=getattr(torch, dtype))


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.preset and args.preset not in PRESETS:
        print(f"error: --preset {args.preset} is not one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.task == "code":
        config = DiffusionGemmaConfig(**PRESETS[args.preset or "small"])
    else:  # one canvas is one grid, whatever the size of the network
        shape = sudoku.SHAPES[args.grid]
        config = DiffusionGemmaConfig(**{**PRESETS[args.preset or f"sudoku-{args.grid}"], "vocab_size": shape.vocab_size,
                                         "canvas_length": shape.cells, "max_position_embeddings": 2 * shape.cells + 8})
    task = (CodeTask if args.task == "code" else SudokuTask)(args, config, out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = init_weights(DiffusionGemma(config).to(device), seed=args.seed)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = out / "state.pt"
    step, seen, elapsed = 0, 0, 0.0
    if state_path.exists():  # resume
        st = torch.load(state_path, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, seen, elapsed = st["step"], st["tokens"], st["elapsed"]
    if args.export:
        try:
            export(model, task, Path(args.export), args.export_dtype, args.force)
        except FileExistsError:
            print(f"error: {args.export} already exists: choose another directory, or --force to replace it",
                  file=sys.stderr)
            return 2
        print(f"wrote {args.export} (step {step}, {seen / 1e6:.2f}M tokens, {elapsed / 60:.1f} min)")
        return 0
    g = torch.Generator().manual_seed(args.seed + step)
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, file=sys.stderr, dynamic_ncols=True, disable=args.quiet)
    t_start, deadline = time.time(), time.time() + args.minutes * 60
    last_snapshot = time.time()

    last_line = {}

    def checkpoint(final=False):
        model.eval()
        metrics = task.evaluate(model)
        model.train()
        now = elapsed + time.time() - t_start
        line = {"step": step, "tokens": seen, "minutes": round(now / 60, 2), "tokens_per_s": round(seen / max(now, 1e-9)),
                "diffusion": round(diff.item(), 4), "ar": round(ar.item(), 4), **metrics}
        last_line.update(line)
        with open(out / "log.txt", "a") as log:
            log.write(json.dumps(line) + "\n")
        save_state(state_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens": seen,
                                "elapsed": now})
        if final:
            snapshot()

    def snapshot():  # --snapshot: the weights as they are now, and the last evaluation, every few seconds
        nonlocal last_snapshot
        if args.snapshot:
            export(model, task, Path(args.snapshot), args.export_dtype, force=True)
            (Path(args.snapshot).parent / "eval.json").write_text(json.dumps(last_line or {"step": step}, indent=2) + "\n")
            last_snapshot = time.time()

    diff = ar = torch.zeros(())
    while step < args.steps and time.time() < deadline:
        batch = task.batch(g, args.batch).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, diff, ar = loss_fn(model, batch, task.prefix, g, args.ar_weight, args.sc_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += batch.numel()
        bar.set_postfix(loss=f"{diff.item():.3f}", tok_s=f"{seen / max(elapsed + time.time() - t_start, 1e-9):.0f}")
        bar.update(1)
        if step % args.eval_every == 0 and step < args.steps:
            checkpoint()
        if args.snapshot and time.time() - last_snapshot >= args.snapshot_seconds:
            snapshot()
    checkpoint(final=True)
    bar.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of train.py."""
    p = Parser(description="Train DiffusionGemma (the small bundled models by default).")
    p.add_argument("--task", choices=["code", "sudoku"], default="code", help="what to train on (default code)")
    p.add_argument("--grid", type=int, choices=[6, 9], default=9, help="sudoku: 6 (2x3 boxes) or 9 (3x3)")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: small, or sudoku-GRID)")
    p.add_argument("--max-files", type=int, help="code: train on only the first N standard-library files (tests)")
    p.add_argument("--pool", type=int, default=20000, help="sudoku: base grids before symmetries (default 20000)")
    p.add_argument("--out", default="runs/small", help="run directory (tokenizer, data, resumable state, log)")
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps (sets the cosine schedule)")
    p.add_argument("--minutes", type=float, default=1e9, help="stop after this many minutes (resume later)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--prefix", type=int, default=64, help="code: clean prefix tokens before the noised blocks")
    p.add_argument("--blocks", type=int, default=2, help="code: noised canvas-sized blocks per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--ar-weight", type=float, default=0.5, help="weight of the autoregressive loss (0: off)")
    p.add_argument("--sc-prob", type=float, default=0.5, help="share of examples trained with self-conditioning")
    p.add_argument("--eval-every", type=int, default=50, help="evaluation and saved state every N steps")
    p.add_argument("--snapshot", help="also export the checkpoint to this directory every --snapshot-seconds, and at the end")
    p.add_argument("--snapshot-seconds", type=float, default=60, help="seconds between snapshots (default 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--export", help="write the trained model as a checkpoint directory and exit")
    p.add_argument("--export-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the exported weights (default bfloat16: half the size)")
    p.add_argument("--force", action="store_true", help="with --export: replace the directory if it exists")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
