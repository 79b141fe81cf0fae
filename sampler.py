"""The entropy-bound sampler of DiffusionGemma and the block-diffusion loop around it.

Follows transformers 5.17.0 `models/diffusion_gemma/generation_diffusion_gemma.py`
(DiffusionGemmaGenerationMixin.generate, LinearTemperatureScheduleLogitsProcessor, EntropyBoundSampler,
StableAndConfidentStoppingCriteria); the acceptance rule is from "Accelerated Sampling from Masked
Diffusion Models via Entropy Bounded Unmasking" (arXiv 2505.24857). Like DeepMind's
gemma/diffusion/_sampler.py, the loop and the step live together.

Noise is uniform over the vocabulary: a canvas starts as random tokens and every token that is not
accepted is replaced by a fresh random token ("renoised"). There is no [MASK] token.

The loop (block_diffusion), per canvas:
  1. causal pass over the tokens not yet in the cache (the prompt, then the last committed canvas)
  2. canvas = uniformly random tokens (pinned positions: their fixed token)
  3. up to max_steps denoising steps, `step` counting DOWN from max_steps to 1 (denoise_canvas):
     logits = model(canvas, cache, previous logits for self-conditioning), then one sampler step
  4. commit the final ARGMAX canvas; after an EOS token everything becomes padding
Unlike transformers, max_new_tokens is exact: GenerationResult.tokens are trimmed.

One sampler step (sampler_step):
  1. T = t_min + (t_max - t_min) * step / max_steps         0.8 on the first step, 0.408 on the last
  2. logits = raw_logits / T;  sampled ~ softmax(logits);   argmax = argmax(logits)
  3. H_i = entropy of position i; sort ascending; accept the longest prefix of the sorted positions
     whose summed entropy, minus its largest member, is <= entropy_bound (always >= 1 token)
  4. next canvas = sampled at accepted positions, fresh random tokens everywhere else
  5. a row stops when its argmax did not change since the previous step (stable) and its mean
     entropy is < confidence_threshold (confident)
Positions may be restricted to sets of tokens (JSON values, Sudoku digits, closing tags; the sets
are built elsewhere, structured.Allowed): their other logits become -inf before step 1, so the
temperature, the entropy (and with it the bound), the sample and the argmax all see only the
allowed tokens. Without a restriction the step is bit for bit the same.

What the loop needs of a model (model.DiffusionGemma has it; a copy of this file with streams.py and
kvcache.py works with any model that does the same):
  model.config.canvas_length, .vocab_size, .layer_types, .sliding_window; model.device, model.dtype
  model.forward_causal(ids (B, S), cache, valid (B, S) | None, image_embeds | None)
      reads ids causally after what the cache holds, appends their K/V, advances cache.length
  model.forward_canvas(canvas (B, C), cache, sc_logits (B, C, V) | None) -> fp32 logits (B, C, V)
      reads the cache only; sc_logits: the previous step's temperature-scaled logits
  the cache: kvcache.KVCache(config.layer_types, config.sliding_window), or new_cache's

Random numbers (streams.RandomStreams) are drawn in this order, per canvas one randint (the initial
canvas), per step one multinomial then one randint (the renoise), from torch's default generator
shared by the batch (transformers' draws, token for token) or from a generator per row (a row's text
then depends on its prompt and seed alone, not on its batch).

    import torch; from sampler import DenoiseState, SamplerSettings, sampler_step; from streams import RandomStreams
    state = DenoiseState.start(1, 8, 50, RandomStreams([0], "cpu"), steps=48)
    state = sampler_step(state, torch.randn(1, 8, 50), SamplerSettings(), torch.float32)
"""

import math
import time
from dataclasses import dataclass, field, replace

import torch

from kvcache import KVCache
from streams import RandomStreams

RELEASED_GENERATION_EOS = (1, 106, 50)  # generation_config.json of the released model: <eos>, <turn|>, <|tool_response>


@dataclass
class SamplerSettings:
    """The entropy-bound sampler's settings (generation_config.json names in comments)."""
    max_steps: int = 48  # max_denoising_steps
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1  # steps the argmax must stay unchanged (0: no stability test)
    confidence_threshold: float | None = 0.005  # None: never stop early (fixed number of steps)


