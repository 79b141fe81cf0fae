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
A request that cannot be met as asked raises sampler.RequestError, whose message says what to change.

    from generate import load; from editing import parse_template, fill
    model, tok = load("weights-code")
    canvas = parse_template(tok, "def add(a, b):\\n    return ____\\n")
    tokens, accepted, _ = fill(model, [model.config.bos_token_id], canvas, model.generation_settings, samples=2, seed=0)
    print(tok.decode(tokens[0]))
"""

import subprocess
from dataclasses import dataclass, field

from sampler import GenerationSettings, RequestError, block_diffusion
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
    if not left.strip():
        raise RequestError(f"the infill text needs some text before {FILL}: it is the prompt")
    right_ids = tokenizer.encode(right) if right else []
    return tokenizer.encode_raw(left), Canvas(fill_length + len(right_ids),
                                              {fill_length + i: t for i, t in enumerate(right_ids)})


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
    """accept(text) for --accept: the shell command gets the text on stdin; exit 0 accepts it."""
    def accept(text: str) -> bool:
        return subprocess.run(command, shell=True, input=text, text=True, capture_output=True).returncode == 0
    return accept
