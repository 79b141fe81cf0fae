"""What a command line asks for: the flags of generate.py read, checked and turned into a Job (the
mode, the prompts' token ids, the canvas pins, the samples and their check) before any weight is
read, so that every mistake in a request is one line within a second. generate.py runs the Job.

    import generate, job; from hfconfig import read_config, read_generation_config; from tokenizer import load_tokenizer
    args = generate.build_parser().parse_args(["--max-new-tokens", "8", "def f(x):"])
    cfg, tok = read_config("weights-code"), load_tokenizer("weights-code")
    j = job.read_job(args, tok, cfg, read_generation_config("weights-code", cfg.eos_token_id), "weights-code")
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import sudoku
from editing import FILL, parse_infill, parse_pin, parse_template, shell_accept
from request import check_chat, check_text_model
from sampler import GenerationSettings, RequestError, check_context
from terminal import UsageError
from tokenizer import ChatFormat, Tokenizer, encode_prompt

DEFAULT_PROMPT = "def fibonacci(n):\n"  # what a model without a demo of its own is asked


def read_text_file(path: str, what: str) -> str:
    """A UTF-8 file's text, or a UsageError naming it (and the line of a byte that is not UTF-8)."""
    try:
        data = Path(path).read_bytes()
        return data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(f"{what} {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass
class Job:
    """What the command line asks for, read and checked once, before any weight is read."""
    mode: str  # "prompt", "batch", "fill", "sudoku", "chat" or "json"
    settings: GenerationSettings  # the checkpoint's, with the flags' overrides
    ids: list[list[int]]  # the prompts' token ids (one per prompt; each sample repeats it)
    labels: list[str]  # what heads each output ("=== LABEL"): the file's lines, or the samples
    seed: int = 0
    samples: int = 1
    render: object = None  # new tokens -> the text printed (default: the answer, without a thought)
    echo: str = ""  # printed before a text (a raw prompt reads on into its continuation)
    header: str = ""  # printed first (a Sudoku puzzle)
    pins: dict | None = None  # {offset: token} of every sample
    check: object = None  # best-of-N: new tokens -> bool; `judge` says whose check it is
    judge: str = ""
    picked: str = "=== {label} (accepted)\n{text}"  # how the accepted sample is printed, as the others are
    show_thought: bool = False  # --thinking: the thought goes to stderr
    budget: str = ""  # the limit that cuts a text short, as the closing line names it
    batch_size: int | None = None
    schema: dict | None = None  # --json / --json-schema: what the output must satisfy
    allowed: object = None  # structured.Allowed: the tokens positions of every sample may take
    images: list | None = None  # --image: the prompt's images, cut into patches (images.Patches)


def mode_of(args, text: dict) -> str:
    """The one mode the flags ask for ("prompt", "batch", "infill", "template", "sudoku", "chat" or
    "json"), after the checks on which flags go together. text: --infill's and --template's text."""
    modes = [m for m, on in (("batch", args.batch_file), ("infill", text["infill"] is not None),
                             ("template", text["template"] is not None), ("sudoku", args.sudoku), ("chat", args.chat),
                             ("json", args.json_schema or args.json)) if on]
    samples = args.samples or 1
    if len(modes) > 1 or (modes and modes[0] not in ("template", "json") and args.prompt is not None):
        raise UsageError("give one of: a prompt, --batch-file, --infill, --template, --sudoku, --chat "
                         "(--json and --json-schema take a prompt)")
    if "json" in modes and (args.pin or args.accept):
        raise UsageError(f"--{'pin' if args.pin else 'accept'} does not go with --json/--json-schema: the schema "
                         "pins the canvas, and every sample is checked against it")
    if args.image and modes:
        raise UsageError(f"--image goes with a prompt (images come before it in the chat format; with --raw, "
                         f"<|image|> marks where each goes), not with --{modes[0].replace('batch', 'batch-file')}")
    if args.accept and samples < 2:
        raise UsageError("--accept picks among samples: give --samples N as well")
    if samples > 1 and modes in (["batch"], ["chat"]):
        raise UsageError("--samples works on one input: a prompt, --infill, --template or --sudoku")
    if len(args.hole) != 1:
        raise UsageError(f"--hole must be one character, not {args.hole!r}")
    return modes[0] if modes else "prompt"


def read_job(args, tok: Tokenizer, config, base: GenerationSettings, name: str, path=None) -> Job:
    """Decide the mode (the one place), read every file the flags name, encode the prompts and check
    everything that needs no weights. path: the checkpoint directory (needed with --image)."""
    text = {f: read_text_file(getattr(args, f + "_file"), f"--{f}-file") if getattr(args, f + "_file") else getattr(args, f)
            for f in ("infill", "template")}
    mode = mode_of(args, text)
    if args.image:
        from checkpoint import vision_config
        vision_config(path, config)  # a checkpoint without a tower: said before anything else is read
    shape = sudoku.shape_of(tok)
    if mode == "sudoku" or (shape is not None and mode == "prompt" and args.prompt is None):
        return sudoku_job(args, tok, shape, base, name)
    if mode != "template":
        check_text_model(tok, name)
    chat = ChatFormat(args.raw, args.thinking, args.system)
    check_chat(tok, name, chat, conversation=args.chat)
    settings = base.copy(max_new_tokens=args.max_new_tokens, steps=args.steps, entropy_bound=args.entropy_bound,
                         temperature=args.temperature)
    samples = args.samples or 1
    job = Job(mode, settings, [], [f"sample {i + 1}" for i in range(samples)], args.seed, samples,
              render=lambda t: tok.decode(tok.split_thought(t).answer), judge=f"by {args.accept}",
              show_thought=args.thinking, batch_size=args.batch_size,
              pins={k: v for spec in args.pin for k, v in parse_pin(tok, spec).items()} or None,
              budget=f"--max-new-tokens {args.max_new_tokens}" if args.max_new_tokens else
              f"the {settings.max_new_tokens} new tokens of generation_config.json; --max-new-tokens N for more")
    encode = lambda t, what="prompt": encode_prompt(tok, t, config, job.settings.max_new_tokens, chat, name=what)  # noqa: E731
    if mode == "batch":
        batch_job(job, args.batch_file, encode)
    elif mode == "prompt":
        prompt_job(job, args, tok, config, encode, chat=chat, path=path)
    elif mode == "json":
        job.ids, job.schema = [encode(args.prompt) if args.prompt else [config.bos_token_id]], read_schema(args)
        check_context(config, len(job.ids[0]), check_schema_fits(job.schema, tok, config, job.samples))
    elif mode in ("infill", "template"):
        fill_job(job, text[mode], args, tok, config, encode)
    if job.pins and max(job.pins) >= job.settings.max_new_tokens:
        raise RequestError(f"a pinned position ({max(job.pins)}) is beyond the {job.settings.max_new_tokens} new tokens")
    if args.accept:
        accept = shell_accept(args.accept)
        job.check = lambda t: accept(job.echo + job.render(t))
    return job


def batch_job(job: Job, batch_file: str, encode) -> None:
    """--batch-file: a prompt a line (empty lines skipped), each output headed by its line number."""
    lines = [(i + 1, ln) for i, ln in enumerate(read_text_file(batch_file, "batch file").splitlines())]
    lines = [(n, ln) for n, ln in lines if ln.strip()]
    if not lines:
        raise UsageError(f"batch file {batch_file} has no prompts (one prompt a line)")
    job.ids, job.labels = [encode(ln, f"prompt on line {n}") for n, ln in lines], [f"{n}: {ln[:60]}" for n, ln in lines]


def prompt_job(job: Job, args, tok: Tokenizer, config, encode, *, chat: ChatFormat, path) -> None:
    """One prompt (with --image, its images before it); a raw prompt is echoed before its continuation."""
    if args.image:
        from images import ImageError, image_prompt, image_settings
        prompt = "Describe this image." if args.prompt is None else args.prompt
        try:
            ids, job.images = image_prompt(tok, prompt, args.image, image_settings(path, config), config,
                                           job.settings.max_new_tokens, chat=chat)
        except ImageError as e:
            raise UsageError(str(e)) from None
    else:
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        ids = encode(prompt)
    job.ids, job.echo = [ids], ("" if tok.is_chat and not args.raw else prompt)


def fill_job(job: Job, text: str, args, tok: Tokenizer, config, encode) -> None:
    """--infill (the left side the prompt, the right side pinned after the gap) or --template (the
    holes free, the rest pinned): a canvas of exactly its length, no early end."""
    if job.mode == "infill":
        left, canvas = parse_infill(tok, text, args.fill_length)
        before, after = text.split(FILL)
        job.ids, job.render = [left], lambda t: before + tok.decode(t[: args.fill_length]) + after
    else:
        canvas = parse_template(tok, text, args.hole)
        job.ids, job.render = [encode(args.prompt) if args.prompt else [config.bos_token_id]], tok.decode
    canvas.pin(job.pins or {})
    check_context(config, len(job.ids[0]), canvas.length)
    job.mode, job.pins = "fill", canvas.pins
    job.settings = job.settings.copy(max_new_tokens=canvas.length, eos_token_ids=())  # exactly the canvas


def read_schema(args) -> dict:
    """The schema of --json-schema FILE (a UsageError naming a line that is not JSON), or of --json: any object."""
    if not args.json_schema:
        return {"type": "object"}
    text = read_text_file(args.json_schema, "--json-schema")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--json-schema {args.json_schema} is not JSON (line {e.lineno}: {e.msg})") from None


def check_schema_fits(schema: dict, tok: Tokenizer, config, samples: int) -> int:
    """structured's check of a schema, and the canvas layouts of its samples: their longest length."""
    from structured import build, check_schema, token_sets
    check_schema(schema)  # a keyword it cannot guarantee: one line naming it
    sets = token_sets(tok, config.vocab_size)
    room = config.max_position_embeddings - config.canvas_length
    return len(build(schema, tok, sets, max_positions=room).tokens)


def sudoku_job(args, tok: Tokenizer, shape, base: GenerationSettings, name: str) -> Job:
    """--sudoku (or a Sudoku model run bare): the puzzle's givens pinned on the canvas, best-of-N
    with the rules as the check."""
    if shape is None:
        raise UsageError(f"{name} is not a Sudoku model (its tokenizer has no cell tokens)")
    try:
        puzzle = sudoku.parse_grid(args.sudoku, shape) if args.sudoku else sudoku.BUILTIN[shape.n]
    except ValueError as e:
        raise UsageError(f"--sudoku: {e}") from None
    samples, grid = args.samples or sudoku.DEMO_SAMPLES, (lambda t: sudoku.from_tokens(t, shape))
    settings = base.copy(max_new_tokens=shape.cells, steps=args.steps, entropy_bound=args.entropy_bound,
                         temperature=args.temperature, eos_token_ids=())
    return Job("sudoku", settings, [[tok.token_id("<bos>")]], [f"sample {i + 1} of {samples}" for i in range(samples)],
               args.seed, samples, lambda t: sudoku.format_grid(grid(t), shape),
               header=f"puzzle ({sum(1 for d in puzzle if d)} givens):\n{sudoku.format_grid(puzzle, shape)}\n\n",
               pins=sudoku.pins_of(puzzle, shape), allowed=sudoku.cells_allowed(shape),
               check=lambda t: sudoku.is_valid(grid(t), shape, puzzle),
               judge="by the Sudoku rules", picked="solution ({label}):\n{text}\nvalid ✓")


def print_prompt(job: Job, tok: Tokenizer) -> int:
    """--print-prompt: what the model gets, special tokens visible, and its length; no weights read.
    Pinned canvas positions follow, `_` for each free one."""
    if job.mode == "chat":
        raise UsageError("--print-prompt shows one prompt: give the prompt instead of --chat")
    for ids in job.ids:
        print(tok.decode_visible(ids))
    n = job.settings.max_new_tokens
    if job.pins:
        print("canvas: " + " ".join(tok.decode_visible([job.pins[i]]) if i in job.pins else "_" for i in range(n)))
    pinned = f", {n} canvas positions, {len(job.pins)} pinned" if job.pins else ""
    print(f"{sum(map(len, job.ids))} prompt tokens{pinned}", file=sys.stderr)
    return 0
