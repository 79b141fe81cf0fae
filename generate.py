"""Generate with DiffusionGemma by block diffusion: the Python API and the command line.

The algorithm itself (the loop over canvases, the denoising steps, the entropy-bound sampler) is in
sampler.py; this file turns text into token ids and back, and offers the ways to use it: a prompt,
a batch of prompts, a conversation (chat.py), a gap to fill (infill), a template whose holes the
model fills, and best-of-N with a check that accepts a sample. On the plain path the same seed gives
the same tokens as transformers 5.17.0's DiffusionGemmaForBlockDiffusion.generate.

    python generate.py                          # the bundled model solves a Sudoku puzzle
    python generate.py --model weights-code --max-new-tokens 32 "def fibonacci(n):"

    from generate import load, generate
    model, tokenizer = load("weights-code")
    print(generate(model, tokenizer, "def fib(n):", max_new_tokens=16, seed=0))
"""

import argparse
import os
import sys
from pathlib import Path

import torch

import distributed
import sudoku
from checkpoint import load_model, resolve_checkpoint
from cuda_kernels import KernelBuildError
from editing import FILL, fill, parse_infill, parse_pin, parse_template, shell_accept
from hfconfig import CheckpointError, read_config, read_generation_config
from sampler import GenerationSettings, NonFiniteLogits, denoise_canvas, run_batches
from terminal import (Parser, Progress, StreamPrinter, UsageError, closing_line, dim, free_memory, out_of_memory_line,
                      positive, stopped)
from tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_PROMPT = "def fibonacci(n):\n"  # what a model without a demo of its own is asked
MAX_DEFAULT_BATCH = 64  # more prompts at once gain little and cost memory


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------

def default_device() -> str:
    """cuda when available, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load(model: str | Path = DEFAULT_MODEL_DIR, device: str | None = None, dtype: torch.dtype | None = None,
         tokenizer: str | None = None, sharding=None) -> tuple:
    """(model, tokenizer) from a checkpoint directory or a Hugging Face repo id. The model carries
    its generation_config.json as model.generation_settings. sharding: distributed.Sharding."""
    path = resolve_checkpoint(model)
    tok = load_tokenizer(path, tokenizer, read_config(path).vocab_size)  # before the weights: fail fast
    net = load_model(path, device or default_device(), dtype, sharding)
    net.generation_settings = read_generation_config(path, net.config.eos_token_id)
    return net, tok


def settings_for(model, **overrides) -> GenerationSettings:
    """The checkpoint's defaults with overrides (max_new_tokens, steps, entropy_bound, eos_token_ids)."""
    base = getattr(model, "generation_settings", None) or read_generation_config(None, model.config.eos_token_id)
    return base.copy(**overrides)


def check_context(model, n_prompt: int, max_new_tokens: int, name: str = "prompt") -> None:
    """Prompt plus whole canvases must fit in the model's positions."""
    limit = model.config.max_position_embeddings
    need = GenerationSettings(max_new_tokens=max_new_tokens).positions(n_prompt, model.config.canvas_length)
    if need > limit:
        raise UsageError(f"the {name} has {n_prompt} tokens; with {max_new_tokens} new tokens that needs {need} "
                         f"positions but the model has {limit}: shorten it or ask for fewer new tokens")


def encode_prompt(model, tokenizer: Tokenizer, text: str, settings: GenerationSettings, raw: bool = False,
                  thinking: bool = False, system: str | None = None, name: str = "prompt") -> list[int]:
    """A user turn in the checkpoint's chat format (plain text with raw, or for a tokenizer without one)."""
    if not text.strip():
        raise UsageError(f"the {name} is empty")
    ids = tokenizer.prompt_ids(text, chat=not raw, thinking=thinking, system=system)
    if ids and max(ids) >= model.config.vocab_size:
        raise UsageError(f"the {name} holds a token the model has no embedding for "
                         f"({tokenizer.decode_visible([max(ids)])!r}): leave it out")
    check_context(model, len(ids), settings.max_new_tokens, name)
    return ids


