"""Canvas editing: fixing positions of the canvas (pins) so the model fills only the rest.

A pinned position starts as its token, counts as certain (entropy 0: always accepted, never
renoised) and is committed as is (sampler.py). On top of that:
  infill    `left<FILL>right`: the left side is the prompt, the canvas holds fill_length free
            tokens followed by the right side, pinned, so the model fills the gap knowing what follows
  template  text with holes (`_`): each hole is one free position, the text between holes is pinned
            (a JSON skeleton, code with gaps, a Sudoku grid)
  pin       OFFSET:TEXT fixes the tokens of TEXT from new-token OFFSET on (closing brackets and tags)
  samples   best-of-N: N fillings of the same canvas in one batch, each from its own random stream,
            and a check that accepts them
  typed     a JSON Schema's canvas (structured.build: the skeleton pinned, each value's positions
            restricted to the tokens its place allows, decision positions where the model chooses)
            denoised; the value read back valid for what the layout holds and judged whole (the
            jsonschema package); a sample the judge rejects is drawn again; the first of the
            samples that validates (fill_json)
A request that cannot be met as asked raises sampler.RequestError, whose message says what to change.

    from generate import load; from editing import parse_template, fill
    model, tok = load("weights-code")
    canvas = parse_template(tok, "def add(a, b):\\n    return ____\\n")
    tokens, accepted, _ = fill(model, [model.config.bos_token_id], canvas, model.generation_settings, samples=2, seed=0)
    print(tok.decode(tokens[0]))
"""

import json
import subprocess
from dataclasses import dataclass, field

from sampler import GenerationSettings, RequestError, block_diffusion, check_context
from schema import errors, judge
from structured import Allowed, Layout, SchemaError, build, check_schema, token_sets
from tokenizer import Tokenizer

FILL = "<FILL>"


@dataclass
class Canvas:
    """What the canvases must hold: `length` new tokens, some of them pinned ({offset: token})."""
    length: int
    pins: dict[int, int] = field(default_factory=dict)

    def pin(self, more: dict[int, int]) -> None:
        """Add pins; RequestError for a pin beyond the canvas."""
        pins = {**self.pins, **more}
        if pins and max(pins) >= self.length:
            raise RequestError(f"a pinned position ({max(pins)}) is beyond the {self.length} new tokens")
        self.pins = pins


def parse_template(tokenizer: Tokenizer, text: str, hole: str = "_") -> Canvas:
    """Each `hole` character is one free position; the text between holes is pinned, token by token."""
    if not hole or hole not in text:
        raise RequestError(f"the template has no hole {hole!r}: mark each free position with it")
    pins, offset = {}, 0
    pieces = text.split(hole)
    for i, piece in enumerate(pieces):
        for t in tokenizer.encode(piece) if piece else []:
            pins[offset] = t
            offset += 1
        offset += i < len(pieces) - 1  # the hole after this piece
    return Canvas(length=offset, pins=pins)


def parse_infill(tokenizer: Tokenizer, text: str, fill_length: int) -> tuple[list[int], Canvas]:
    """`left<FILL>right`: the prompt ids (left) and a canvas of fill_length free tokens, then right."""
    if text.count(FILL) != 1:
        raise RequestError(f"the infill text must contain {FILL} exactly once (it has {text.count(FILL)})")
    left, right = text.split(FILL)
    ids = tokenizer.encode_raw(left)
    if not ids or ids == tokenizer.encode_raw(""):  # a gap at the top of a text: after <bos> alone
        ids = [tokenizer.token_id(tokenizer.bos_token)]
        if ids[0] is None:
            raise RequestError(f"the infill text needs some text before {FILL} (this tokenizer has no "
                               f"{tokenizer.bos_token} to start from)")
    right_ids = tokenizer.encode(right) if right else []
    return ids, Canvas(fill_length + len(right_ids), {fill_length + i: t for i, t in enumerate(right_ids)})


def parse_pin(tokenizer: Tokenizer, spec: str) -> dict[int, int]:
    """OFFSET:TEXT: the tokens of TEXT fixed from new-token OFFSET on."""
    offset, sep, text = spec.partition(":")
    if not sep or not text or not offset.strip().lstrip("-").isdigit():
        raise RequestError(f"pin {spec!r}: expected OFFSET:TEXT, e.g. 40:'}}'")
    if int(offset) < 0:
        raise RequestError(f"pin {spec!r}: the offset counts new tokens from 0, it cannot be negative")
    return {int(offset) + i: t for i, t in enumerate(tokenizer.encode(text))}


def fill(model, prompt_ids: list[int], canvas: Canvas, settings: GenerationSettings, samples: int = 1,
         accept=None, *, seed: int | None = None, **kw) -> tuple[list[list[int]], list[bool], object]:
    """`samples` fillings of a canvas after prompt_ids, generated as one batch: each sample's new
    tokens, which of them accept(tokens) -> bool takes (all of them without accept), and the
    sampler.GenerationResult. seed: sample i draws from its own stream seeded seed + i (None: the
    shared stream). kw: block_diffusion's on_step, on_canvas, denoise, new_cache."""
    canvas.pin({})  # a pin beyond the canvas is a mistake
    settings = settings.copy(max_new_tokens=canvas.length, eos_token_ids=())  # a fixed length: no early end
    seeds = None if seed is None else [seed + i for i in range(samples)]
    result = block_diffusion(model, [prompt_ids] * samples, settings, pins=[canvas.pins] * samples, seeds=seeds, **kw)
    tokens = [row[len(prompt_ids):].tolist()[: canvas.length] for row in result.sequences]
    return tokens, [True if accept is None else bool(accept(t)) for t in tokens], result


