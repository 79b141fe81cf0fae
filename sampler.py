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

Random numbers are drawn in this order (so that a seed reproduces transformers token for token):
per canvas one randint (the initial canvas); per step one multinomial, then one randint (renoise).

    import torch; from sampler import DenoiseState, SamplerSettings, sampler_step
    state = DenoiseState.start(batch=1, length=8, vocab_size=50, device="cpu")
    state = sampler_step(state, torch.randn(1, 8, 50), 48, SamplerSettings(), torch.float32)
"""

import math
import time
from dataclasses import dataclass, field

import torch

from kvcache import KVCache

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
    step: an int, or an int32 tensor already on the device (a CUDA graph changes it between replays)."""
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


def random_canvas(batch: int, length: int, vocab_size: int, device) -> torch.Tensor:
    """Uniformly random tokens: a new canvas, or the renoise draw."""
    return torch.randint(0, vocab_size, (batch, length), device=device)


@dataclass
class DenoiseState:
    """Everything that carries from one denoising step of a canvas to the next."""
    canvas: torch.Tensor  # (B, C) the noisy canvas fed to the model
    argmax: torch.Tensor  # (B, C) the latest argmax prediction: what gets committed
    sc_logits: torch.Tensor | None  # (B, C, V) previous temperature-scaled logits, in the weights' dtype
    finished: torch.Tensor  # (B,) rows whose denoising has stopped
    history: torch.Tensor | None  # (stability_threshold, B, C) previous argmaxes, -1 before the first
    accepted: torch.Tensor | None = None  # (B, C) positions accepted at the last step
    entropy: torch.Tensor | None = None  # (B, C) token entropies at the last step

    @classmethod
    def start(cls, batch: int, length: int, vocab_size: int, device, pinned: torch.Tensor | None = None,
              pinned_tokens: torch.Tensor | None = None) -> "DenoiseState":
        canvas = random_canvas(batch, length, vocab_size, device)
        if pinned is not None:
            canvas = torch.where(pinned, pinned_tokens, canvas)
        return cls(canvas=canvas, argmax=canvas, sc_logits=None,
                   finished=torch.zeros(batch, dtype=torch.bool, device=device), history=None)


def sampler_step(state: DenoiseState, raw_logits: torch.Tensor, step: int, s: SamplerSettings,
                 sc_dtype: torch.dtype, pinned: torch.Tensor | None = None,
                 pinned_tokens: torch.Tensor | None = None, sync_free: bool = False, stats=None) -> DenoiseState:
    """Turn one denoising pass's raw logits (B, C, V) fp32 into the next state.

    pinned (B, C) bool with pinned_tokens (B, C): positions fixed by the caller (infill, closing
    tags). They are never renoised and their argmax is the pinned token.
    sync_free: never wait for the GPU (for CUDA graphs): finished rows keep their canvas and argmax
    without a data-dependent branch, and their self-conditioning logits are not kept (they feed
    nothing that a finished row still uses).
    stats(raw_logits, T) -> (sampled, argmax, entropy, scaled logits in sc_dtype): a fused pass over
    the logits (cuda_kernels.sampler_stats) for steps 1-2; it samples from another random stream.
    """
    B, C, V = raw_logits.shape
    T = temperature(step, s, raw_logits.device)
    if stats is not None:
        sampled, new_argmax, h, logits = stats(raw_logits, T)
        if not sync_free and not bool(torch.isfinite(h).all()):
            raise NonFiniteLogits(-1, step)
    else:
        logits = raw_logits / T  # (B, C, V)
        h = entropy(logits)  # (B, C); NaN wherever the logits are
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if not sync_free and not bool(torch.isfinite(h).all()):
            raise NonFiniteLogits(-1, step)  # before sampling from garbage (the caller knows the canvas)
        if sync_free:  # keep multinomial's input valid; the caller checks the entropies once per canvas
            probs = torch.nan_to_num(probs, nan=1.0)
        sampled = torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)
        del probs
        new_argmax = torch.argmax(logits, dim=-1)  # (B, C)

    if pinned is not None:
        h = h.masked_fill(pinned, 0.0)  # a pinned token is certain: always accepted, costs nothing
    accepted = entropy_bound_accept(h, s.entropy_bound)
    next_canvas = torch.where(accepted, sampled, state.canvas)
    noise = random_canvas(B, C, V, raw_logits.device)
    next_canvas = torch.where(~accepted, noise, next_canvas)  # renoise everything not accepted
    if pinned is not None:
        next_canvas = torch.where(pinned, pinned_tokens, next_canvas)
        new_argmax = torch.where(pinned, pinned_tokens, new_argmax)

    finished, history = state.finished, state.history
    if s.confidence_threshold is not None:
        # finished rows keep what they had; sync_free (CUDA graphs) skips the check for any, and then
        # does not keep their self-conditioning logits (nothing a finished row uses reads them)
        if sync_free or finished.any():
            new_argmax = torch.where(finished[:, None], state.argmax, new_argmax)
            next_canvas = torch.where(finished[:, None], state.canvas, next_canvas)
        if not sync_free and finished.any():
            logits = torch.where(finished[:, None, None], state.sc_logits, logits)
        if s.stability_threshold == 0:
            stable = torch.ones(B, dtype=torch.bool, device=logits.device)
        else:
            if history is None:
                history = torch.full((s.stability_threshold, B, C), -1, dtype=new_argmax.dtype,
                                     device=new_argmax.device)
            stable = (history == new_argmax[None]).all(dim=-1).all(dim=0)
            history = torch.roll(history, shifts=-1, dims=0)
            history[-1] = new_argmax
        confident = h.mean(dim=-1) < s.confidence_threshold
        finished = finished | (stable & confident)

    return DenoiseState(canvas=next_canvas, argmax=new_argmax, sc_logits=logits.to(sc_dtype),
                        finished=finished, history=history, accepted=accepted, entropy=h)