def default_batch_size(model, n_prompts: int) -> int:
    """How many prompts to generate at once: what fits in half the free memory (the logits and
    their temporaries dominate: about 5 fp32 copies of canvas x vocab per prompt), at most 64."""
    per_prompt = 5 * 4 * model.config.canvas_length * model.config.vocab_size
    mem = free_memory(model.device)
    fits = MAX_DEFAULT_BATCH if mem is None else int(0.5 * mem[0] // per_prompt)
    return max(1, min(n_prompts, fits, MAX_DEFAULT_BATCH))


def generate(model, tokenizer: Tokenizer, prompt: str | list[str], max_new_tokens: int | None = None,
             steps: int | None = None, entropy_bound: float | None = None, seed: int | None = None,
             raw: bool = False, thinking: bool = False, system: str | None = None,
             batch_size: int | None = None, return_thought: bool = False):
    """Text for one prompt, or a list of texts for a list of prompts (in batches of batch_size).
    The thought of a thinking model is left out of the text; return_thought: (answer, thought)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    settings = settings_for(model, max_new_tokens=max_new_tokens, steps=steps, entropy_bound=entropy_bound)
    ids = [encode_prompt(model, tokenizer, p, settings, raw, thinking, system) for p in prompts]
    if seed is not None:
        torch.manual_seed(seed)
    out = []
    for result in run_batches(model, ids, settings, batch_size or default_batch_size(model, len(ids))):
        for tokens in result.tokens:
            split = tokenizer.split_thought(tokens)
            answer = tokenizer.decode(split.answer)
            thought = None if split.thought is None else tokenizer.decode(split.thought)
            out.append((answer, thought) if return_thought else answer)
    return out[0] if isinstance(prompt, str) else out


def infill(model, tokenizer: Tokenizer, text: str, fill_length: int = 16, steps: int | None = None,
           seed: int | None = None) -> str:
    """The text that fills the single <FILL> of `text`, given what stands on both sides of it."""
    left, canvas = parse_infill(tokenizer, text, fill_length)
    check_context(model, len(left), canvas.length)
    if seed is not None:
        torch.manual_seed(seed)
    tokens, _, _ = fill(model, left, canvas, settings_for(model, steps=steps))
    return tokenizer.decode(tokens[0][:fill_length])


def fill_template(model, tokenizer: Tokenizer, template: str, prompt: str | None = None, hole: str = "_",
                  steps: int | None = None, seed: int | None = None, samples: int = 1, accept=None) -> str | None:
    """The template with its holes filled (after an optional prompt); with samples > 1 and
    accept(text) -> bool, the first sample it accepts (None if none does)."""
    settings = settings_for(model, steps=steps)
    ids = encode_prompt(model, tokenizer, prompt, settings) if prompt else [model.config.bos_token_id]
    canvas = parse_template(tokenizer, template, hole)
    check_context(model, len(ids), canvas.length)
    if seed is not None:
        torch.manual_seed(seed)
    tokens, ok, _ = fill(model, ids, canvas, settings, samples,
                      None if accept is None else (lambda t: accept(tokenizer.decode(t))))
    return next((tokenizer.decode(t) for t, good in zip(tokens, ok) if good), None)


def choose_fast_path(model, kernels: str = "auto", cuda_graph: bool = True) -> tuple:
    """The one place where the fast paths are chosen: CUDA kernels in the layers, and the CUDA-graph
    step on top of them. Returns the denoise function for block_diffusion and the line announcing
    the choice ("kernels: cuda ✓ (...), cuda graph ✓" or "kernels: torch (why)")."""
    from cuda_kernels import sampler_stats, use_kernels
    from cudagraph import GraphedDenoiser
    line = use_kernels(model, kernels)
    if not line.startswith("kernels: cuda"):
        return denoise_canvas, line
    return (GraphedDenoiser(stats=sampler_stats, use_graph=cuda_graph),
            line + ", fused sampler" + (", cuda graph ✓" if cuda_graph else ""))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Every flag of generate.py."""
    p = Parser(description="Generate with DiffusionGemma (block diffusion).")
    p.add_argument("prompt", nargs="?", help="the prompt (default: the bundled model's demo)")
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: ./weights)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=positive(int), help="new tokens at most (default: generation_config.json)")
    p.add_argument("--steps", type=positive(int), help="maximum denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--entropy-bound", type=positive(float), help="entropy budget of the tokens accepted per step")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-file", help="a UTF-8 file with one prompt a line")
    p.add_argument("--batch-size", type=positive(int), help="prompts generated at once (default: what fits, at most 64)")
    p.add_argument("--infill", help=f"fill a gap: 'left{FILL}right'; the right side is pinned after the gap")
    p.add_argument("--infill-file", help="like --infill, the text read from a UTF-8 file")
    p.add_argument("--fill-length", type=positive(int), default=16, help="tokens in the gap for --infill (default 16)")
    p.add_argument("--template", help="text whose holes (--hole) the model fills; the rest is pinned")
    p.add_argument("--template-file", help="like --template, the text read from a UTF-8 file")
    p.add_argument("--hole", default="_", help="the character that marks a free position in a template (default _)")
    p.add_argument("--sudoku", metavar="GRID", help="a puzzle for a Sudoku model: its digits row by row, . or 0 empty")
    p.add_argument("--pin", action="append", default=[], metavar="OFFSET:TEXT",
                   help="fix the tokens of TEXT at new-token OFFSET (e.g. a closing '}'); repeatable")
    p.add_argument("--samples", type=positive(int), help="best-of-N: N samples of the same input, in one batch")
    p.add_argument("--accept", metavar="CMD", help="shell command given each sample on stdin; exit 0 accepts it")
    p.add_argument("--raw", action="store_true", help="the prompt as written, without the chat format")
    p.add_argument("--system", help="a system prompt (instruction-tuned models)")
    p.add_argument("--thinking", action="store_true", help="let the model think first; the thought goes to stderr")
    p.add_argument("--print-prompt", action="store_true", help="print the prompt as the model gets it, and exit")
    p.add_argument("--chat", action="store_true", help="a conversation, a line a turn (/reset, /system TEXT, /exit)")
    p.add_argument("--show-canvas", action="store_true", help="draw the canvas refining step by step (stderr)")
    p.add_argument("--device", help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--kernels", choices=["auto", "cuda", "torch"], default="torch",
                   help="torch (default): plain PyTorch; cuda: the CUDA kernels and graph; auto: cuda where possible")
    p.add_argument("--no-cuda-graph", action="store_true", help="with CUDA kernels, run each step without a CUDA graph")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no closing line")
    return p