def shell_accept(command: str):
    """accept(text) for --accept: the shell command gets the text on stdin; exit 0 accepts it. A
    command the shell cannot run (exit 126 or 127: not found, not executable) is a RequestError,
    not a rejected sample."""
    def accept(text: str) -> bool:
        done = subprocess.run(command, shell=True, input=text, text=True, capture_output=True)
        if done.returncode in (126, 127):
            why = (done.stderr.strip().splitlines() or ["not found"])[-1]
            raise RequestError(f"--accept {command!r} could not be run (exit {done.returncode}: {why}): check the command")
        return done.returncode == 0
    return accept


# --- Typed canvases: a JSON Schema's layout (structured.py) filled, read back, judged -------------

@dataclass
class Filled:
    """One sample: its value and text (json.dumps of the value), the tokens of that text, what the
    judge found wrong (None: valid), the rounds it took, the paths read back into their schema
    (snaps), the denoising steps of its canvases."""
    tokens: list[int]
    text: str
    value: object
    error: str | None
    rounds: int
    snapped: list[str]
    steps: list[int] = field(default_factory=list)


def canvas_rows(layouts: list[Layout], space: int) -> tuple[int, list[dict], Allowed]:
    """The length of the canvas, the skeleton pins and the Allowed of each row (a layout a row,
    padded with pinned spaces after its value to the longest)."""
    length = max(len(lay.tokens) for lay in layouts)
    table, pins, rows, where = [], [], [], {}
    for lay in layouts:
        padded = lay.tokens + [space] * (length - len(lay.tokens))
        pins.append({j: t for j, t in enumerate(padded) if t is not None})
        index = {}
        for k, s in enumerate(lay.sets):
            if id(s) not in where:  # the same list object: the same set (layouts share them)
                where[id(s)] = len(table)
                table.append(s)
            index[k] = where[id(s)]
        rows.append({j: index[k] for j, k in lay.free.items()})
    return length, pins, Allowed(table, rows)


def fill_typed(model, tok, prompt: list[int], layouts: list[Layout], settings: GenerationSettings,
               seeds: list[int], *, rounds: int = 3, **kw) -> list[Filled]:
    """A sample per layout (row b: layouts[b], seed seeds[b]): denoise with the skeleton pinned and
    every free position restricted to its set; read each value back (structured: valid by
    construction for what the layout holds) and judge it whole (the jsonschema package); a sample the
    judge rejects is drawn again with another seed, up to `rounds` times. kw: block_diffusion's."""
    sets = token_sets(tok, model.config.vocab_size)
    length, skeleton, allowed = canvas_rows(layouts, sets.space)
    settings = settings.copy(max_new_tokens=length, eos_token_ids=())  # a fixed length: no early end
    done: list[Filled | None] = [None] * len(layouts)
    todo, steps = list(range(len(layouts))), [[] for _ in layouts]
    validators = {}
    for r in range(rounds + 1):
        result = block_diffusion(model, [prompt] * len(todo), settings, pins=[skeleton[b] for b in todo],
                                 allowed=Allowed(allowed.sets, [allowed.rows[b] for b in todo]),
                                 seeds=[(seeds[b] + 7919 * r) % 2 ** 63 for b in todo], **kw)
        for i, b in enumerate(todo):
            steps[b] += result.steps
            canvas = result.sequences[i, result.prompt_length:].tolist()[:length]
            lay = layouts[b]
            try:
                value, snaps = lay.read(canvas)
            except SchemaError as e:
                done[b] = Filled([], "", None, str(e), r, [])
                continue
            key = id(lay.schema)
            validators.setdefault(key, judge(lay.schema))
            found = errors(validators[key], value)
            text = json.dumps(value, ensure_ascii=False)
            done[b] = Filled(tok.encode(text), text, value, found[0] if found else None, r, snaps, steps[b])
        todo = [b for b in todo if done[b].error is not None]
        if not todo:
            break
    return done


def fill_json(model, tok, prompt: list[int], schema: dict, settings: GenerationSettings | None = None, *,
              seed: int = 0, samples: int = 1, rounds: int = 3, budget=None, **kw) -> Filled:
    """A JSON value that satisfies the schema, written after the prompt's token ids: `samples`
    samples as one batch (sample i: seed + i), each drawn again up to `rounds` times while the judge
    rejects it; the first that validates. SchemaError for a schema this cannot fill, naming the path.
    budget: structured.Budget, the canvas a value may take where the schema sets no bound."""
    check_schema(schema)
    sets = token_sets(tok, model.config.vocab_size)
    room = model.config.max_position_embeddings - len(prompt) - model.config.canvas_length
    layout = build(schema, tok, sets, budget, max_positions=max(room, 1))
    check_context(model.config, len(prompt), len(layout.tokens), "prompt")
    settings = settings or getattr(model, "generation_settings", None) or GenerationSettings()
    filled = fill_typed(model, tok, prompt, [layout] * samples, settings, [seed + i for i in range(samples)],
                        rounds=rounds, **kw)
    for f in filled:
        if f.error is None:
            return f
    raise SchemaError(f"{filled[0].error}, in {samples} sample{'s' * (samples > 1)} with {rounds} more "
                      f"draw{'s' * (rounds != 1)} each: loosen that part of the schema or ask for more samples")