class NonFiniteLogits(RuntimeError):
    """The model produced NaN logits: generation stops rather than commit garbage."""

    def __init__(self, canvas: int, step: int | None):
        where = f"canvas {canvas + 1}" + (f", step {step}" if step is not None else "")
        super().__init__(f"the model produced non-finite logits at {where}")
        self.canvas, self.step = canvas, step


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

    def copy(self, **overrides) -> "GenerationSettings":
        """A copy with max_new_tokens / steps / entropy_bound / eos_token_ids replaced where given."""
        new = GenerationSettings(self.max_new_tokens, SamplerSettings(**vars(self.sampler)), self.eos_token_ids,
                                 self.pad_token_id)
        if overrides.get("max_new_tokens") is not None:
            new.max_new_tokens = overrides["max_new_tokens"]
        if overrides.get("steps") is not None:
            new.sampler.max_steps = overrides["steps"]
        if overrides.get("entropy_bound") is not None:
            new.sampler.entropy_bound = overrides["entropy_bound"]
        if overrides.get("eos_token_ids") is not None:
            new.eos_token_ids = tuple(overrides["eos_token_ids"])
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


def denoise_canvas(model, cache: KVCache, state: DenoiseState, s: SamplerSettings,
                   pinned=None, pinned_tokens=None, on_step=None, stats=None) -> tuple[DenoiseState, int]:
    """Refine one canvas: up to s.max_steps denoising steps (step counts down), stopping early once
    every row is stable and confident. Returns the final state and the number of steps run.
    Raises NonFiniteLogits (canvas index -1: block_diffusion knows it) on NaN logits.
    stats: a fused sampler pass (sampler_step). (cudagraph.GraphedDenoiser is the same function with
    the step captured in a CUDA graph.)"""
    steps = 0
    valids = model.canvas_valids(cache)  # fixed for the whole canvas
    for step in range(s.max_steps, 0, -1):
        raw = model.forward_canvas(state.canvas, cache, state.sc_logits, valids)  # (B, C, V) fp32
        state = sampler_step(state, raw, step, s, model.dtype, pinned, pinned_tokens, stats=stats)
        steps += 1
        if on_step is not None:
            on_step(step, state)
        if bool(state.finished.all()):  # the stop rule (sampler_step has caught NaN logits)
            break
    return state, steps


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
def block_diffusion(model, prompts: list[list[int]], settings: GenerationSettings,
                    pins: list[dict[int, int]] | None = None, on_step=None, on_canvas=None,
                    denoise=denoise_canvas, cache: KVCache | None = None) -> GenerationResult:
    """Generate continuations of token-id prompts (a batch, left padded).

    pins: per row {offset from the first new token: token id}; those positions of the canvases are
    fixed (infill, templates, closing tags) and never renoised.
    on_step(canvas_index, step, state) after every denoising step; on_canvas(canvas_index, seq, finished)
    after every commit. denoise: denoise_canvas, or a faster function with its signature.
    cache: a KVCache that already holds what came before the prompts (a chat's earlier turns; the
    prompts are then the tokens it lacks); left holding everything committed. Default: a new one.
    """
    c = model.config
    C, V = c.canvas_length, c.vocab_size
    device = model.device
    seq, valid = left_pad(prompts, settings.pad_token_id, device)
    B, P = seq.shape
    max_length = P + settings.max_new_tokens
    eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
    if cache is None:  # a denoiser may bring its own kind (cudagraph.GraphedDenoiser: fixed buffers)
        make = getattr(denoise, "new_cache", None)
        cache = make(model, B, settings.positions(P, C)) if make else KVCache(c.layer_types, c.sliding_window)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    result = GenerationResult(sequences=seq, tokens=[])
    t0 = time.perf_counter()

    pending, pending_valid = seq, valid
    for ci in range(settings.canvases(C)):
        model.forward_causal(pending, cache, pending_valid)  # 1. read what the cache lacks
        pinned, pinned_tokens = canvas_pins(pins, ci, B, C, device)
        state = DenoiseState.start(B, C, V, device, pinned, pinned_tokens)  # 2. random canvas
        step_hook = None if on_step is None else (lambda step, st, ci=ci: on_step(ci, step, st))
        try:
            state, steps = denoise(model, cache, state, settings.sampler, pinned, pinned_tokens, step_hook)  # 3.
        except NonFiniteLogits as e:
            raise NonFiniteLogits(ci, e.step) from None
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


def run_batches(model, prompts: list[list[int]], settings: GenerationSettings, batch_size: int,
                pins=None, on_batch=None, on_canvas=None, **kw) -> list[GenerationResult]:
    """block_diffusion over successive batches of batch_size prompts, results in input order, so
    that memory stays bounded however many prompts there are. on_batch(start, result) after each
    batch, on_canvas(start, canvas_index, seq, finished) after each commit."""
    results = []
    for start in range(0, len(prompts), batch_size):
        hook = None if on_canvas is None else (lambda ci, seq, fin, start=start: on_canvas(start, ci, seq, fin))
        result = block_diffusion(model, prompts[start: start + batch_size], settings, on_canvas=hook,
                                 pins=None if pins is None else pins[start: start + batch_size], **kw)
        results.append(result)
        if on_batch is not None:
            on_batch(start, result)
    return results