def read_text_file(path: str, what: str) -> str:
    """A UTF-8 file's text, or a UsageError naming it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def check_flags(args) -> None:
    """Mistakes that need no model; fills in --infill/--template from their files and --model."""
    for flag in ("infill", "template"):
        if getattr(args, flag + "_file"):
            setattr(args, flag, read_text_file(getattr(args, flag + "_file"), f"--{flag}-file"))
    modes = [m for m in ("batch_file", "infill", "template", "sudoku", "chat") if getattr(args, m) is not None
             and getattr(args, m) is not False]
    if len(modes) > 1 or (modes and modes[0] != "template" and args.prompt is not None):
        raise UsageError("give one of: a prompt, --batch-file, --infill, --template, --sudoku, --chat")
    if args.accept and not (args.samples or 1) > 1:
        raise UsageError("--accept picks among samples: give --samples N as well")
    if len(args.hole) != 1:
        raise UsageError(f"--hole must be one character, not {args.hole!r}")
    if args.model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise UsageError("no model given and no bundled model in ./weights: "
                             "pass --model DIR (a checkpoint directory) or --model google/diffusiongemma-26B-A4B-it")
        args.model = str(DEFAULT_MODEL_DIR)


def run_prompts(model, tok: Tokenizer, args, denoise) -> int:
    """One prompt (streamed canvas by canvas), a batch file (printed in order, batch by batch), or
    best-of-N samples of one prompt (--samples, --accept)."""
    texts = [ln for ln in read_text_file(args.batch_file, "batch file").splitlines() if ln.strip()] \
        if args.batch_file else [DEFAULT_PROMPT if args.prompt is None else args.prompt]
    if not texts:
        raise UsageError(f"batch file {args.batch_file} has no prompts (one prompt a line)")
    settings = settings_for(model, max_new_tokens=args.max_new_tokens, steps=args.steps, entropy_bound=args.entropy_bound)
    samples = args.samples or 1
    ids = [encode_prompt(model, tok, t, settings, args.raw, args.thinking, args.system,
                         "prompt" if len(texts) == 1 else f"prompt {i + 1}") for i, t in enumerate(texts)] * samples
    pins = {k: v for spec in args.pin for k, v in parse_pin(tok, spec).items()}
    if pins and max(pins) >= settings.max_new_tokens:
        raise UsageError(f"a pinned position ({max(pins)}) is beyond the {settings.max_new_tokens} new tokens")
    single, C = len(ids) == 1, model.config.canvas_length
    echo = texts[0] if single and not (tok.is_chat and not args.raw) else ""  # a raw prompt reads on into its text
    progress = Progress(args, tok, settings.canvases(C) if single else len(ids), "canvas" if single else "prompt")
    answer = StreamPrinter(sys.stdout, before=progress.bar.clear)
    thought = StreamPrinter(sys.stderr, before=progress.bar.clear, style=lambda s: dim(s, sys.stderr))
    answer.update(echo)
    label = (lambda i: f"sample {i + 1}") if samples > 1 else (lambda i: texts[i][:60])

    def on_canvas(start, ci, seq, finished):
        progress.record(start, ci, seq, settings, C)
        if single:  # stream: the answer on stdout, the thought (with --thinking) on stderr
            split = tok.split_thought(progress.committed[0])
            if args.thinking and split.thought:
                thought.update("thinking: " + tok.decode(split.thought))
            answer.update(echo + tok.decode(split.answer))
            progress.bar.update(1)

    def show(row: int, tokens: list[int]) -> None:
        sys.stdout.write(f"=== {row + 1}: {label(row)}\n{tok.decode(tok.split_thought(tokens).answer)}\n")

    printed = [0]  # rows printed so far

    def on_batch(start, result):
        if not single and not args.accept:
            for i, tokens in enumerate(result.tokens):
                show(start + i, tokens)
            sys.stdout.flush()
            printed[0] = start + len(result.tokens)
        progress.bar.update(0 if single else len(result.tokens))

    try:
        results = run_batches(model, ids, settings, batch_size_for(model, args, len(ids)),
                              [pins] * len(ids) if pins else None,
                              on_batch=on_batch, on_canvas=on_canvas, on_step=progress.on_step, denoise=denoise)
    except (KeyboardInterrupt, NonFiniteLogits) as e:
        return stopped(e, progress, (lambda row, toks: None) if single else show, printed[0], single)
    progress.bar.close()
    tokens = [t for r in results for t in r.tokens]
    passed = ""
    if args.accept:
        ok = [shell_accept(args.accept)(tok.decode(tok.split_thought(t).answer)) for t in tokens]
        passed = f", {sum(ok)} of {len(ok)} samples accepted by {args.accept}"
        if any(ok):
            sys.stdout.write(tok.decode(tok.split_thought(tokens[ok.index(True)]).answer))
    if thought.text:
        sys.stderr.write("\n")
    sys.stdout.write("\n" if single or args.accept else "")
    sys.stdout.flush()
    peak = peak_text(model.device)  # every rank takes part
    if not args.quiet:
        print(closing_line(sum(len(t) for t in tokens), sum(r.canvases for r in results),
                           [s for r in results for s in r.steps], sum(r.seconds for r in results), model.device,
                           settings.max_new_tokens if any(len(t) >= settings.max_new_tokens for t in tokens) else None,
                           passed, peak), file=sys.stderr)
    if args.accept and not any(ok):
        print(f"error: none of the {len(ok)} samples was accepted by {args.accept}", file=sys.stderr)
        return 1
    return 0


def run_fill(model, tok: Tokenizer, args, denoise) -> int:
    """--infill (prints left + fill + right) or --template (prints the filled template)."""
    settings = settings_for(model, steps=args.steps, entropy_bound=args.entropy_bound)
    if args.infill is not None:
        ids, canvas = parse_infill(tok, args.infill, args.fill_length)
        left, right = args.infill.split(FILL)
        render = lambda t: left + tok.decode(t[: args.fill_length]) + right  # noqa: E731
    else:
        ids = encode_prompt(model, tok, args.prompt, settings, args.raw, args.thinking, args.system) \
            if args.prompt else [model.config.bos_token_id]
        canvas = parse_template(tok, args.template, args.hole)
        render = tok.decode
    canvas.pins.update({k: v for spec in args.pin for k, v in parse_pin(tok, spec).items()})
    check_context(model, len(ids), canvas.length, "prompt")
    check = None if args.accept is None else shell_accept(args.accept)
    return sample_and_pick(model, tok, args, denoise, ids, canvas, settings, render,
                           None if check is None else (lambda t: check(render(t))), args.accept)


def run_sudoku(model, tok: Tokenizer, shape, args, denoise) -> int:
    """A Sudoku model: the puzzle (--sudoku, or the built-in one), then the solution and its check."""
    if shape is None:
        raise UsageError(f"{args.model} is not a Sudoku model (its tokenizer has no cell tokens)")
    try:
        puzzle = sudoku.parse_grid(args.sudoku, shape) if args.sudoku else sudoku.BUILTIN[shape.n]
    except ValueError as e:
        raise UsageError(f"--sudoku: {e}") from None
    print(f"puzzle ({sum(1 for d in puzzle if d)} givens):\n{sudoku.format_grid(puzzle, shape)}\n", flush=True)
    args.show_canvas = args.show_canvas or sys.stderr.isatty()
    args.samples = args.samples or sudoku.DEMO_SAMPLES
    canvas = parse_template(tok, sudoku.template(puzzle, shape))
    settings = settings_for(model, steps=args.steps, entropy_bound=args.entropy_bound)
    grid = lambda t: sudoku.from_tokens(t, shape)  # noqa: E731
    return sample_and_pick(model, tok, args, denoise, [model.config.bos_token_id], canvas, settings,
                           lambda t: "solution:\n" + sudoku.format_grid(grid(t), shape),
                           lambda t: sudoku.is_valid(grid(t), shape, puzzle), "the Sudoku rules",
                           lambda ok: "valid ✓" if ok else "invalid ✗")


def sample_and_pick(model, tok, args, denoise, ids, canvas, settings, render, accept, judge, verdict=None) -> int:
    """Fill the canvas --samples times in one batch; print the first sample `accept` takes (or the
    first sample, without accept); the closing line counts what passed."""
    samples, C = args.samples or 1, model.config.canvas_length
    fixed = settings.copy(max_new_tokens=canvas.length, eos_token_ids=())
    progress = Progress(args, tok, fixed.canvases(C), "canvas", render)

    def on_canvas(ci, seq, finished):
        progress.record(0, ci, seq, fixed, C)
        progress.bar.update(1)
    try:
        tokens, ok, result = fill(model, ids, canvas, settings, samples, on_step=progress.on_step,
                                  on_canvas=on_canvas, denoise=denoise)
    except (KeyboardInterrupt, NonFiniteLogits) as e:
        return stopped(e, progress, lambda row, t: sys.stdout.write(render(t)) if row == 0 else None, 0, True)
    progress.bar.close()
    if accept is not None:
        ok = [accept(t) for t in tokens]
    best = ok.index(True) if any(ok) else 0
    sys.stdout.write(render(tokens[best]) + "\n" + (verdict(ok[best]) + "\n" if verdict else ""))
    sys.stdout.flush()
    peak = peak_text(model.device)
    if not args.quiet:
        passed = f", {sum(ok)} of {samples} samples pass {judge}" if accept is not None else ""
        print(closing_line(canvas.length * samples, result.canvases, result.steps, result.seconds, model.device,
                           extra=passed, peak=peak), file=sys.stderr)
    return 0 if any(ok) else 1


def load_for(args) -> tuple:
    """The model and tokenizer the flags ask for (float32 on the CPU by default)."""
    device = torch.device(args.device or default_device())
    # auto: the checkpoint's dtype on a GPU; float32 on the CPU, where bf16 matmuls are slow
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float32 if device.type == "cpu" else None)
    if not distributed.launched():
        return load(args.model, device, dtype, args.tokenizer)
    if int(os.environ["RANK"]):  # under torchrun only rank 0 speaks
        args.quiet, sys.stdout = True, open(os.devnull, "w")
    return distributed.load_sharded(lambda sharding, dev: load(args.model, dev, dtype, args.tokenizer, sharding),
                                    device.type, CheckpointError)


def batch_size_for(model, args, n: int) -> int:
    """--batch-size, or what fits; under torchrun the smallest any rank chose (the same batches everywhere)."""
    size = args.batch_size or default_batch_size(model, n)
    return distributed.agree_min(size) if distributed.launched() else size


def peak_text(device) -> str | None:
    """Every rank's peak memory under torchrun (each rank must call it), else None."""
    return distributed.peak_memory_per_rank(device) if distributed.launched() else None