def temperature(step, s: SamplerSettings, device=None) -> torch.Tensor:
    """Linear schedule, computed in fp32 exactly as transformers does (step is an int32 tensor there).
    step: an int, or an int32 tensor already on the device (a fast path changes it there)."""
    step_t = step if isinstance(step, torch.Tensor) else torch.tensor(step, dtype=torch.int32, device=device)
    return s.t_min + (s.t_max - s.t_min) * (step_t / s.max_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, (B, C, V) -> (B, C), in fp32.

    Written out as torch.distributions.Categorical(logits=...).entropy() computes it, so both agree
    to the bit: log-probs by logsumexp, clamped at the most negative float, times the probabilities.
    """
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(logp, dim=-1)
    logp = torch.clamp(logp, min=torch.finfo(logp.dtype).min)
    return -(logp * p).sum(-1)


def entropy_bound_accept(token_entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Boolean (B, C): the lowest-entropy positions whose entropy sum minus their max is <= bound."""
    sorted_h, order = torch.sort(token_entropy, dim=-1)
    # sorted ascending, so the running max of the prefix is its last element
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep_sorted), -1, order, keep_sorted)


def restrict(raw: torch.Tensor, allowed: tuple) -> torch.Tensor:
    """raw (B, C, V) with -inf for every token a restricted position may not take, in place: one
    add of a set's row per restricted position, no (B, C, V) temporary. allowed: (bias (S, V), 0
    where a set allows a token and -inf elsewhere; [(flat positions (B*C) of a set, set index)])."""
    bias, groups = allowed
    flat = raw.view(-1, raw.shape[-1])
    for rows, k in groups:
        flat.index_add_(0, rows, bias[k].expand(len(rows), -1))
    return raw


@dataclass
class DenoiseState:
    """Everything that carries from one denoising step of a canvas to the next."""
    canvas: torch.Tensor  # (B, C) the noisy canvas fed to the model
    argmax: torch.Tensor  # (B, C) the latest argmax prediction: what gets committed
    sc_logits: torch.Tensor | None  # (B, C, V) previous temperature-scaled logits, in the weights' dtype
    finished: torch.Tensor  # (B,) rows whose denoising has stopped
    history: torch.Tensor | None  # (stability_threshold, B, C) previous argmaxes, -1 before the first
    step: int | torch.Tensor  # the step the next pass runs: max_steps down to 1
    rng: RandomStreams
    pinned: torch.Tensor | None = None  # (B, C) bool: positions fixed by the caller (infill, closing tags)
    pinned_tokens: torch.Tensor | None = None  # (B, C) their tokens
    allowed: tuple | None = None  # restrict's (bias, groups): the sets restricted positions may take
    index: int = 0  # which canvas of the generation this is
    accepted: torch.Tensor | None = None  # (B, C) positions accepted at the last step
    entropy: torch.Tensor | None = None  # (B, C) token entropies at the last step

    @classmethod
    def start(cls, batch: int, length: int, vocab_size: int, rng: RandomStreams, steps: int, *,
              pins: tuple | None = None, allowed: tuple | None = None, index: int = 0,
              done: torch.Tensor | None = None) -> "DenoiseState":
        """A fresh canvas of random tokens. pins: (pinned, tokens), both (B, C); allowed: restrict's
        pair. done (B,): rows whose sequence has ended; per-row streams leave them out (frozen,
        drawing nothing: that is how transformers' draws go when rows share one stream, and a row
        of its own must not draw for a sequence that has ended)."""
        device = rng.device
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        if done is not None and rng.per_row:
            finished = done.clone()
        canvas = rng.randint(vocab_size, batch, length, ~finished)
        pinned, tokens = pins if pins is not None else (None, None)
        if pinned is not None:
            canvas = torch.where(pinned, tokens, canvas)
        return cls(canvas=canvas, argmax=canvas, sc_logits=None, finished=finished, history=None, step=steps,
                   rng=rng, pinned=pinned, pinned_tokens=tokens, allowed=allowed, index=index)


class RequestError(ValueError):
    """What was asked cannot be generated as asked (an empty prompt, a pin beyond the canvas, too
    little context): the message says what to change."""


def check_positive(name: str, value, whole: bool = True) -> None:
    """RequestError unless value is a whole number (whole) or a number greater than 0: the check
    every entrance applies to a request's counts and sizes (GenerationSettings.copy, request.py)."""
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise RequestError(f"{name} must be {'a whole number' if whole else 'a number'} greater than 0, not {value!r}")


class NonFiniteLogits(RuntimeError):
    """The model produced NaN logits: generation stops rather than commit garbage."""

    def __init__(self, canvas: int, step: int | None):
        where = f"canvas {canvas + 1}" + (f", step {step}" if step is not None else "")
        super().__init__(f"the model produced non-finite logits at {where}")
        self.canvas, self.step = canvas, step


