"""Fine-tune a DiffusionGemma checkpoint on your own data: train.py's block-diffusion loss on a user's
examples, with LoRA adapters (lora.py) on a frozen base, or every weight of a small model (--full).

Data: a JSON Lines file, one example source a line, either
  {"messages": [...]}                     a conversation, rendered with the checkpoint's own chat
                                          template: every assistant turn is an example, what comes
                                          before it its prompt (the loss is on the assistant turns only)
  {"prompt": "...", "completion": "..."}  raw text: the prompt as the tokenizer encodes it (with its
                                          own <bos>), the completion after it
and optionally "group": a name the evaluation reports apart (Sudoku's clue counts, a task's kinds).

An example is trained as the released model was (train.loss_fn, the one loss of both programs): the
prompt clean, the answer and its end token cut into canvas blocks (the last one padded, as a finished
canvas is), each block noised at its own level with uniformly random tokens, self-conditioning on a
share of the examples. A held-out share of the file (or --eval FILE) is evaluated every --eval-every
steps: the loss at fixed noise levels; with --check CMD, the share of generated answers the command
accepts (exit 0; the answer on stdin); with --exact, the share equal to the reference, by group.

The run directory holds the adapter (RUN/adapter, PEFT's format; RUN/checkpoint with --full), the
state to resume from (state.pt, written atomically at every evaluation, on Ctrl-C and at the end: run
the same command again to go on) and log.jsonl.

Memory for the released model (26B) on one 80 GB GPU, LoRA of rank 16 on the attention and dense MLP,
one example of 4,096 tokens: the bf16 base 47.0 GiB; the adapters 18.6M parameters, in fp32 with their
gradients and AdamW's two moments 0.3 GiB; with gradient checkpointing per layer, 30 layer inputs of
(prompt + 2 x answer) x 2816 bf16 (1.4 GiB at 8k), one layer's recomputation (~3 GiB with the MoE's
8k x 8 expert rows), and the answer's fp32 logits, softmax and gradient (answer x 262,144 x 4 B each:
6.4 GiB for a 2,048-token answer): about 60 GiB. With an int4 base (16.3 GiB) about 30 GiB.
`bash scripts/device_check.sh` measures both (its finetune phase).

    python finetune.py --model weights-code --data data.jsonl --out runs/ft --minutes 5 --eval-every 50
    python finetune.py --model weights-code --data data.jsonl --out runs/ft --full --lr 3e-4
    python finetune.py --merge runs/ft/adapter --model weights-code --out runs/merged
    python finetune.py --make-sudoku-data sudoku9.jsonl --count 200
"""

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
import sudoku
import train
from checkpoint import DeviceError, save_checkpoint
from generate import load
from hfconfig import CheckpointError
from request import check_text_model
from sampler import GenerationSettings, RequestError, block_diffusion
from terminal import Parser, UsageError, device_name, positive
from tokenizer import Tokenizer

NOISE_LEVELS = (0.25, 0.5, 0.75)  # the held-out loss is reported at these fixed noise levels


@dataclass
class Example:
    """One answer to learn: the prompt's token ids (clean), the answer's (noised), where it came from."""
    prompt: list[int]
    answer: list[int]
    line: int
    group: str | None = None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_examples(path: str | Path, tok: Tokenizer, config, end_id: int) -> list[Example]:
    """Every example of a JSON Lines file; UsageError naming the line for anything it cannot use."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist")
    examples = []
    for n, text in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n} is not JSON ({e.msg}): the data is JSON Lines, one object a line") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {n} is not a JSON object")
        group = row.get("group")
        if "messages" in row:
            examples += [Example(p, a, n, group) for p, a in conversation_examples(row["messages"], tok, path, n, end_id)]
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            answer = tok.encode(row["completion"])
            examples.append(Example(tok.encode_raw(row["prompt"]), answer + [end_id] * (answer[-1:] != [end_id]), n, group))
        else:
            raise UsageError(f"{path} line {n} has neither \"messages\" nor \"prompt\" and \"completion\" strings")
    if not examples:
        raise UsageError(f"{path} holds no examples")
    for ex in examples:
        need = len(ex.prompt) + blocks(len(ex.answer), config.canvas_length) * config.canvas_length
        if need > config.max_position_embeddings:
            raise UsageError(f"{path} line {ex.line}: the prompt and its answer take {need} positions; the model has "
                             f"{config.max_position_embeddings}: shorten it")
        if max(ex.prompt + ex.answer) >= config.vocab_size:
            raise UsageError(f"{path} line {ex.line} holds a token the model has no embedding for")
    return examples


def conversation_examples(messages, tok: Tokenizer, path: Path, n: int, end_id: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids for each assistant turn: the conversation before it, rendered with
    the generation prompt, and what the full rendering adds after that (the turn and its end)."""
    if not tok.is_chat:
        raise UsageError(f"{path} line {n} is a conversation, but the checkpoint has no chat format: give "
                         "\"prompt\" and \"completion\" lines instead")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UsageError(f"{path} line {n}: messages must be a list of {{\"role\", \"content\"}} objects")
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise UsageError(f"{path} line {n}: the conversation has no assistant turn to learn")
    out = []
    for i in turns:
        try:
            prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            full = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        except (RequestError, CheckpointError) as e:
            raise UsageError(f"{path} line {n}: {e}") from None
        if full[: len(prompt)] == prompt:
            answer = full[len(prompt):]
        else:  # a template that renders a past answer otherwise (without its empty thought): the text and its end
            end = tok.token_id("<turn|>")
            answer = tok.encode(str(messages[i].get("content") or "")) + [end_id if end is None else end]
        out.append((prompt, answer))
    return out


