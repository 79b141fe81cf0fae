"""The denoising step as one CUDA graph for a whole generation: sampler.denoise_canvas without launch
overhead.

A denoising step launches a few thousand small kernels (30 layers of norms, projections, routing,
experts, attention, then the sampler's passes over the logits). Replaying them as one CUDA graph
removes the per-launch cost on the host. A graph replays fixed kernels on fixed addresses, so
everything a step reads lives in buffers made once per generation:
  - the KV cache is a kvcache.StaticKVCache (new_cache makes it): causal passes write into it in place
    and the step computes its positions and masks from the cache's length on the device;
  - the canvas, the argmax, the self-conditioning logits, the finished rows, the argmax history,
    the pinned positions and the step number are static buffers that each replay reads and rewrites;
  - the first step of a canvas has no previous logits: a device 0/1 gate on the soft embedding
    (model.forward_canvas's sc_gate) makes it the same graph.
So the graph is captured once, on the first canvas (after a warm-up on a side stream, as the PyTorch
docs advise), and replayed for every step of every canvas. The step never waits for the GPU; the
host reads one flag per step, the stop rule. NaN logits are caught once per canvas (a flag the graph
accumulates). A cache that is not static (a chat's, which rolls back) runs the steps eagerly.

Needs the CUDA kernels (the plain MoE groups tokens on the host) and a CUDA device.

    from cudagraph import GraphedDenoiser; from sampler import block_diffusion, GenerationSettings
    # with a CUDA model whose layers use the kernels (cuda_kernels.use_kernels):
    # block_diffusion(model, [[2, 17, 42]], GenerationSettings(), denoise=GraphedDenoiser())
"""

import torch

from kvcache import StaticKVCache
from sampler import DenoiseState, NonFiniteLogits, SamplerSettings, denoise_canvas, sampler_step


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
    """Callable with the signature of sampler.denoise_canvas; block_diffusion asks it for its cache.

    capture(body, pool) -> an object with replay(): cuda_graph_capture by default; tests pass a
    stand-in that runs body() eagerly at every replay, to check the state handling on the CPU.
    stats: the fused sampler pass (sampler.sampler_step). use_graph=False: the same fixed cache, the
    steps run eagerly (what the graph is checked against: the two give the same tokens).
    """

    def __init__(self, capture=cuda_graph_capture, stats=None, use_graph: bool = True):
        self.capture, self.stats, self.use_graph = capture, stats, use_graph
        self.pool = None  # one memory pool for the graphs of successive generations
        self.cache = None  # the generation the current graph belongs to
        self.captures = 0

    def new_cache(self, model, batch: int, capacity: int) -> StaticKVCache:
        """The KV cache of a generation: fixed buffers for `capacity` tokens (prompt and canvases)."""
        c = model.config  # the sizes the layers have (a rank of distributed.py holds some of the heads)
        shapes = [(batch, layer.self_attn.n_kv_heads, layer.self_attn.head_dim) for layer in model.layers]
        return StaticKVCache(c.layer_types, c.sliding_window, shapes, capacity, model.dtype, model.device)

    def __call__(self, model, cache, state: DenoiseState, s: SamplerSettings, pinned=None, pinned_tokens=None,
                 on_step=None) -> tuple[DenoiseState, int]:
        if not self.use_graph or not isinstance(cache, StaticKVCache):
            return denoise_canvas(model, cache, state, s, pinned, pinned_tokens, on_step, stats=self.stats)
        if self.cache is not cache:  # the first canvas of a generation: buffers and the graph
            self.setup(model, cache, state, s)
        st = self.static
        # a new canvas: the random canvas, no previous logits, nothing finished, no history, its pins
        st.canvas.copy_(state.canvas)
        st.argmax.copy_(state.argmax)
        st.sc_logits.zero_()
        st.finished.zero_()
        if st.history is not None:
            st.history.fill_(-1)
        self.pinned.copy_(pinned if pinned is not None else torch.zeros_like(self.pinned))
        self.pinned_tokens.copy_(pinned_tokens if pinned_tokens is not None else torch.zeros_like(self.pinned_tokens))
        self.nonfinite.zero_()
        steps = 0
        for step in range(s.max_steps, 0, -1):
            self.step_t.fill_(step)
            self.sc_gate.fill_(0 if step == s.max_steps else 1)
            self.graph.replay()
            steps += 1
            if on_step is not None:
                on_step(step, st)
            if bool(st.finished.all()):  # the one host read per step: the stop rule
                break
        if bool(self.nonfinite):
            raise NonFiniteLogits(-1, None)
        # copies: the buffers are the next canvas's
        return DenoiseState(*(None if t is None else t.clone() for t in (
            st.canvas, st.argmax, st.sc_logits, st.finished, st.history, st.accepted, st.entropy))), steps

    def setup(self, model, cache: StaticKVCache, state: DenoiseState, s: SamplerSettings) -> None:
        """Static buffers for this generation, and the step recorded once."""
        B, C = state.canvas.shape
        V, device, dtype = model.config.vocab_size, state.canvas.device, model.dtype
        keep_history = s.confidence_threshold is not None and s.stability_threshold > 0
        st = self.static = DenoiseState(
            canvas=state.canvas.clone(), argmax=state.argmax.clone(),
            sc_logits=torch.zeros(B, C, V, dtype=dtype, device=device),
            finished=torch.zeros(B, dtype=torch.bool, device=device),
            history=torch.full((s.stability_threshold, B, C), -1, dtype=torch.long, device=device)
            if keep_history else None,
            accepted=torch.zeros(B, C, dtype=torch.bool, device=device),
            entropy=torch.zeros(B, C, dtype=torch.float32, device=device))
        self.pinned = torch.zeros(B, C, dtype=torch.bool, device=device)  # all False: no pins
        self.pinned_tokens = torch.zeros(B, C, dtype=torch.long, device=device)
        self.step_t = torch.tensor(s.max_steps, dtype=torch.int32, device=device)
        self.sc_gate = torch.zeros((), dtype=dtype, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        names = [n for n in ("canvas", "argmax", "sc_logits", "finished", "history", "accepted", "entropy")
                 if getattr(st, n) is not None]

        def body():
            raw = model.forward_canvas(st.canvas, cache, st.sc_logits, sc_gate=self.sc_gate)  # masks from the device length
            new = sampler_step(st, raw, self.step_t, s, dtype, self.pinned, self.pinned_tokens, sync_free=True,
                               stats=self.stats)
            for name in names:
                getattr(st, name).copy_(getattr(new, name))
            self.nonfinite.logical_or_(~torch.isfinite(new.entropy).all())

        if self.pool is None and self.capture is cuda_graph_capture:
            self.pool = torch.cuda.graph_pool_handle()
        # the warm-up run writes the buffers and draws random numbers: both are reset before the replays
        rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        self.graph = self.capture(body, self.pool)
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng, device)
        else:
            torch.set_rng_state(rng)
        self.cache = cache
        self.captures += 1
