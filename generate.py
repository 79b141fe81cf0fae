"""Generate text with DiffusionGemma by block diffusion: the command line, the loop, a small API.

Follows transformers 5.17.0 `DiffusionGemmaGenerationMixin.generate`: the same seed gives the same
tokens. The loop, per 256-token canvas:
  1. causal pass over the tokens not yet in the cache (the prompt, then the last committed canvas)
  2. canvas = uniformly random tokens
  3. up to max_steps denoising steps (step counts down): logits = model(canvas, cache, previous
     logits for self-conditioning); the sampler keeps the most certain tokens and renoises the rest;
     stop early once the argmax is stable and confident
  4. commit the final ARGMAX canvas; after an end-of-turn/EOS token everything becomes padding
Unlike transformers, --max-new-tokens is exact: the last canvas is trimmed.

    python generate.py --model google/diffusiongemma-26B-A4B-it "Why is the sky blue?"

    from generate import load, generate
    model, tokenizer = load("path/to/checkpoint")
    print(generate(model, tokenizer, "def fib(n):", max_new_tokens=64, seed=0))
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cuda_kernels import KernelBuildError
from kvcache import KVCache
from model import CheckpointError, DiffusionGemma, load_model, resolve_checkpoint
from sampler import DenoiseState, SamplerSettings, sampler_step

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"

# chat format of the Gemma 4 instruction-tuned models (SPEC §6)
BOS, TURN_OPEN, TURN_CLOSE = "<bos>", "<|turn>", "<turn|>"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"
THINK_SYSTEM_TURN = "<|turn>system\n<|think|><turn|>\n"


class UsageError(Exception):
    """A mistake in what the user asked for (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    eos_token_ids: tuple = (1, 106, 50)
    pad_token_id: int = 0


def read_generation_config(path: Path | None, config_eos: list[int]) -> GenerationSettings:
    """Defaults from the checkpoint's generation_config.json, else the transformers defaults."""
    g = {}
    if path is not None and (path / "generation_config.json").is_file():
        try:
            g = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / 'generation_config.json'} is not valid JSON ({e})") from None
    g = {k: v for k, v in g.items() if v is not None}  # unset fields are written as null
    s = SamplerSettings()
    s.max_steps = g.get("max_denoising_steps", s.max_steps)
    s.entropy_bound = (g.get("sampler_config") or {}).get("entropy_bound", s.entropy_bound)
    s.t_min = g.get("t_min", s.t_min)
    s.t_max = g.get("t_max", s.t_max)
    s.stability_threshold = g.get("stability_threshold", s.stability_threshold)
    s.confidence_threshold = g.get("confidence_threshold", s.confidence_threshold)
    eos = g.get("eos_token_id", config_eos)
    return GenerationSettings(max_new_tokens=g.get("max_new_tokens", 256), sampler=s,
                              eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                              pad_token_id=g.get("pad_token_id", 0))


# ---------------------------------------------------------------------------------------------
# The block-diffusion loop
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    sequences: torch.Tensor  # (B, P + n_canvas * C): prompts (left padded) + whole canvases, as transformers
    prompt_length: int  # P
    tokens: list  # per row: the new tokens, cut after EOS and at max_new_tokens
    canvases: int = 0
    steps: list = field(default_factory=list)  # denoising steps run for each canvas
    seconds: float = 0.0


def finalize_canvas(seq: torch.Tensor, finished: torch.Tensor, C: int, eos: torch.Tensor, pad: int,
                    max_length: int) -> torch.Tensor:
    """After a commit: which rows are done, and padding after EOS (as transformers _finalize_canvas)."""
    new = seq[:, -C:]
    done_now = torch.isin(new, eos).any(dim=-1) | (seq.shape[1] >= max_length)
    previously = finished
    finished = previously | done_now
    if finished.any():
        seq[previously, -C:] = pad  # rows finished in an earlier canvas: all padding
        if done_now.any():
            is_eos = torch.isin(new, eos)
            seen = is_eos.cumsum(dim=-1)
            after_first_eos = (seen > 0) & ~((seen == 1) & is_eos)
            new[after_first_eos] = pad  # writes into seq
    return finished