def logit_stats(raw: torch.Tensor, temp: torch.Tensor, state: DenoiseState) -> tuple:
    """Steps 1-2 and the renoise draw, on the plain path: raw (B, C, V) fp32 and the temperature ->
    (sampled, argmax, entropy, scaled logits, noise). Stops at NaN logits, before sampling from them.
    The seam of this file: a fused pass with this signature (cuda_kernels.fused_stats) replaces it."""
    B, C, V = raw.shape
    logits = raw / temp  # (B, C, V)
    token_entropy = entropy(logits)  # (B, C); NaN wherever the logits are
    if not bool(torch.isfinite(token_entropy).all()):
        raise NonFiniteLogits(state.index, int(state.step))
    drawing = ~state.finished
    sampled = state.rng.multinomial(torch.softmax(logits, dim=-1, dtype=torch.float32), drawing)
    noise = state.rng.randint(V, B, C, drawing)  # drawn after the samples: transformers' order
    return sampled, torch.argmax(logits, dim=-1), token_entropy, logits, noise


def stability(history: torch.Tensor | None, argmax: torch.Tensor, k: int) -> tuple:
    """Whether each row's argmax equals its previous k argmaxes, and the history with it appended."""
    B, C = argmax.shape
    if k == 0:
        return torch.ones(B, dtype=torch.bool, device=argmax.device), history
    if history is None:  # before the first step: -1, never equal
        history = torch.full((k, B, C), -1, dtype=argmax.dtype, device=argmax.device)
    stable = (history == argmax[None]).all(dim=-1).all(dim=0)
    return stable, torch.cat([history[1:], argmax[None]])


def sampler_step(state: DenoiseState, raw_logits: torch.Tensor, s: SamplerSettings, sc_dtype: torch.dtype,
                 stats=logit_stats) -> DenoiseState:
    """Turn one denoising pass's raw logits (B, C, V) fp32 into the next state. Pinned positions
    count as certain (entropy 0, always accepted) and keep their token; finished rows keep their
    canvas and argmax (their self-conditioning logits are not kept: nothing reads them)."""
    temp = temperature(state.step, s, raw_logits.device)
    if state.allowed is not None:
        raw_logits = restrict(raw_logits, state.allowed)
    sampled, argmax, token_entropy, logits, noise = stats(raw_logits, temp, state)  # 1-2
    if state.pinned is not None:
        token_entropy = token_entropy.masked_fill(state.pinned, 0.0)
    accepted = entropy_bound_accept(token_entropy, s.entropy_bound)  # 3
    canvas = torch.where(accepted, sampled, noise)  # 4: renoise everything not accepted
    if state.pinned is not None:
        canvas = torch.where(state.pinned, state.pinned_tokens, canvas)
        argmax = torch.where(state.pinned, state.pinned_tokens, argmax)
    finished, history = state.finished, state.history
    if s.confidence_threshold is not None:  # 5
        argmax = torch.where(finished[:, None], state.argmax, argmax)
        canvas = torch.where(finished[:, None], state.canvas, canvas)
        stable, history = stability(history, argmax, s.stability_threshold)
        finished = finished | (stable & (token_entropy.mean(dim=-1) < s.confidence_threshold))
    return replace(state, canvas=canvas, argmax=argmax, sc_logits=logits.to(sc_dtype), finished=finished,
                   history=history, step=state.step - 1, accepted=accepted, entropy=token_entropy)


