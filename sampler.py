"""The entropy-bound sampler of DiffusionGemma: temperature schedule, acceptance, renoising, stopping.

Follows transformers 5.17.0 `generation_diffusion_gemma.py` (LinearTemperatureScheduleLogitsProcessor,
EntropyBoundSampler, StableAndConfidentStoppingCriteria); the acceptance rule is from
"Accelerated Sampling from Masked Diffusion Models via Entropy Bounded Unmasking" (arXiv 2505.24857).

Noise is uniform over the vocabulary: a canvas starts as random tokens and every token that is not
accepted is replaced by a fresh random token ("renoised"). There is no [MASK] token.

One denoising step, with `step` counting DOWN from max_steps to 1:
  1. T = t_min + (t_max - t_min) * step / max_steps         0.8 on the first step, 0.408 on the last
  2. logits = raw_logits / T;  sampled ~ softmax(logits);   argmax = argmax(logits)
  3. H_i = entropy of position i; sort ascending; accept the longest prefix of the sorted positions
     whose summed entropy, minus its largest member, is <= entropy_bound (always >= 1 token)
  4. next canvas = sampled at accepted positions, fresh random tokens everywhere else
  5. a row stops when its argmax did not change since the previous step (stable) and its mean
     entropy is < confidence_threshold (confident)
The canvas finally committed is the last ARGMAX, not the sampled canvas.

Random numbers are drawn in this order (so that a seed reproduces transformers token for token):
per canvas one randint (the initial canvas); per step one multinomial, then one randint (renoise).

    s = DenoiseState.start(batch, canvas_length, vocab, device)
    s = sampler_step(s, raw_logits, step, SamplerSettings())
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplerSettings:
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
                 pinned_tokens: torch.Tensor | None = None, sync_free: bool = False) -> DenoiseState:
    """Turn one denoising pass's raw logits (B, C, V) fp32 into the next state.

    pinned (B, C) bool with pinned_tokens (B, C): positions fixed by the caller (infill, closing
    tags). They are never renoised and their argmax is the pinned token.
    sync_free: never wait for the GPU (for CUDA graphs): finished rows keep their canvas and argmax
    without a data-dependent branch, and their self-conditioning logits are not kept (they feed
    nothing that a finished row still uses).
    """
    B, C, V = raw_logits.shape
    logits = raw_logits / temperature(step, s, raw_logits.device)  # (B, C, V)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)
    del probs
    new_argmax = torch.argmax(logits, dim=-1)  # (B, C)

    h = entropy(logits)  # (B, C)
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
        if sync_free:
            new_argmax = torch.where(finished[:, None], state.argmax, new_argmax)
            next_canvas = torch.where(finished[:, None], state.canvas, next_canvas)
        elif finished.any():  # finished rows keep what they had
            new_argmax = torch.where(finished[:, None], state.argmax, new_argmax)
            next_canvas = torch.where(finished[:, None], state.canvas, next_canvas)
            # (their entropy no longer matters: a finished row stays finished)
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
