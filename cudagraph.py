"""The denoising step captured in a CUDA graph: sampler.denoise_canvas without launch overhead.

A denoising step launches some thousand small kernels (30 layers of norms, projections, routing,
experts, attention, then the sampler's passes over the logits). Replaying them as one CUDA graph
removes the per-launch cost on the host. Within one canvas everything the step reads has a fixed
address: the KV cache (only read while denoising), the masks and the pinned positions; the canvas,
the self-conditioning logits, the argmax history and the step number live in static buffers that
each replay reads and rewrites. The graph is captured once per canvas, after the commit that
changed the cache; its first step runs eagerly (it has no self-conditioning yet and warms up the
kernels). The step never waits for the GPU; the host reads one flag per step, the stop rule. NaN
logits are caught once per canvas (a flag the graph accumulates), not per step.

Needs the CUDA kernels (the plain MoE groups tokens on the host) and a CUDA device.

    from cudagraph import GraphedDenoiser; from sampler import block_diffusion, GenerationSettings
    # with a CUDA model whose layers use the kernels (cuda_kernels.use_kernels):
    # block_diffusion(model, [[2, 17, 42]], GenerationSettings(), denoise=GraphedDenoiser())
"""

import torch

from sampler import DenoiseState, NonFiniteLogits, SamplerSettings, sampler_step


def cuda_graph_capture(body, pool):
    """Record body() as a CUDA graph (after a warm-up run on a side stream, as the PyTorch docs
    advise) and return it: graph.replay() re-runs the recorded kernels on the same buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up: allocator, cuBLAS workspaces and lazy kernel loads for the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


class GraphedDenoiser:
    """Callable with the signature of sampler.denoise_canvas.

    capture(body, pool) -> an object with replay(): cuda_graph_capture by default; tests pass a
    stand-in that runs body() eagerly at every replay, to check the state handling on the CPU.
    """

    def __init__(self, capture=cuda_graph_capture, stats=None):
        self.capture, self.stats = capture, stats  # stats: the fused sampler pass (sampler.sampler_step)
        self.pool = None  # one memory pool shared by the graphs of successive canvases

    def __call__(self, model, cache, state: DenoiseState, s: SamplerSettings, pinned=None, pinned_tokens=None,
                 on_step=None) -> tuple[DenoiseState, int]:
        dtype = model.dtype
        valids = model.canvas_valids(cache)  # fixed for the whole canvas

        # step 1, eagerly: no self-conditioning yet; it also starts the argmax history
        raw = model.forward_canvas(state.canvas, cache, None, valids)
        state = sampler_step(state, raw, s.max_steps, s, dtype, pinned, pinned_tokens, stats=self.stats)
        del raw
        steps = 1
        if on_step is not None:
            on_step(s.max_steps, state)
        if s.max_steps == 1 or bool(state.finished.all()):
            return state, steps

        # static buffers that each replay reads and rewrites (history is None without a stop rule)
        static = DenoiseState(*(None if t is None else t.clone() for t in (
            state.canvas, state.argmax, state.sc_logits, state.finished, state.history, state.accepted,
            state.entropy)))
        names = [n for n in ("canvas", "argmax", "sc_logits", "finished", "history", "accepted", "entropy")
                 if getattr(static, n) is not None]
        device = state.canvas.device
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        step_t = torch.tensor(s.max_steps - 1, dtype=torch.int32, device=device)

        def body():
            raw = model.forward_canvas(static.canvas, cache, static.sc_logits, valids)
            new = sampler_step(static, raw, step_t, s, dtype, pinned, pinned_tokens, sync_free=True, stats=self.stats)
            for name in names:
                getattr(static, name).copy_(getattr(new, name))
            nonfinite.logical_or_(~torch.isfinite(new.entropy).all())

        if self.pool is None and self.capture is cuda_graph_capture:
            self.pool = torch.cuda.graph_pool_handle()
        # the warm-up run writes the buffers and draws random numbers: undo both, so that the replays
        # draw what the eager loop would
        snapshot = [getattr(static, n).clone() for n in names]
        rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        graph = self.capture(body, self.pool)
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng, device)
        else:
            torch.set_rng_state(rng)
        for name, saved in zip(names, snapshot):
            getattr(static, name).copy_(saved)
        nonfinite.zero_()
        for step in range(s.max_steps - 1, 0, -1):
            step_t.fill_(step)
            graph.replay()
            steps += 1
            if on_step is not None:
                on_step(step, static)
            if bool(static.finished.all()):  # the one host read per step: the stop rule
                break
        del graph
        if bool(nonfinite):
            raise NonFiniteLogits(-1, None)
        return static, steps