def blocks(n: int, C: int) -> int:
    """Canvases n answer tokens take (at least one)."""
    return max(1, -(-n // C))


def packed(ex: Example, C: int, pad: int, device) -> tuple[torch.Tensor, int]:
    """(1, prompt + whole canvases) ids and the prompt's length: the answer padded as a finished canvas is."""
    answer = ex.answer + [pad] * (blocks(len(ex.answer), C) * C - len(ex.answer))
    return torch.tensor([ex.prompt + answer], device=device), len(ex.prompt)


def example_loss(model, ex: Example, g: torch.Generator, sc_prob: float):
    """train.loss_fn on one example: (loss, its diffusion part) over the answer's canvases."""
    c = model.config
    batch, prefix = packed(ex, c.canvas_length, c.pad_token_id, model.device)
    loss, diff, _ = train.loss_fn(model, batch, prefix, g, 0.0, sc_prob)
    return loss, diff, batch.numel()


def make_sudoku_data(path: str | Path, count: int, seed: int) -> None:
    """9x9 puzzles and their solutions as chat turns (the released model's chat template renders them
    when finetune.py reads the file), grouped by clue count as Google's evaluation counts them."""
    shape, rng = sudoku.SHAPES[9], random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            puzzle, solution = sudoku.make_puzzle(shape, rng.randint(22, 45), rng.randrange(2 ** 62))
            givens = sum(1 for d in puzzle if d)
            rows = lambda g: "\n".join("".join(str(d) for d in g[r * 9: r * 9 + 9]) for r in range(9))  # noqa: E731
            messages = [{"role": "user", "content": "Solve this Sudoku. Each line is a row; 0 is an empty cell. "
                         "Answer with the solved grid in the same form.\n" + rows(puzzle)},
                        {"role": "assistant", "content": rows(solution)}]
            group = ">= 40 givens" if givens >= 40 else "30-39 givens" if givens >= 30 else "< 30 givens"
            f.write(json.dumps({"messages": messages, "group": group}) + "\n")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tok: Tokenizer, examples: list[Example], check: str | None = None, exact: bool = False,
             seed: int = 0) -> dict:
    """The held-out loss at NOISE_LEVELS; with check or exact, the share of answers generated (one
    sample each, seeded) that the command accepts / that equal the reference, overall and by group."""
    was = model.training
    model.eval()
    C, pad = model.config.canvas_length, model.config.pad_token_id
    out = {}
    for t in NOISE_LEVELS:
        losses = [train.heldout_loss(model, *packed(ex, C, pad, model.device), t, seed=seed + i)
                  for i, ex in enumerate(examples)]
        out[f"loss@{t}"] = round(sum(losses) / len(losses), 4)
    if check or exact:
        settings: GenerationSettings = model.generation_settings
        hits: dict[str, list[bool]] = {}
        for i, ex in enumerate(examples):
            s = settings.copy(max_new_tokens=blocks(len(ex.answer), C) * C)
            tokens = block_diffusion(model, [ex.prompt], s, seeds=[seed + i]).tokens[0]
            text = tok.decode(tok.split_thought(tokens).answer)
            if check:
                ok = subprocess.run(check, shell=True, input=text, text=True, capture_output=True).returncode == 0
            else:
                ok = text.strip() == tok.decode(tok.split_thought(ex.answer).answer).strip()
            for g in ("all", ex.group) if ex.group else ("all",):
                hits.setdefault(g, []).append(ok)
        key = "accepted" if check else "exact"
        out[key] = {g: round(sum(v) / len(v), 4) for g, v in hits.items()}
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def checkpoint_layers(model) -> None:
    """Gradient checkpointing per layer: each layer's activations are recomputed in the backward pass
    instead of kept (a class swap, the network's code unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        plain = type(layer)

        class Checkpointed(plain):
            def forward(self, *args):
                if torch.is_grad_enabled():
                    return checkpoint(super().forward, *args, use_reentrant=False)
                return super().forward(*args)
        Checkpointed.__name__ = "Checkpointed" + plain.__name__
        layer.__class__ = Checkpointed


def trainable(model) -> dict[str, torch.Tensor]:
    """The parameters a run trains: the adapters, or every weight with --full."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_run(out: Path, model, opt, meta: dict, full: bool, base: str) -> None:
    """The state to resume from (atomically), and the adapter (or the whole checkpoint) as it is now."""
    train.save_state(out / "state.pt", {"trainable": {n: p.detach().cpu() for n, p in trainable(model).items()},
                                        "opt": opt.state_dict(), **meta})
    if full:
        save_checkpoint(model, out / "checkpoint", generation=model.generation_settings, force=True,
                        dtype=model.config.torch_dtype(), extra_files=[
                            f for f in Path(model.checkpoint_dir).iterdir()
                            if f.name.startswith("tokenizer") or f.suffix == ".jinja"])
    else:
        lora.save_adapter(model, out / "adapter", base_model=base)


def run_args(args) -> dict:
    """What a run is: a resumed run must be the same one."""
    return {k: getattr(args, k) for k in ("model", "data", "full", "rank", "alpha", "targets", "seed")}


def finetune(args) -> int:
    """A run: the data read and checked, the model loaded and adapted, steps until --steps or --minutes
    (resuming a run directory that holds a state), evaluations, the adapter written."""
    out = Path(args.out)
    if (out / "state.pt").exists():
        before = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        if before and before != run_args(args):
            changed = sorted(k for k in before if before[k] != run_args(args).get(k))
            raise UsageError(f"{out} holds a run with other settings ({', '.join(changed)}): choose another --out")
    model, tok = load(args.model, args.device, args.dtype)
    check_text_model(tok, args.model)
    c = model.config
    end = c.eos_token_id[0] if c.eos_token_id else tok.token_id("<eos>")
    examples = read_examples(args.data, tok, c, end)
    rng = random.Random(args.seed)
    if args.eval:
        held = read_examples(args.eval, tok, c, end)
    else:
        order = list(range(len(examples)))
        rng.shuffle(order)
        n_held = max(1, min(int(len(examples) * args.eval_share), 64)) if len(examples) > 1 else 0
        held, examples = [examples[i] for i in order[:n_held]], [examples[i] for i in order[n_held:]]
    torch.manual_seed(args.seed)  # the adapters' A: the same run, the same start
    if args.full:
        model.requires_grad_(True)
    else:
        lora.add_lora(model, args.rank, args.alpha, args.dropout, args.targets.split(","))
    if args.checkpointing:
        checkpoint_layers(model)
    model.train()
    params = list(trainable(model).values())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, seen, elapsed = 0, 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    if (out / "state.pt").exists():  # resume
        st = torch.load(out / "state.pt", map_location=model.device)
        with torch.no_grad():
            for n, p in trainable(model).items():
                p.copy_(st["trainable"][n])
        opt.load_state_dict(st["opt"])
        step, seen, elapsed = st["step"], st["tokens"], st["elapsed"]
    (out / "run.json").write_text(json.dumps(run_args(args), indent=2) + "\n")
    order = [i for _ in range(1 + (args.steps * args.accumulate) // max(len(examples), 1)) for i in
             random.Random(args.seed).sample(range(len(examples)), len(examples))]
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, file=sys.stderr, dynamic_ncols=True, disable=args.quiet, unit="step")
    t0, deadline = time.time(), time.time() + args.minutes * 60 if args.minutes else float("inf")
    meta = lambda: {"step": step, "tokens": seen, "elapsed": elapsed + time.time() - t0}  # noqa: E731

    def report(final: bool = False):
        line = {"step": step, "minutes": round(meta()["elapsed"] / 60, 2), "tokens": seen,
                **(evaluate(model, tok, held, args.check, args.exact, args.seed) if held else {})}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        bar.write(("final " if final else "") + json.dumps(line))
        save_run(out, model, opt, meta(), args.full, args.model)

    interrupted, first_step = False, step
    try:
        if step == 0 and held:
            report()
        while step < args.steps and time.time() < deadline:
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step, args.steps, args.warmup, args.lr)
            loss_sum = 0.0
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # a step's noise: the same when resumed
            for k in range(args.accumulate):
                ex = examples[order[(step * args.accumulate + k) % len(order)]]
                loss, diff, n = example_loss(model, ex, g, args.sc_prob)
                (loss / args.accumulate).backward()
                loss_sum += diff.item() / args.accumulate
                seen += n
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            spent = elapsed + time.time() - t0
            left = min(deadline - time.time(), (args.steps - step) * (time.time() - t0) / (step - first_step))
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{seen / max(spent, 1e-9):.0f}", left=f"{left / 60:.1f}m")
            bar.update(1)
            if step % args.eval_every == 0 and step < args.steps:
                report()
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    if interrupted:  # the state as it is, no evaluation: Ctrl-C should be quick
        save_run(out, model, opt, meta(), args.full, args.model)
        print(f"interrupted at step {step}: saved {out}; run the same command to go on", file=sys.stderr)
        return 130
    report(final=True)
    print(f"wrote {out / ('checkpoint' if args.full else 'adapter')} (step {step}, {seen / 1e6:.2f}M tokens)",
          file=sys.stderr)
    return 0


