"""The denoising step as CUDA graphs for a whole generation: sampler.denoise_canvas without launch
overhead. Everything that exists only for the graphs lives here.

A denoising step launches a few thousand small kernels (30 layers of norms, projections, routing,
experts, attention, then the sampler's pass over the logits). Replaying them as a CUDA graph
removes the per-launch cost on the host. A graph replays fixed kernels on fixed addresses, so
everything a step reads lives in buffers made once per generation:
  - the KV cache is a StaticKVCache (GraphedDenoiser.new_cache makes it): causal passes write into
    it in place, sliding layers as rings of exactly the tokens they show, and a canvas pass computes
    its positions and masks from the cache's length on the device;
  - the canvas, the argmax, the self-conditioning logits, the finished rows, the argmax history,
    the pinned positions, the step number and the sampler's keys are static buffers that each replay
    reads and rewrites;
  - the sampler pass is the fused kernel keyed by a buffer the host fills before each replay
    (streams.RandomStreams.keys), so the graph draws nothing from torch's generators and a seed
    means the same with and without the graph;
  - NaN logits raise a flag that is read once per canvas, never a host sync inside the step.
Two graphs are captured once per generation, on its first canvas: the first step of a canvas
(no previous logits) and every later step. The host reads one tensor per step, the stop rule.
A cache that is not static (a chat's, which rolls back), and a canvas with positions restricted to
token sets (structured.Allowed), run the same keyed steps eagerly.

Needs a MoE that never waits for the host (cuda_kernels.FusedExperts: the plain one groups tokens
by expert on the host) and, on a GPU, the CUDA kernels' sampler pass.

    from cuda_kernels.graph import GraphedDenoiser; from sampler import block_diffusion, GenerationSettings
    # with a CUDA model switched to the kernels (cuda_kernels.use_kernels):
    # g = GraphedDenoiser(cuda_kernels.sampler_stats)
    # block_diffusion(model, [[2, 17, 42]], GenerationSettings(), denoise=g, new_cache=g.new_cache)
"""

from dataclasses import replace

import torch

from kvcache import KVCache, LayerCache
from moe import Experts
from sampler import DenoiseState, NonFiniteLogits, SamplerSettings, denoise_canvas, sampler_step