def denoise_canvas(model: DiffusionGemma, cache: KVCache, state: DenoiseState, s: SamplerSettings,
                   pinned=None, pinned_tokens=None, on_step=None) -> tuple[DenoiseState, int]:
    """Refine one canvas: up to s.max_steps denoising steps (step counts down), stopping early once
    every row is stable and confident. Returns the final state and the number of steps run.
    (cudagraph.GraphedDenoiser is the same function with the step captured in a CUDA graph.)"""
    steps = 0
    for step in range(s.max_steps, 0, -1):
        raw = model.forward_canvas(state.canvas, cache, state.sc_logits)  # (B, C, V) fp32
        state = sampler_step(state, raw, step, s, model.dtype, pinned, pinned_tokens)
        steps += 1
        if on_step is not None:
            on_step(step, state)
        if bool(state.finished.all()):
            break
    return state, steps


@torch.no_grad()
def block_diffusion(model: DiffusionGemma, prompts: list[list[int]], settings: GenerationSettings,
                    pins: list[dict[int, int]] | None = None, on_step=None, on_canvas=None,
                    denoise=denoise_canvas) -> GenerationResult:
    """Generate continuations of token-id prompts (a batch, left padded).

    pins: per row {offset from the first new token: token id}; those positions of the canvases are
    fixed (infill, closing tags) and never renoised.
    on_step(canvas_index, step, state) after every denoising step; on_canvas(canvas_index, seq, finished)
    after every commit. denoise: denoise_canvas, or a faster function with its signature.
    """
    c = model.config
    C, V = c.canvas_length, c.vocab_size
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    seq = torch.full((B, P), settings.pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seq[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    n_canvas = math.ceil(settings.max_new_tokens / C)
    max_length = P + settings.max_new_tokens
    eos = torch.tensor(settings.eos_token_ids, device=device)
    cache = KVCache(c.layer_types, c.sliding_window)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    result = GenerationResult(sequences=seq, prompt_length=P, tokens=[])
    t0 = time.perf_counter()

    pending, pending_valid = seq, (None if bool(valid.all()) else valid)
    for ci in range(n_canvas):
        model.forward_causal(pending, cache, pending_valid)  # 1. read what the cache lacks
        pinned, pinned_tokens = canvas_pins(pins, ci, B, C, device)
        state = DenoiseState.start(B, C, V, device, pinned, pinned_tokens)  # 2. random canvas
        step_hook = None if on_step is None else (lambda step, st, ci=ci: on_step(ci, step, st))
        state, steps = denoise(model, cache, state, settings.sampler, pinned, pinned_tokens, step_hook)  # 3.
        seq = torch.cat([seq, state.argmax], dim=1)  # 4. commit the argmax
        finished = finalize_canvas(seq, finished, C, eos, settings.pad_token_id, max_length)
        result.steps.append(steps)
        result.canvases += 1
        if on_canvas is not None:
            on_canvas(ci, seq, finished)
        if bool(finished.all()):
            break
        pending, pending_valid = seq[:, -C:], None

    result.sequences = seq
    result.seconds = time.perf_counter() - t0
    result.tokens = [trim(seq[b, P:].tolist(), settings) for b in range(B)]
    return result


def canvas_pins(pins, ci: int, B: int, C: int, device):
    """The (B, C) pinned mask and tokens of canvas ci, or (None, None)."""
    if not pins or not any(pins):
        return None, None
    mask = torch.zeros(B, C, dtype=torch.bool, device=device)
    tokens = torch.zeros(B, C, dtype=torch.long, device=device)
    for b, row in enumerate(pins):
        for offset, tok in (row or {}).items():
            if ci * C <= offset < (ci + 1) * C:
                mask[b, offset - ci * C] = True
                tokens[b, offset - ci * C] = tok
    return (mask, tokens) if mask.any() else (None, None)


def trim(tokens: list[int], settings: GenerationSettings) -> list[int]:
    """New tokens up to (not including) the first EOS, at most max_new_tokens."""
    out = []
    for t in tokens[: settings.max_new_tokens]:
        if t in settings.eos_token_ids:
            break
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat format
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """tokenizer.json (Hugging Face `tokenizers`) plus the Gemma 4 chat format."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path

    @property
    def is_chat(self) -> bool:
        """Instruction-tuned Gemma 4 tokenizers have the turn markers."""
        return self.tok.token_to_id(TURN_OPEN) is not None and self.tok.token_to_id(TURN_CLOSE) is not None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str, chat: bool, thinking: bool = False) -> list[int]:
        """The chat template of a user turn (as apply_chat_template(add_generation_prompt=True)), or
        the text untouched, with only the special tokens the tokenizer itself adds (Gemma: <bos>)."""
        if not chat:
            return self.tok.encode(text, add_special_tokens=True).ids
        system = THINK_SYSTEM_TURN if thinking else ""
        thought = "" if thinking else EMPTY_THOUGHT  # non-thinking: an empty, closed thought block
        return self.encode(f"{BOS}{system}{TURN_OPEN}user\n{text}{TURN_CLOSE}\n{TURN_OPEN}model\n{thought}")

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def find_tokenizer(checkpoint: Path, override: str | None, vocab_size: int) -> Tokenizer:
    path = Path(override) if override else checkpoint / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint has no tokenizer.json; pass --tokenizer FILE")
    tok = Tokenizer(path)
    if tok.tok.get_vocab_size() > vocab_size:
        raise CheckpointError(f"{path} has {tok.tok.get_vocab_size()} tokens but the model only {vocab_size}: "
                              "use the tokenizer that came with the checkpoint")
    return tok


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------

def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load(model: str | Path = DEFAULT_MODEL_DIR, device: str | None = None, dtype: torch.dtype | None = None,
         tokenizer: str | None = None):
    """(model, tokenizer) from a checkpoint directory or a Hugging Face repo id."""
    path = resolve_checkpoint(str(model))
    net = load_model(path, device or default_device(), dtype)
    net.checkpoint_dir = path
    net.generation_settings = read_generation_config(path, net.config.eos_token_id)
    return net, find_tokenizer(path, tokenizer, net.config.vocab_size)


def settings_for(model, **overrides) -> GenerationSettings:
    """The checkpoint's defaults, with overrides (max_new_tokens, steps, entropy_bound)."""
    base = getattr(model, "generation_settings", None) or read_generation_config(None, model.config.eos_token_id)
    s = GenerationSettings(max_new_tokens=base.max_new_tokens, sampler=SamplerSettings(**vars(base.sampler)),
                           eos_token_ids=base.eos_token_ids, pad_token_id=base.pad_token_id)
    if overrides.get("max_new_tokens") is not None:
        s.max_new_tokens = overrides["max_new_tokens"]
    if overrides.get("steps") is not None:
        s.sampler.max_steps = overrides["steps"]
    if overrides.get("entropy_bound") is not None:
        s.sampler.entropy_bound = overrides["entropy_bound"]
    return s


def check_context(model, n_prompt: int, max_new_tokens: int, name: str = "prompt") -> None:
    """Prompt plus whole canvases must fit in the model's positions."""
    C, limit = model.config.canvas_length, model.config.max_position_embeddings
    need = n_prompt + math.ceil(max_new_tokens / C) * C
    if need > limit:
        raise UsageError(f"{name} has {n_prompt} tokens; with --max-new-tokens {max_new_tokens} that needs {need} "
                         f"positions but the model has {limit}: shorten the prompt or ask for fewer tokens")


def encode_prompts(model, tokenizer: Tokenizer, prompts: list[str], raw: bool, thinking: bool,
                   settings: GenerationSettings) -> list[list[int]]:
    out = []
    for i, text in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if not text.strip():
            raise UsageError(f"the {name} is empty")
        ids = tokenizer.prompt_ids(text, chat=tokenizer.is_chat and not raw, thinking=thinking)
        check_context(model, len(ids), settings.max_new_tokens, name)
        out.append(ids)
    return out


def generate(model, tokenizer: Tokenizer, prompt: str | list[str], max_new_tokens: int | None = None,
             steps: int | None = None, entropy_bound: float | None = None, seed: int | None = None,
             raw: bool = False, thinking: bool = False) -> str | list[str]:
    """Text for one prompt, or a list of texts for a list of prompts (generated as one batch)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    settings = settings_for(model, max_new_tokens=max_new_tokens, steps=steps, entropy_bound=entropy_bound)
    ids = encode_prompts(model, tokenizer, prompts, raw, thinking, settings)
    if seed is not None:
        torch.manual_seed(seed)
    result = block_diffusion(model, ids, settings)
    texts = [tokenizer.decode(t) for t in result.tokens]
    return texts[0] if isinstance(prompt, str) else texts


FILL = "<FILL>"


@dataclass
class Infill:
    """A gap to fill: the left context is the prompt; the canvas holds fill_length free tokens
    followed by the right context, pinned."""
    left: list[int]
    right: list[int]
    fill_length: int

    @property
    def pins(self) -> dict[int, int]:
        return {self.fill_length + i: t for i, t in enumerate(self.right)}

    @property
    def new_tokens(self) -> int:
        return self.fill_length + len(self.right)


def make_infill(tokenizer: Tokenizer, text: str, fill_length: int) -> Infill:
    if text.count(FILL) != 1:
        raise UsageError(f"--infill text must contain {FILL} exactly once (it has {text.count(FILL)})")
    left, right = text.split(FILL)
    if not left.strip():
        raise UsageError(f"--infill needs some text before {FILL}: it is the prompt")
    return Infill(left=tokenizer.prompt_ids(left, chat=False), right=tokenizer.encode(right) if right else [],
                  fill_length=fill_length)


def parse_pin(tokenizer: Tokenizer, spec: str) -> dict[int, int]:
    """--pin OFFSET:TEXT: the tokens of TEXT fixed from new-token OFFSET on."""
    offset, sep, text = spec.partition(":")
    if not sep or not offset.strip().isdigit() or not text:
        raise UsageError(f"--pin {spec!r}: expected OFFSET:TEXT, e.g. --pin 40:'}}'")
    return {int(offset) + i: t for i, t in enumerate(tokenizer.encode(text))}


def infill(model, tokenizer: Tokenizer, text: str, fill_length: int = 16, steps: int | None = None,
           seed: int | None = None) -> str:
    """The text that fills the single <FILL> of `text`, given what stands on both sides of it."""
    job = make_infill(tokenizer, text, fill_length)
    settings = settings_for(model, max_new_tokens=job.new_tokens, steps=steps)
    settings.eos_token_ids = ()  # the fill has a fixed length: no early end
    if seed is not None:
        torch.manual_seed(seed)
    result = block_diffusion(model, [job.left], settings, pins=[job.pins])
    return tokenizer.decode(result.tokens[0][: job.fill_length])


# ---------------------------------------------------------------------------------------------
# Terminal output
# ---------------------------------------------------------------------------------------------

class CanvasView:
    """--show-canvas: redraws the current argmax canvas in place on stderr at every step."""

    def __init__(self, tokenizer: Tokenizer, stream=sys.stderr):
        self.tok, self.out, self.lines = tokenizer, stream, 0

    def draw(self, ci: int, step: int, state: DenoiseState) -> None:
        text = self.tok.decode(state.argmax[0].tolist()).replace("\r", "")
        width = max(20, shutil.get_terminal_size((100, 20)).columns)
        header = f"canvas {ci + 1} · step {step} · accepted {int(state.accepted[0].sum())}"
        body = [header] + [ln[i: i + width] for ln in text.split("\n") for i in range(0, max(len(ln), 1), width)]
        self.clear()
        self.out.write("\033[33m" + "\n".join(body) + "\033[0m\n")
        self.out.flush()
        self.lines = len(body)

    def clear(self) -> None:
        if self.lines:
            self.out.write(f"\033[{self.lines}F\033[J")
            self.lines = 0


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    try:
        import resource
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process RSS)"
    except ImportError:
        return "n/a"


def choose_fast_path(model, kernels: str = "auto", cuda_graph: bool = True, announce: bool = True):
    """The one place where the fast paths are chosen: CUDA kernels in the layers, and the CUDA-graph
    step on top of them. Returns the denoise function for block_diffusion."""
    from cuda_kernels import use_kernels
    line = use_kernels(model, kernels)
    denoise = denoise_canvas
    if line.startswith("kernels: cuda") and cuda_graph:
        from cudagraph import GraphedDenoiser
        denoise = GraphedDenoiser()
        line += ", cuda graph ✓"
    if announce:
        print(line, file=sys.stderr)
    return denoise


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {v}")
    return v


def read_batch_file(path: str) -> list[str]:
    text = read_text_file(path, "batch file")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"batch file {path} has no prompts (one prompt a line)")
    return prompts


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Generate text with DiffusionGemma (block diffusion).")
    p.add_argument("prompt", nargs="?", help="the prompt (default: a code prompt for the bundled model)")
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id "
                                   "(default: the bundled model in ./weights)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=positive_int, help="exact number of new tokens at most "
                                                                 "(default: generation_config.json, else 256)")
    p.add_argument("--steps", type=positive_int, help="maximum denoising steps per canvas (default 48)")
    p.add_argument("--entropy-bound", type=positive_float, help="entropy budget of accepted tokens per step (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-file", help="a UTF-8 file with one prompt a line, generated together as one batch")
    p.add_argument("--infill", help=f"fill a gap: 'left{FILL}right'; the left side is the prompt, the right side "
                                    "is pinned after the gap; prints the filled text")
    p.add_argument("--infill-file", help=f"like --infill, the text read from a UTF-8 file")
    p.add_argument("--fill-length", type=positive_int, default=16, help="tokens in the gap for --infill (default 16)")
    p.add_argument("--pin", action="append", default=[], metavar="OFFSET:TEXT",
                   help="fix the tokens of TEXT at new-token OFFSET (e.g. a closing '}' or '</div>'); repeatable")
    p.add_argument("--raw", action="store_true", help="send the prompt untouched (after <bos>), without the chat format")
    p.add_argument("--thinking", action="store_true", help="let an instruction-tuned model think first")
    p.add_argument("--show-canvas", action="store_true", help="draw the canvas refining step by step (stderr)")
    p.add_argument("--device", help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--kernels", choices=["auto", "cuda", "torch"], default="torch",
                   help="torch (default): the plain PyTorch path; cuda: CUDA kernels for the experts and canvas "
                        "attention plus a CUDA-graph step (not yet verified on a GPU); auto: cuda where possible")
    p.add_argument("--no-cuda-graph", action="store_true", help="with CUDA kernels, run the step without a CUDA graph")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no closing line")
    return p


DEFAULT_PROMPT = "def fibonacci(n):\n"


def read_text_file(path: str, what: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def main(args: argparse.Namespace) -> int:
    sources = [x for x in (args.prompt is not None, args.batch_file, args.infill, args.infill_file) if x]
    if len(sources) > 1:
        raise UsageError("give one of: a prompt, --batch-file, --infill, --infill-file")
    if args.infill_file:
        args.infill = read_text_file(args.infill_file, "infill file")
    if args.model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise UsageError("no model given and no bundled model in ./weights: "
                             "pass --model DIR (a checkpoint directory) or --model google/diffusiongemma-26B-A4B-it")
        args.model = str(DEFAULT_MODEL_DIR)
    prompts = read_batch_file(args.batch_file) if args.batch_file else [
        DEFAULT_PROMPT if args.prompt is None else args.prompt]
    device = torch.device(args.device or default_device())
    # auto: the checkpoint's dtype on a GPU; float32 on the CPU, where bf16 matmuls are slow
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float32 if device.type == "cpu" else None)
    model, tokenizer = load(args.model, device, dtype, args.tokenizer)
    settings = settings_for(model, max_new_tokens=args.max_new_tokens, steps=args.steps,
                            entropy_bound=args.entropy_bound)
    pins = {}
    for spec in args.pin:
        pins.update(parse_pin(tokenizer, spec))
    job = None
    if args.infill is not None:
        job = make_infill(tokenizer, args.infill, args.fill_length)
        pins.update(job.pins)
        settings.max_new_tokens = job.new_tokens
        settings.eos_token_ids = ()  # the fill has a fixed length
        prompts = [args.infill.split(FILL)[0]]
        ids = [job.left]
        check_context(model, len(job.left), settings.max_new_tokens, "the infill text")
    else:
        ids = encode_prompts(model, tokenizer, prompts, args.raw, args.thinking, settings)
    if pins and max(pins) >= settings.max_new_tokens:
        raise UsageError(f"a pinned position ({max(pins)}) is beyond --max-new-tokens {settings.max_new_tokens}")
    denoise = choose_fast_path(model, args.kernels, not args.no_cuda_graph, announce=not args.quiet)
    torch.manual_seed(args.seed)

    from tqdm import tqdm
    n_canvas = math.ceil(settings.max_new_tokens / model.config.canvas_length)
    bar = tqdm(total=n_canvas, unit="canvas", file=sys.stderr, disable=args.quiet or args.show_canvas,
               dynamic_ncols=True)
    view = CanvasView(tokenizer) if args.show_canvas else None
    single = len(prompts) == 1 and job is None
    printed = [""]  # what of the single prompt's answer is already on stdout

    def on_canvas(ci, seq, finished):
        if view is not None:
            view.clear()
        if single:  # stream: print each canvas as soon as it is final
            text = tokenizer.decode(trim(seq[0, len(ids[0]):].tolist(), settings))
            if text.startswith(printed[0]):
                bar.clear()  # keep the bar's line on stderr apart from the text
                sys.stdout.write(text[len(printed[0]):])
                sys.stdout.flush()
                printed[0] = text
        bar.update(1)

    result = block_diffusion(model, ids, settings, pins=[pins] * len(ids) if pins else None,
                             on_step=view.draw if view else None, on_canvas=on_canvas, denoise=denoise)
    bar.close()
    if job is not None:
        left, right = args.infill.split(FILL)
        sys.stdout.write(left + tokenizer.decode(result.tokens[0][: job.fill_length]) + right + "\n")
    elif single:
        sys.stdout.write("\n")
    else:
        for i, toks in enumerate(result.tokens):
            sys.stdout.write(f"=== {i + 1}: {prompts[i][:60]}\n{tokenizer.decode(toks)}\n")
    sys.stdout.flush()
    if not args.quiet:
        n = sum(len(t) for t in result.tokens)
        mean_steps = sum(result.steps) / max(len(result.steps), 1)
        budget = any(len(t) >= settings.max_new_tokens for t in result.tokens)
        print(f"{n} tokens, {result.canvases} canvases, {mean_steps:.1f} steps/canvas, "
              f"{n / max(result.seconds, 1e-9):.1f} tok/s, peak memory {peak_memory(device)}, device {device}"
              + (f" (stopped at --max-new-tokens {settings.max_new_tokens})" if budget else ""), file=sys.stderr)
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad flags: argparse prints one line of usage and exits 2
    try:
        return main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of memory on {args.device or default_device()}: use a shorter prompt, fewer prompts, "
              "a smaller --max-new-tokens, or a machine with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