def print_prompt(args) -> int:
    """--print-prompt: the prompt with its special tokens visible, and its length; no weights read."""
    path = resolve_checkpoint(args.model)
    tok = load_tokenizer(path, args.tokenizer, read_config(path).vocab_size)
    ids = tok.prompt_ids(args.prompt or DEFAULT_PROMPT, chat=not args.raw, thinking=args.thinking, system=args.system)
    print(tok.decode_visible(ids))
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    check_flags(args)
    if args.print_prompt:
        return print_prompt(args)
    model, tok = load_for(args)
    # no graph under torchrun: the experts of a rank pick their tokens with a host-side nonzero
    denoise, line = choose_fast_path(model, args.kernels, not args.no_cuda_graph and not distributed.launched())
    quiet_default = args.kernels == "torch" and model.device.type != "cuda"  # nothing to choose on a CPU
    args.announce = None if args.quiet or quiet_default else line  # printed as generation starts
    torch.manual_seed(args.seed)
    if args.chat:
        from chat import chat_loop
        return chat_loop(model, tok, settings_for(model, max_new_tokens=args.max_new_tokens, steps=args.steps,
                                                  entropy_bound=args.entropy_bound), args, denoise)
    shape = sudoku.shape_of(tok)
    if args.sudoku or (shape and args.prompt is None and not (args.batch_file or args.infill or args.template)):
        return run_sudoku(model, tok, shape, args, denoise)
    if args.infill is not None or args.template is not None:
        return run_fill(model, tok, args, denoise)
    return run_prompts(model, tok, args, denoise)


def run(argv: list[str] | None = None) -> int:
    """The command line: main, with every failure turned into one line and an exit code."""
    args = build_parser().parse_args(argv)  # bad flags: one line, exit 2
    device = torch.device(args.device or default_device())
    try:
        return main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, KernelBuildError, NonFiniteLogits) as e:
        hint = "; try --dtype float32, or the plain path (--kernels torch)" if isinstance(e, NonFiniteLogits) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f"error: {out_of_memory_line(device, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a generation (loading): nothing to show
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