# ---------------------------------------------------------------------------------------------
# The block-diffusion loop
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    """Everything generation_config.json holds: the sampler's settings plus length and stop ids."""
    max_new_tokens: int = 256
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    eos_token_ids: tuple = RELEASED_GENERATION_EOS
    pad_token_id: int = 0

    def copy(self, *, max_new_tokens: int | None = None, steps: int | None = None, entropy_bound: float | None = None,
             temperature: float | None = None, eos_token_ids=None) -> "GenerationSettings":
        """A copy with these replaced where given; temperature scales the schedule (t_min and t_max
        times it: 1 keeps the checkpoint's). Every entrance (the command line, the Python API, the
        server) sets a request's numbers here: RequestError for one no generation can use."""
        for name, value, whole in (("max_new_tokens", max_new_tokens, True), ("steps", steps, True),
                                   ("entropy_bound", entropy_bound, False), ("temperature", temperature, False)):
            if value is not None:
                check_positive(name, value, whole)
        new = GenerationSettings(self.max_new_tokens, replace(self.sampler), self.eos_token_ids, self.pad_token_id)
        if max_new_tokens is not None:
            new.max_new_tokens = max_new_tokens
        if steps is not None:
            new.sampler.max_steps = steps
        if entropy_bound is not None:
            new.sampler.entropy_bound = float(entropy_bound)
        if temperature is not None and temperature != 1:
            new.sampler.t_min, new.sampler.t_max = self.sampler.t_min * temperature, self.sampler.t_max * temperature
        if eos_token_ids is not None:
            new.eos_token_ids = tuple(eos_token_ids)
        return new

    def canvases(self, canvas_length: int) -> int:
        """How many canvases max_new_tokens needs."""
        return math.ceil(self.max_new_tokens / canvas_length)

    def positions(self, n_prompt: int, canvas_length: int) -> int:
        """Positions a prompt of n_prompt tokens and its whole canvases take."""
        return n_prompt + self.canvases(canvas_length) * canvas_length


@dataclass
class GenerationResult:
    """What block_diffusion returns."""
    sequences: torch.Tensor  # (B, P + n_canvas * C): prompts (left padded) + whole canvases, as transformers
    tokens: list  # per row: the new tokens, cut after EOS and at max_new_tokens
    prompt_length: int = 0  # P: the left-padded prompts' width
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


def denoise_canvas(model, cache: KVCache, state: DenoiseState, s: SamplerSettings, on_step=None,
                   stats=logit_stats) -> tuple[DenoiseState, int]:
    """Refine one canvas: up to s.max_steps denoising steps (step counts down), stopping early once
    every row is stable and confident. Returns the final state and the number of steps run.
    stats: the plain sampler pass or a fused one (sampler_step). A fast path with this signature may
    take its place (block_diffusion's denoise)."""
    steps = 0
    while state.step > 0:
        raw = model.forward_canvas(state.canvas, cache, state.sc_logits)  # (B, C, V) fp32
        state = sampler_step(state, raw, s, model.dtype, stats)
        steps += 1
        if on_step is not None:
            on_step(state.step + 1, state)
        if bool(state.finished.all()):  # the stop rule
            break
    return state, steps


def in_canvas(rows: list[dict], ci: int, B: int, C: int):
    """(row, position in canvas ci, value) of per-row {offset from the first new token: value}
    (one map: every row's), for the offsets that fall in canvas ci."""
    for b, row in enumerate(rows * B if len(rows) == 1 else rows):
        for offset, v in (row or {}).items():
            if ci * C <= offset < (ci + 1) * C:
                yield b, offset - ci * C, v


def canvas_pins(pins, ci: int, B: int, C: int, device) -> tuple | None:
    """The (pinned, tokens) pair, both (B, C), of canvas ci from per-row {offset: token}, or None."""
    if not pins or not any(pins):
        return None
    mask = torch.zeros(B, C, dtype=torch.bool, device=device)
    tokens = torch.zeros(B, C, dtype=torch.long, device=device)
    for b, j, tok in in_canvas(pins, ci, B, C):
        mask[b, j], tokens[b, j] = True, tok
    return (mask, tokens) if mask.any() else None


def check_context(config, n_prompt: int, max_new_tokens: int, name: str = "prompt") -> None:
    """RequestError unless the prompt and its whole canvases fit in the model's positions."""
    limit = config.max_position_embeddings
    need = GenerationSettings(max_new_tokens=max_new_tokens).positions(n_prompt, config.canvas_length)
    if need > limit:
        raise RequestError(f"the {name} has {n_prompt} token{'s' * (n_prompt != 1)}; with {max_new_tokens} new "
                           f"tokens that needs {need} positions but the model has {limit}: shorten it or ask for "
                           "fewer new tokens")