def merge(args) -> int:
    """--merge ADAPTER --model BASE --out NEW: the base with the adapter folded into its weights."""
    model, tok = load(args.model, args.device or "cpu", args.dtype, adapter=args.merge)
    lora.merge_adapter(model)
    files = [f for f in Path(model.checkpoint_dir).iterdir() if f.suffix in (".json", ".jinja") or
             f.name.startswith("tokenizer")]
    files = [f for f in files if f.name not in ("config.json", "generation_config.json", "model.safetensors.index.json")]
    save_checkpoint(model, args.out, max_shard_bytes=2 ** 30, generation=model.generation_settings, extra_files=files,
                    force=args.force, dtype=model.config.torch_dtype())
    print(f"wrote {args.out}: {args.model} with {args.merge} merged", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of finetune.py."""
    p = Parser(description="Fine-tune DiffusionGemma on a JSON Lines file (LoRA, or every weight with --full).")
    p.add_argument("--model", default="weights-code", help="the base: a checkpoint generate.load reads (default weights-code)")
    p.add_argument("--data", help="JSON Lines: {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...} a line")
    p.add_argument("--out", help="the run directory: adapter/, state.pt (resumable), log.jsonl")
    p.add_argument("--steps", type=positive(int), default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--minutes", type=positive(float), help="stop after this long (the state is saved)")
    p.add_argument("--lr", type=positive(float), default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (default 20)")
    p.add_argument("--accumulate", type=positive(int), default=1, help="examples per optimizer step (default 1)")
    p.add_argument("--sc-prob", type=float, default=0.5, help="share of examples with self-conditioning (default 0.5)")
    p.add_argument("--rank", type=positive(int), default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=positive(float), default=32, help="LoRA alpha (default 32)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--targets", default=",".join(lora.TARGETS), help="layers adapted (default: attention and dense MLP)")
    p.add_argument("--full", action="store_true", help="train every weight instead (small models)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations (faster, more memory) instead of recomputing them")
    p.add_argument("--eval", help="held-out examples (JSON Lines); default: a share of --data")
    p.add_argument("--eval-share", type=float, default=0.1, help="share of --data held out (default 0.1, at most 64)")
    p.add_argument("--eval-every", type=positive(int), default=100, help="steps between evaluations (default 100)")
    p.add_argument("--check", metavar="CMD", help="shell command given each generated answer; exit 0 accepts it")
    p.add_argument("--exact", action="store_true", help="also count generated answers equal to the reference")
    p.add_argument("--merge", metavar="ADAPTER", help="write --model with this adapter merged into --out, and exit")
    p.add_argument("--force", action="store_true", help="with --merge: replace --out if it exists")
    p.add_argument("--make-sudoku-data", metavar="FILE", help="write 9x9 Sudoku puzzles as chat turns, and exit")
    p.add_argument("--count", type=positive(int), default=1000, help="with --make-sudoku-data: puzzles (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", type=device_name, help="cuda, cuda:N, cpu or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="the base's dtype (auto: the checkpoint's on a GPU, float32 on the CPU); adapters are fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    if args.make_sudoku_data:
        make_sudoku_data(args.make_sudoku_data, args.count, args.seed)
        print(f"wrote {args.make_sudoku_data}: {args.count} puzzles", file=sys.stderr)
        return 0
    if args.merge:
        if not args.out:
            raise UsageError("--merge writes a checkpoint: give --out NEW")
        return merge(args)
    if not args.data or not args.out:
        raise UsageError("give --data FILE.jsonl and --out RUN (or --merge, or --make-sudoku-data)")
    if not 0 <= args.sc_prob <= 1 or not 0 <= args.dropout < 1 or not 0 <= args.eval_share < 1:
        raise UsageError("--sc-prob is 0 to 1, --dropout and --eval-share 0 to below 1")
    if args.check and args.exact:
        raise UsageError("give --check CMD or --exact, not both")
    return finetune(args)


if __name__ == "__main__":
    a = build_parser().parse_args()
    try:
        code = main(a)
    except (UsageError, RequestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (CheckpointError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except FileExistsError:
        print(f"error: {a.out} already exists: choose another --out, or --force to replace it", file=sys.stderr)
        code = 2
    sys.exit(code)
