"""The denoising step captured in a CUDA graph: generate.denoise_canvas without launch overhead.

A denoising step launches some thousand small kernels (30 layers of norms, projections, routing,
experts, attention, then the sampler's passes over the logits). Replaying them as one CUDA graph
removes the per-launch cost on the host. Within one canvas everything the step reads has a fixed
address: the KV cache (only read while denoising), the masks and the pinned positions; the canvas,
the self-conditioning logits, the argmax history and the step number live in static buffers that
each replay reads and rewrites. The graph is captured once per canvas, after the commit that
changed the cache; its first step runs eagerly (it has no self-conditioning yet and warms up the
kernels). The step never waits for the GPU; the host reads one flag per step, the stop rule.

Needs the CUDA kernels (the plain MoE groups tokens on the host) and a CUDA device.

    denoiser = GraphedDenoiser()
    block_diffusion(model, prompts, settings, denoise=denoiser)
"""

import torch

from sampler import DenoiseState, SamplerSettings, sampler_step


class GraphedDenoiser:
    """Callable with the signature of generate.denoise_canvas."""

    def __init__(self):
        self.pool = None  # one memory pool shared by the graphs of successive canvases

    def __call__(self, model, cache, state: DenoiseState, s: SamplerSettings, pinned=None, pinned_tokens=None,
                 on_step=None) -> tuple[DenoiseState, int]:
        dtype = model.dtype
        C = state.canvas.shape[1]
        masks = model.canvas_masks(cache, C)  # fixed for the whole canvas

        # step 1, eagerly: no self-conditioning yet; it also starts the argmax history
        raw = model.forward_canvas(state.canvas, cache, None, masks)
        state = sampler_step(state, raw, s.max_steps, s, dtype, pinned, pinned_tokens)
        del raw
        steps = 1
        if on_step is not None:
            on_step(s.max_steps, state)
        if s.max_steps == 1 or bool(state.finished.all()):
            return state, steps

        # static buffers that each replay reads and rewrites
        static = DenoiseState(canvas=state.canvas.clone(), argmax=state.argmax.clone(),
                              sc_logits=state.sc_logits.clone(), finished=state.finished.clone(),
                              history=state.history.clone())
        step_t = torch.tensor(s.max_steps - 1, dtype=torch.int32, device=state.canvas.device)
        model.soft_embed(static.sc_logits)  # warm up the one kernel the eager step did not run (no RNG)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            raw = model.forward_canvas(static.canvas, cache, static.sc_logits, masks)
            new = sampler_step(static, raw, step_t, s, dtype, pinned, pinned_tokens, sync_free=True)
            for name in ("canvas", "argmax", "sc_logits", "finished", "history"):
                getattr(static, name).copy_(getattr(new, name))
            accepted, entropy = new.accepted, new.entropy  # graph-owned outputs, for on_step
        for step in range(s.max_steps - 1, 0, -1):
            step_t.fill_(step)
            graph.replay()
            steps += 1
            if on_step is not None:
                on_step(step, DenoiseState(static.canvas, static.argmax, static.sc_logits, static.finished,
                                           static.history, accepted, entropy))
            if bool(static.finished.all()):  # the one host read per step: the stop rule
                break
        del graph
        return DenoiseState(static.canvas, static.argmax, static.sc_logits, static.finished, static.history,
                            accepted.clone(), entropy.clone()), steps