class StaticLayerCache(LayerCache):
    """A layer's keys and values in buffers made once, (B, Hkv, slots, d), written in place so the
    tensors keep their addresses. A full layer has one slot per position of the generation; a
    sliding layer is a ring of `window` slots: position p lives in slot p % window, and a canvas
    pass reads the ring in slot order (attention does not care about the order of its keys)."""

    def __init__(self, window: int | None, k_buf: torch.Tensor, v_buf: torch.Tensor):
        super().__init__(window)
        self.k_buf, self.v_buf, self.count = k_buf, v_buf, 0

    @property
    def held(self) -> int:
        return self.count

    def __len__(self) -> int:
        return self.count if self.window is None else min(self.count, self.window)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, shown = k.shape[2], len(self)
        if self.window is None:
            self.k_buf[:, :, self.count: self.count + n] = k
            self.v_buf[:, :, self.count: self.count + n] = v
            self.count += n
            return self.k_buf[:, :, : self.count], self.v_buf[:, :, : self.count]
        W = self.window
        order = (torch.arange(self.count - shown, self.count, device=k.device) % W)  # shown slots, oldest first
        k_all = torch.cat([self.k_buf[:, :, order], k], dim=2)  # what this causal pass sees, in position order
        v_all = torch.cat([self.v_buf[:, :, order], v], dim=2)
        keep = min(n, W)  # the last `window` new tokens stay
        slots = torch.arange(self.count + n - keep, self.count + n, device=k.device) % W
        self.k_buf[:, :, slots] = k[:, :, n - keep:]
        self.v_buf[:, :, slots] = v[:, :, n - keep:]
        self.count += n
        return k_all, v_all

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers: StaticKVCache.canvas_valid hides the slots not (yet) written."""
        return self.k_buf, self.v_buf


class StaticKVCache(KVCache):
    """A KVCache of fixed buffers for a prompt and all the canvases of a generation (capacity
    positions), with its length also kept on the device: a canvas pass reads fixed-size tensors and
    computes its positions and masks from the device length, so the same graphs serve every canvas.
    Causal passes run eagerly and write in place."""

    def __init__(self, layer_types: list[str], sliding_window: int, shapes: list[tuple], capacity: int,
                 dtype: torch.dtype, device):
        self.capacity, self._length = capacity, 0
        self.length_t = torch.zeros((), dtype=torch.long, device=device)
        self.valid_buf = torch.ones(shapes[0][0], capacity, dtype=torch.bool, device=device)  # written in place
        self.padded = False
        super().__init__(layer_types, sliding_window)
        layers = []
        for layer, (B, Hkv, d) in zip(self.layers, shapes):  # shapes: per layer (B, Hkv, d)
            slots = capacity if layer.window is None else min(layer.window, capacity)
            layers.append(StaticLayerCache(layer.window, torch.zeros(B, Hkv, slots, d, dtype=dtype, device=device),
                                           torch.zeros(B, Hkv, slots, d, dtype=dtype, device=device)))
        self.layers = layers

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        if value > self.capacity:
            raise ValueError(f"{value} tokens do not fit a cache made for {self.capacity}")
        self._length = value
        self.length_t.fill_(value)  # outside a graph: the graphs read it at each replay

    def extend_valid(self, new_valid: torch.Tensor | None, batch_size: int, n_new: int, device) -> None:
        if new_valid is not None:
            self.valid_buf[:, self.length: self.length + n_new] = new_valid
            self.padded = True
        self.valid = self.valid_buf[:, : self.length + n_new] if self.padded else None

    def positions(self, n: int, device) -> torch.Tensor:
        return (self.length_t + torch.arange(n, device=device))[None]

    def canvas_valid(self, layer_idx: int) -> torch.Tensor | None:
        """(B, slots) bool from the device length: which slots hold a shown token that is not padding.
        None for a sliding layer whose ring is full and unpadded (it stays full for the generation,
        so a graph captured without its mask stays right)."""
        layer = self.layers[layer_idx]
        L = self.length_t
        slot = torch.arange(layer.k_buf.shape[2], device=L.device)
        if layer.window is None:
            return (slot < L)[None] & self.valid_buf
        if layer.count >= layer.window and not self.padded:
            return None
        W = layer.window
        position = slot + W * torch.div(L - 1 - slot, W, rounding_mode="floor")  # the newest position in each slot
        written = slot < L
        return written[None] & self.valid_buf[:, position.clamp(min=0)]

    def rollback(self, n: int) -> None:
        raise ValueError("a static cache does not roll back")


class KeyedStats:
    """sampler.logit_stats's signature over a keyed sampler pass (raw, T, keys) -> (sampled, argmax,
    entropy, scaled logits, noise), such as cuda_kernels.sampler_stats: the keys come from the
    state's random streams, NaN logits stop the generation (one host read a step: eager only)."""

    def __init__(self, sampler_pass):
        self.sampler_pass = sampler_pass

    def __call__(self, raw, T, state: DenoiseState) -> tuple:
        out = self.sampler_pass(raw, T, state.rng.keys(~state.finished))
        if not bool(torch.isfinite(out[2]).all()):
            raise NonFiniteLogits(state.index, int(state.step))
        return out


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
    """Callable with the signature of sampler.denoise_canvas; new_cache is block_diffusion's cache
    factory for it.

    sampler_pass(raw, T, keys): the keyed sampler pass (cuda_kernels.sampler_stats on a GPU).
    capture(body, pool) -> an object with replay(): cuda_graph_capture by default; tests pass a
    stand-in that runs body() eagerly at every replay, to check the state handling on the CPU.
    use_graph=False: the same fixed cache and keyed steps, run eagerly (what the graphs are checked
    against: the two give the same tokens).
    """

    def __init__(self, sampler_pass, capture=cuda_graph_capture, use_graph: bool = True):
        self.sampler_pass, self.capture, self.use_graph = sampler_pass, capture, use_graph
        self.eager_stats = KeyedStats(sampler_pass)
        self.pool = None  # one memory pool for the graphs of successive generations
        self.cache = None  # the generation the current graphs belong to

    def new_cache(self, model, batch: int, capacity: int) -> StaticKVCache:
        """The KV cache of a generation: fixed buffers for `capacity` tokens (prompt and canvases)."""
        c = model.config  # the sizes the layers have (a rank of distributed.py holds some of the heads)
        shapes = [(batch, layer.self_attn.n_kv_heads, layer.self_attn.head_dim) for layer in model.layers]
        return StaticKVCache(c.layer_types, c.sliding_window, shapes, capacity, model.dtype, model.device)

    def __call__(self, model, cache, state: DenoiseState, s: SamplerSettings, on_step=None) -> tuple:
        if not self.use_graph or not isinstance(cache, StaticKVCache) or state.allowed is not None:
            # (a canvas with restricted positions runs the same keyed steps eagerly: its sets vary)
            return denoise_canvas(model, cache, state, s, on_step, stats=self.eager_stats)
        if self.cache is not cache:  # the first canvas of a generation: buffers and graphs
            self.setup(model, cache, state, s)
        st = self.static
        # a new canvas: its random tokens, nothing finished (but the rows left out), no history, its pins
        for name in ("canvas", "argmax", "finished"):
            getattr(st, name).copy_(getattr(state, name))
        if st.history is not None:
            st.history.fill_(-1)
        st.pinned.copy_(state.pinned if state.pinned is not None else torch.zeros_like(st.pinned))
        st.pinned_tokens.copy_(state.pinned_tokens if state.pinned is not None else torch.zeros_like(st.pinned_tokens))
        self.nonfinite.zero_()
        steps, step = 0, s.max_steps
        while step > 0:
            self.step_t.fill_(step)
            self.keys.copy_(state.rng.keys(~st.finished))
            (self.first if steps == 0 else self.rest).replay()
            steps, step = steps + 1, step - 1
            if on_step is not None:
                on_step(step + 1, st)
            if bool(st.finished.all()):  # the one host read per step: the stop rule
                break
        if bool(self.nonfinite):
            raise NonFiniteLogits(state.index, None)
        copies = {n: getattr(st, n).clone() for n in ("canvas", "argmax", "sc_logits", "finished", "accepted", "entropy")}
        return replace(state, **copies, step=step, history=None if st.history is None else st.history.clone()), steps

    def setup(self, model, cache: StaticKVCache, state: DenoiseState, s: SamplerSettings) -> None:
        """Static buffers for this generation, and the two steps recorded once."""
        plain = [i for i, layer in enumerate(model.layers) if type(layer.experts).forward is Experts.forward]
        if plain:
            raise ValueError("the CUDA graph needs a MoE that never waits for the host (cuda_kernels.use_kernels); "
                             f"layer {plain[0]} runs the plain one, which groups tokens on the host")
        B, C = state.canvas.shape
        V, device, dtype = model.config.vocab_size, state.canvas.device, model.dtype
        self.step_t = torch.tensor(s.max_steps, dtype=torch.int32, device=device)
        self.keys = torch.zeros(B, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        keep_history = s.confidence_threshold is not None and s.stability_threshold > 0
        st = self.static = DenoiseState(
            canvas=state.canvas.clone(), argmax=state.argmax.clone(),
            sc_logits=torch.zeros(B, C, V, dtype=dtype, device=device),
            finished=torch.zeros(B, dtype=torch.bool, device=device),
            history=torch.full((s.stability_threshold, B, C), -1, dtype=torch.long, device=device)
            if keep_history else None, step=self.step_t, rng=state.rng,
            pinned=torch.zeros(B, C, dtype=torch.bool, device=device),  # all False: no pins
            pinned_tokens=torch.zeros(B, C, dtype=torch.long, device=device), index=state.index,
            accepted=torch.zeros(B, C, dtype=torch.bool, device=device),
            entropy=torch.zeros(B, C, dtype=torch.float32, device=device))
        names = [n for n in ("canvas", "argmax", "sc_logits", "finished", "history", "accepted", "entropy")
                 if getattr(st, n) is not None]

        def graph_stats(raw, T, _state):  # the keyed pass on the keys buffer; NaN only raises a flag
            out = self.sampler_pass(raw, T, self.keys)
            self.nonfinite.logical_or_(~torch.isfinite(out[2]).all())
            return out

        def body(first: bool):
            raw = model.forward_canvas(st.canvas, cache, None if first else st.sc_logits)  # masks from the device length
            new = sampler_step(st, raw, s, dtype, stats=graph_stats)
            for name in names:
                getattr(st, name).copy_(getattr(new, name))

        if self.pool is None and self.capture is cuda_graph_capture:
            self.pool = torch.cuda.graph_pool_handle()
        # the warm-up runs write the buffers: __call__ loads the canvas after this
        self.first = self.capture(lambda: body(True), self.pool)
        self.rest = self.capture(lambda: body(False), self.pool)
        self.cache = cache
