"""Generate with DiffusionGemma by block diffusion: the Python API and the command line.

The algorithm itself (the loop over canvases, the denoising steps, the entropy-bound sampler) is in
sampler.py; this file turns text into token ids and back, and offers the ways to use it: a prompt,
a batch of prompts, a conversation (chat.py), a gap to fill (infill), a template whose holes the
model fills, and best-of-N with a check that accepts a sample. With a seed every prompt draws from a
random stream of its own, so its text does not depend on what else is generated beside it; for one
prompt that stream is transformers' own, so on the plain path the same seed gives the same tokens
as transformers 5.17.0's DiffusionGemmaForBlockDiffusion.generate.

    python generate.py                          # the bundled model solves a Sudoku puzzle
    python generate.py --model weights-code --max-new-tokens 32 "def fibonacci(n):"
    python generate.py --model google/diffusiongemma-26B-A4B-it --image cat.jpg "What is on the table?"

    from generate import load, generate
    model, tokenizer = load("weights-code")
    print(generate(model, tokenizer, "def fib(n):", max_new_tokens=16, seed=0))
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import distributed
from checkpoint import DeviceError, load_model, open_device, resolve_checkpoint
from cuda_kernels import KernelBuildError
from editing import FILL, fill, parse_infill, parse_template
from hfconfig import CheckpointError, read_config, read_generation_config
from images import ImageError, checkpoint_of, embed_images, image_prompt, image_settings
from job import Job, print_prompt, read_job
from request import check_chat, check_prompts, check_text_model
from sampler import (GenerationSettings, NonFiniteLogits, RequestError, check_context, check_positive, denoise_canvas,
                     run_batches)
from terminal import (CanvasView, Display, Parser, Progress, StreamPrinter, UsageError, closing_line, device_name, dim,
                      free_memory, out_of_memory_line, positive, stopped)
from tokenizer import ChatFormat, Tokenizer, encode_prompt, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"
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


def load(model: str | Path = DEFAULT_MODEL_DIR, device: str | None = None, dtype: str | torch.dtype | None = None,
         sharding=None, adapter: str | Path | None = None) -> tuple:
    """(model, tokenizer) from a checkpoint directory (the bundled ones by name from any folder) or
    a Hugging Face repo id. dtype None or "auto": the checkpoint's dtype on a GPU, float32 on the CPU
    (where bf16 matmuls are slow), as the command line and the server do, so that the same seed gives
    the same text everywhere. adapter: a LoRA adapter directory (lora.py, PEFT's format) applied
    without merging. The model carries its generation_config.json as model.generation_settings.
    sharding: distributed.Sharding."""
    path = resolve_checkpoint(model)
    config = read_config(path)
    tok = load_tokenizer(path, config.vocab_size)  # before the weights: fail fast
    return load_weights(path, config, device, dtype, sharding, name=str(model), adapter=adapter), tok


def load_weights(path: Path, config, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 sharding=None, *, name: str | None = None, adapter: str | Path | None = None):
    """The network of a resolved checkpoint whose config.json was read (load's second half)."""
    if adapter is not None:
        from lora import read_adapter
        read_adapter(adapter)  # a directory that is no adapter: said before the weights are read
        if sharding is not None:
            raise RequestError("an adapter cannot be split across ranks yet: merge it (python finetune.py --merge) "
                               "and run the merged checkpoint")
    device = open_device(device or default_device())
    net = load_model(path, device, compute_dtype(dtype, device), sharding, config=config)
    net.generation_settings = read_generation_config(path, net.config.eos_token_id)
    net.checkpoint_dir, net.checkpoint_name = path, name or str(path)  # embed_images finds the tower there
    if adapter is not None:
        from lora import load_adapter
        load_adapter(net, adapter)
    return net


def compute_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The one dtype rule: a dtype (or its name) as given; None or "auto": float32 on the CPU, else
    None (the checkpoint's own)."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def settings_for(model, **overrides) -> GenerationSettings:
    """The checkpoint's defaults with overrides (GenerationSettings.copy's: max_new_tokens, steps,
    entropy_bound, temperature, eos_token_ids)."""
    base = getattr(model, "generation_settings", None) or read_generation_config(None, model.config.eos_token_id)
    return base.copy(**overrides)


def default_batch_size(model, n_prompts: int) -> int:
    """How many prompts to generate at once: what fits in half the free memory (the logits and
    their temporaries dominate: about 5 fp32 copies of canvas x vocab per prompt), at most 64.
    With per-prompt seeds the texts do not depend on it."""
    per_prompt = 5 * 4 * model.config.canvas_length * model.config.vocab_size
    mem = free_memory(model.device)
    fits = MAX_DEFAULT_BATCH if mem is None else int(0.5 * mem[0] // per_prompt)
    return max(1, min(n_prompts, fits, MAX_DEFAULT_BATCH))


def name_of(model) -> str:
    """How messages name the model's checkpoint: as it was given to load()."""
    return getattr(model, "checkpoint_name", None) or "this model"


def prompt_ids(model, tokenizer: Tokenizer, prompts: list[str], settings: GenerationSettings, chat: ChatFormat,
               images) -> tuple[list[list[int]], list | None]:
    """The token ids of text prompts and their images' embeddings (None without images), after the
    checks every entrance makes (request.py)."""
    check_text_model(tokenizer, name_of(model))
    check_chat(tokenizer, name_of(model), chat)
    per_prompt = [[]] * len(prompts) if images is None else [images] if len(prompts) == 1 and not (
        images and isinstance(images[0], (list, tuple))) else list(images)
    if len(per_prompt) != len(prompts):
        raise RequestError("images: one list of images per prompt")
    s = image_settings(checkpoint_of(model), model.config) if any(per_prompt) else None
    pairs = [image_prompt(tokenizer, p, ims, s, model.config, settings.max_new_tokens, chat=chat)
             for p, ims in zip(prompts, per_prompt)]
    embeds = [embed_images(model, ps) if ps else None for _, ps in pairs] if any(per_prompt) else None
    return [ids for ids, _ in pairs], embeds


def answers(model, tokenizer: Tokenizer, prompt: str | list[str], *, max_new_tokens: int | None = None,
            steps: int | None = None, entropy_bound: float | None = None, temperature: float | None = None,
            seed: int | None = None, chat: ChatFormat = ChatFormat(), batch_size: int | None = None,
            images: list | None = None) -> list:
    """generate()'s work: per prompt, the new tokens split into answer and thought (tokenizer.Thought)."""
    prompts = check_prompts(prompt)
    settings = settings_for(model, max_new_tokens=max_new_tokens, steps=steps, entropy_bound=entropy_bound,
                            temperature=temperature)
    ids, image_embeds = prompt_ids(model, tokenizer, prompts, settings, chat, images)
    if batch_size is not None:
        check_positive("batch_size", batch_size)
    seeds = None if seed is None else [seed] * len(ids)
    results = run_batches(model, ids, settings, batch_size or default_batch_size(model, len(ids)), seeds=seeds,
                          images=image_embeds)
    return [tokenizer.split_thought(tokens) for r in results for tokens in r.tokens]


def generate(model, tokenizer: Tokenizer, prompt: str | list[str], **kw) -> str | list[str]:
    """Text for one prompt, or a list of texts for a list of prompts (in batches of batch_size).
    kw: max_new_tokens, steps, entropy_bound (the checkpoint's generation_config.json where not given),
    temperature (a scale of the checkpoint's temperature schedule: 1, the default, keeps it);
    seed: every prompt draws from its own stream seeded with it (its text does not depend on the
    batch), None: torch's default generator, shared by the batch; chat: a ChatFormat (a system prompt,
    thinking, or raw); batch_size; images: image files or PIL images shown before the prompt (a list
    of them per prompt for a list of prompts; a raw prompt writes <|image|> where each goes).
    The thought of a thinking model is left out (generate_with_thought has it). A request that
    cannot be met as asked raises sampler.RequestError, as the command line refuses it."""
    out = [tokenizer.decode(t.answer) for t in answers(model, tokenizer, prompt, **kw)]
    return out[0] if isinstance(prompt, str) else out


def generate_with_thought(model, tokenizer: Tokenizer, prompt: str | list[str], **kw):
    """(answer, thought) for one prompt, or a list of them: generate() with the thought of a model
    that thinks first (chat=ChatFormat(thinking=True)); thought is None when it did not think."""
    out = [(tokenizer.decode(t.answer), None if t.thought is None else tokenizer.decode(t.thought))
           for t in answers(model, tokenizer, prompt, **kw)]
    return out[0] if isinstance(prompt, str) else out


def generate_json(model, tokenizer: Tokenizer, prompt: str | None, schema: dict, *, steps: int | None = None,
                  entropy_bound: float | None = None, seed: int = 0, samples: int = 1,
                  chat: ChatFormat = ChatFormat()) -> str:
    """JSON text that satisfies the JSON Schema, written after the prompt (None: after <bos>) as a
    typed canvas (editing.fill_json): samples seed, seed + 1, ...; the first that validates.
    structured.SchemaError for a schema that cannot be filled, naming the path."""
    from editing import fill_json
    check_positive("samples", samples)
    settings = settings_for(model, steps=steps, entropy_bound=entropy_bound)
    ids = prompt_ids(model, tokenizer, check_prompts(prompt), settings, chat, None)[0][0] if prompt is not None \
        else [model.config.bos_token_id]
    return fill_json(model, tokenizer, ids, schema, settings, seed=seed, samples=samples).text.rstrip()


def infill(model, tokenizer: Tokenizer, text: str, fill_length: int = 16, steps: int | None = None,
           seed: int | None = None) -> str:
    """The text that fills the single <FILL> of `text`, given what stands on both sides of it."""
    check_text_model(tokenizer, name_of(model))
    check_prompts(text)
    check_positive("fill_length", fill_length)
    settings = settings_for(model, steps=steps)
    left, canvas = parse_infill(tokenizer, text, fill_length)
    check_context(model.config, len(left), canvas.length)
    tokens, _, _ = fill(model, left, canvas, settings, seed=seed)
    return tokenizer.decode(tokens[0][:fill_length])


def fill_template(model, tokenizer: Tokenizer, template: str, *, prompt: str | None = None, hole: str = "_",
                  steps: int | None = None, seed: int | None = None, samples: int = 1, accept=None) -> str | None:
    """The template with its holes filled (after an optional prompt); with samples > 1 and
    accept(text) -> bool, the first sample it accepts (None if none does)."""
    check_prompts(template)
    check_positive("samples", samples)
    settings = settings_for(model, steps=steps)
    canvas = parse_template(tokenizer, template, hole)
    ids = encode_prompt(tokenizer, prompt, model.config, canvas.length) if prompt is not None \
        else [model.config.bos_token_id]
    check_context(model.config, len(ids), canvas.length)
    tokens, ok, _ = fill(model, ids, canvas, settings, samples,
                         None if accept is None else (lambda t: accept(tokenizer.decode(t))), seed=seed)
    return next((tokenizer.decode(t) for t, good in zip(tokens, ok) if good), None)


def choose_fast_path(model, kernels: str = "auto", cuda_graph: bool = True) -> tuple[dict, str]:
    """The one place where the fast paths are chosen: CUDA kernels in the layers, and the CUDA-graph
    step on top of them. Returns block_diffusion's denoise and new_cache, and the line announcing
    the choice ("kernels: cuda ✓ (...), cuda graph ✓" or "kernels: torch (why)")."""
    from cuda_kernels import sampler_stats, use_kernels
    from cuda_kernels.graph import GraphedDenoiser
    line = use_kernels(model, kernels)
    if not line.startswith("kernels: cuda"):
        return {"denoise": denoise_canvas, "new_cache": None}, line
    graphed = GraphedDenoiser(sampler_stats, use_graph=cuda_graph)
    return {"denoise": graphed, "new_cache": graphed.new_cache}, line + (", cuda graph ✓" if cuda_graph else "")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Every flag of generate.py."""
    p = Parser(description="Generate with DiffusionGemma (block diffusion).")
    p.add_argument("prompt", nargs="?", help="the prompt (default: the bundled model's demo)")
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: ./weights)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (finetune.py's, or PEFT's) applied to the model")
    p.add_argument("--max-new-tokens", type=positive(int), help="new tokens at most (default: generation_config.json)")
    p.add_argument("--steps", type=positive(int), help="maximum denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--entropy-bound", type=positive(float), help="entropy budget of the tokens accepted per step")
    p.add_argument("--temperature", type=positive(float),
                   help="scales the checkpoint's temperature schedule (default 1: as it is; lower: more certain)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every prompt (default 0; sample i: seed + i)")
    p.add_argument("--batch-file", help="a UTF-8 file with one prompt a line (empty lines are skipped)")
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
    p.add_argument("--json-schema", metavar="FILE", help="the output is JSON that satisfies this JSON Schema (a file)")
    p.add_argument("--json", action="store_true", help="the output is a JSON object (any)")
    p.add_argument("--samples", type=positive(int), help="best-of-N: N samples of the same input, in one batch")
    p.add_argument("--accept", metavar="CMD", help="shell command given each sample on stdin; exit 0 accepts it")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image shown before the prompt (repeatable; with --raw, <|image|> marks where each goes)")
    p.add_argument("--raw", action="store_true", help="the prompt as written, without the chat format")
    p.add_argument("--system", help="a system prompt (a checkpoint with a chat format)")
    p.add_argument("--thinking", action="store_true", help="let the model think first; the thought goes to stderr")
    p.add_argument("--print-prompt", action="store_true", help="print the prompt as the model gets it, and exit")
    p.add_argument("--chat", action="store_true", help="a conversation, a line a turn (/reset, /system TEXT, /exit)")
    p.add_argument("--show-canvas", action="store_true", help="draw the canvas refining step by step (stderr)")
    p.add_argument("--device", type=device_name, help="cuda, cuda:N, cpu or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--kernels", choices=["auto", "cuda", "torch"], default="torch",
                   help="torch (default): plain PyTorch; cuda: the CUDA kernels and graph; auto: cuda where possible")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no closing line")
    return p


def run_job(model, tok: Tokenizer, job: Job, display: Display, fast: dict, soft: torch.Tensor | None = None) -> int:
    """Generate what the job asks: one text (streamed canvas by canvas), a batch file (printed in
    order, batch by batch), or samples of one input (all of them, or the first that job.check takes).
    soft: the embeddings of the prompt's images (embed_images), for every sample."""
    s, C, n = job.settings, model.config.canvas_length, len(job.ids) * job.samples
    stream = n == 1 and job.check is None
    answer = StreamPrinter(sys.stdout)
    thought = StreamPrinter(sys.stderr, style=lambda t: dim(t, sys.stderr))
    view = CanvasView(job.render, s.sampler.max_steps, job.labels[0] if n > 1 else "",
                      column=lambda: len(answer.text.rsplit("\n", 1)[-1]) if sys.stdout.isatty() else 0) \
        if display.show_canvas else None
    unit = "canvas" if n == 1 else "sample" if job.samples > 1 else "prompt"
    progress = Progress(display, s.canvases(C) if n == 1 else n, unit, view)
    answer.before = thought.before = progress.bar.clear
    answer.update(job.header + (job.echo if stream else ""))
    printed = [0]  # rows printed so far

    def on_canvas(start, ci, new, finished):
        progress.record(start, new, s)
        if stream:  # the answer on stdout, the thought (with --thinking) on stderr
            split = tok.split_thought(progress.committed[0])
            if job.show_thought and split.thought:
                thought.update("thinking: " + tok.decode(split.thought))
            answer.update(job.header + job.echo + job.render(progress.committed[0]))
            progress.bar.update(1)

    def show(row: int, tokens: list[int]) -> None:
        sys.stdout.write(f"=== {job.labels[row]}\n{job.render(tokens)}\n")

    def on_batch(start, result):
        if n > 1 and job.check is None:
            for i, tokens in enumerate(result.tokens):
                show(start + i, tokens)
            sys.stdout.flush()
            printed[0] = start + len(result.tokens)
        progress.bar.update(0 if n == 1 else len(result.tokens))

    seeds = [job.seed + i for i in range(job.samples)] if job.samples > 1 else [job.seed] * len(job.ids)
    size = job.batch_size or default_batch_size(model, n)
    try:
        size = distributed.agree_min(size) if distributed.launched() else size
        results = run_batches(model, job.ids * job.samples, s, size, pins=None if job.pins is None else [job.pins] * n,
                              seeds=seeds, allowed=job.allowed, images=None if soft is None else [soft] * n,
                              on_batch=on_batch, on_canvas=on_canvas,
                              on_step=progress.on_step, **fast)
    except (KeyboardInterrupt, NonFiniteLogits) as e:
        return stopped(e, progress, show if n > 1 else (lambda row, t: None), printed[0], n == 1)
    progress.bar.close()
    sys.stderr.write("\n" if thought.text else "")
    tokens = [t for r in results for t in r.tokens]
    ok = [bool(job.check(t)) for t in tokens] if job.check else []
    if any(ok):
        i = ok.index(True)
        label = job.labels[i] if view is None or i == 0 else \
            f"{job.labels[i]}; the one drawn above, {job.labels[0]}, was not accepted {job.judge}"
        sys.stdout.write(job.picked.format(label=label, text=job.render(tokens[i])))
    sys.stdout.write("\n" if stream or any(ok) else "")
    sys.stdout.flush()
    peak = distributed.peak_memory_per_rank(model.device) if distributed.launched() else None  # every rank
    if not display.quiet:
        cut = job.mode in ("prompt", "batch") and any(len(t) >= s.max_new_tokens for t in tokens)
        print(closing_line(sum(map(len, tokens)), sum(r.canvases for r in results), [k for r in results for k in r.steps],
                           sum(r.seconds for r in results), model.device, budget=job.budget if cut else None,
                           extra=f", {sum(ok)} of {len(ok)} samples accepted {job.judge}" if ok else "", peak=peak),
              file=sys.stderr)
    if ok and not any(ok):
        print(f"error: none of the {len(ok)} samples was accepted {job.judge}: try --samples with a larger N",
              file=sys.stderr)
        return 1
    return 0


def run_json(model, tok: Tokenizer, job: Job, display: Display, fast: dict) -> int:
    """--json / --json-schema: a value that satisfies the schema (editing.fill_json) on stdout."""
    from editing import fill_json
    from structured import SchemaError
    view = CanvasView(tok.decode, job.settings.sampler.max_steps) if display.show_canvas else None
    hooks = {} if view is None else {"on_step": view.draw, "on_canvas": lambda *_: view.clear()}
    t0 = time.perf_counter()
    try:
        f = fill_json(model, tok, job.ids[0], job.schema, job.settings, seed=job.seed, samples=job.samples,
                          **hooks, **fast)
    except SchemaError as e:  # no sample could be filled: not a mistake in the request
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f.text.rstrip(), flush=True)
    if not display.quiet:
        fixes = f", {len(f.snapped)} value{'s' * (len(f.snapped) != 1)} read into the schema" if f.snapped else ""
        print(f"{len(f.tokens)} tokens, {f.rounds} more draw{'s' * (f.rounds != 1)}{fixes}, valid against the "
              f"schema, {time.perf_counter() - t0:.1f} s, device {model.device}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    """Read the checkpoint's config and tokenizer and the job the flags ask for, then the weights;
    run the job."""
    if args.model is None and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise UsageError("no model given and no bundled model in ./weights: "
                         "pass --model DIR (a checkpoint directory) or --model google/diffusiongemma-26B-A4B-it")
    name = args.model or "weights"
    path = resolve_checkpoint(args.model or DEFAULT_MODEL_DIR, weights=not args.print_prompt)
    config = read_config(path)
    tok = load_tokenizer(path, config.vocab_size)
    job = read_job(args, tok, config, read_generation_config(path, config.eos_token_id), name, path)
    if args.print_prompt:
        return print_prompt(job, tok)
    device = open_device(args.device or default_device())
    quiet = args.quiet
    try:
        if distributed.launched():
            model = distributed.load_sharded(
                lambda sharding, dev: load_weights(path, config, dev, args.dtype, sharding, name=name, adapter=args.adapter),
                device.type, CheckpointError)
            if int(os.environ["RANK"]):  # under torchrun only rank 0 speaks
                quiet, sys.stdout = True, open(os.devnull, "w")
        else:
            model = load_weights(path, config, device, args.dtype, name=name, adapter=args.adapter)
        soft = None if not job.images else embed_images(model, job.images)  # the vision tower: only now
    except torch.OutOfMemoryError as e:
        raise DeviceError(out_of_memory_line(device, e, loading=True)) from None
    # no graph under torchrun: the experts of a rank pick their tokens with a host-side nonzero
    fast, line = choose_fast_path(model, args.kernels, cuda_graph=not distributed.launched())
    announce = None if args.kernels == "torch" and model.device.type != "cuda" else line  # nothing chosen on a CPU
    display = Display(quiet, args.show_canvas or (job.mode == "sudoku" and sys.stderr.isatty()), announce)
    if job.mode == "json":
        return run_json(model, tok, job, display, fast)
    if job.mode != "chat":
        return run_job(model, tok, job, display, fast, soft)
    from chat import chat_loop
    torch.manual_seed(args.seed)  # a conversation draws from the shared stream
    return chat_loop(model, tok, job.settings, display, system=args.system, thinking=args.thinking,
                     denoise=fast["denoise"])


def run(argv: list[str] | None = None) -> int:
    """The command line: main, with every failure turned into one line and an exit code."""
    args = build_parser().parse_args(argv)  # bad flags: one line, exit 2
    try:
        return main(args)
    except (UsageError, RequestError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DeviceError, KernelBuildError, NonFiniteLogits) as e:
        hint = "; try --dtype float32, or the plain path (--kernels torch)" if isinstance(e, NonFiniteLogits) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f"error: {out_of_memory_line(torch.device(args.device or default_device()), e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a generation (loading): nothing to show
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    try:
        code = run()
    except SystemExit as e:  # a flag argparse refused, or a rank told to stop by another
        code = e.code
    if distributed.launched():
        distributed.finish(code)  # every rank ends together (never returns)
    sys.exit(code)