def trim(tokens: list[int], settings: GenerationSettings) -> list[int]:
    """New tokens up to (not including) the first EOS, at most max_new_tokens."""
    out = []
    for t in tokens[: settings.max_new_tokens]:
        if t in settings.eos_token_ids:
            break
        out.append(t)
    return out


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, P) ids and the (B, P) valid mask of a left-padded batch (None when nothing is padded)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    seq = torch.full((B, P), pad, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seq[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid[b, P - len(p):] = True
    return seq, (None if bool(valid.all()) else valid)


@torch.no_grad()
def block_diffusion(model, prompts: list[list[int]], settings: GenerationSettings, *, pins=None, allowed=None,
                    seeds=None, images=None, on_step=None, on_canvas=None, denoise=denoise_canvas,
                    new_cache=None, cache: KVCache | None = None) -> GenerationResult:
    """Generate continuations of token-id prompts (a batch, left padded).

    pins: per row {offset from the first new token: token id}; those positions of the canvases are
    fixed (infill, templates, closing tags) and never renoised. allowed: the token sets positions
    may take, anything with for_canvas(canvas index, B, C, V, device) -> restrict's pair or None
    (structured.Allowed).
    seeds: per row, the seed of its own random stream, or the RandomStreams themselves; None: torch's
    default generator, shared by the batch, as transformers draws.
    images: per row, the embeddings (n, D) that take the place of the row's n image tokens in the
    causal pass (forward_causal's image_embeds), or None for a row without images.
    on_step(canvas_index, step, state) after every denoising step; on_canvas(canvas_index, new, finished)
    after every commit, new (B, tokens so far) the committed tokens after the prompts.
    denoise: denoise_canvas, or a faster function with its signature;
    new_cache(model, batch, capacity): the KV cache of a generation, a fast path's fixed buffers (None:
    the plain KVCache, which grows as it is written).
    cache: a KVCache that already holds what came before the prompts (a chat's earlier turns; the
    prompts are then the tokens it lacks); left holding everything committed.
    """
    c = model.config
    C, V = c.canvas_length, c.vocab_size
    device = model.device
    seq, valid = left_pad(prompts, settings.pad_token_id, device)
    B, P = seq.shape
    max_length = P + settings.max_new_tokens
    eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
    if cache is None:
        cache = KVCache(c.layer_types, c.sliding_window) if new_cache is None else \
            new_cache(model, B, settings.positions(P, C))
    rng = seeds if isinstance(seeds, RandomStreams) else RandomStreams(seeds, device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    result = GenerationResult(sequences=seq, tokens=[], prompt_length=P)
    t0 = time.perf_counter()

    pending, pending_valid = seq, valid
    image_embeds = None if images is None or all(x is None for x in images) else \
        torch.cat([x for x in images if x is not None]).to(device)  # (N, D), row by row
    for ci in range(settings.canvases(C)):
        model.forward_causal(pending, cache, pending_valid, image_embeds if ci == 0 else None)  # 1. read what is new
        state = DenoiseState.start(B, C, V, rng, settings.sampler.max_steps, pins=canvas_pins(pins, ci, B, C, device),
                                   allowed=None if allowed is None else allowed.for_canvas(ci, B, C, V, device),
                                   index=ci, done=finished)  # 2. a random canvas
        step_hook = None if on_step is None else (lambda step, st, ci=ci: on_step(ci, step, st))
        state, steps = denoise(model, cache, state, settings.sampler, step_hook)  # 3.
        seq = torch.cat([seq, state.argmax], dim=1)  # 4. commit the argmax
        finished = finalize_canvas(seq, finished, C, eos, settings.pad_token_id, max_length)
        result.steps.append(steps)
        result.canvases += 1
        if on_canvas is not None:
            on_canvas(ci, seq[:, P:], finished)
        if bool(finished.all()):
            break
        pending, pending_valid = seq[:, -C:], None

    result.sequences = seq
    result.seconds = time.perf_counter() - t0
    result.tokens = [trim(seq[b, P:].tolist(), settings) for b in range(B)]
    return result


def run_batches(model, prompts: list[list[int]], settings: GenerationSettings, batch_size: int, *,
                pins=None, seeds=None, images=None, on_batch=None, on_canvas=None, **kw) -> list[GenerationResult]:
    """block_diffusion over successive batches of batch_size prompts, results in input order, so
    that memory stays bounded however many prompts there are. pins, seeds and images: per prompt.
    on_batch(start, result) after each batch, on_canvas(start, canvas_index, new, finished) after
    each commit; kw: block_diffusion's other options."""
    results = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        hook = None if on_canvas is None else (lambda ci, new, fin, start=start: on_canvas(start, ci, new, fin))
        result = block_diffusion(model, prompts[start: stop], settings, on_canvas=hook,
                                 pins=None if pins is None else pins[start: stop],
                                 images=None if images is None else images[start: stop],
                                 seeds=None if seeds is None else seeds[start: stop], **kw)
        results.append(result)
        if on_batch is not None:
            on_batch(start, result)
    return results
