"""DiffusionGemma over several devices: tensor and expert parallelism with torch.distributed.

Launched with torchrun (one process per device, NCCL on GPUs, gloo on CPUs); each rank builds the
network on the meta device, reshapes it to its share, then reads only its slices of each tensor from
the safetensors shards (get_slice), so no rank ever holds the whole model. With N ranks:
  attention        query heads split N ways (q_proj rows, o_proj columns), one all-reduce after o_proj;
                   each rank keeps the KV heads its query heads use: split when the KV heads divide N
                   ways, otherwise (2 KV heads on 4 ranks) a KV head is held by several ranks, whole
  dense MLP and    gate/up rows and down columns split N ways (column- then row-parallel), one
  self-conditioning  all-reduce after down_proj
  experts          E / N whole experts per rank; each rank computes its experts' share of every
                   token's top-k sum, one all-reduce
  embedding and    the vocabulary split N ways: a lookup is an all-reduce of the rows each rank has,
  tied lm_head     the logits are all-gathered, so every rank samples the same tokens from the same
                   random stream (the same seed): all commit the same canvas, rank 0 prints
  norms, router,   replicated (small)
  layer scalars
As in gpt-fast's tp.py, modules keep their classes and forward code: weights are cut and a hook
all-reduces an output. A layer whose query heads do not split N ways stays whole on every rank.

    torchrun --nproc-per-node 2 generate.py --model weights-code --device cpu "def f(x):"
    from distributed import Sharding      # load_model(path, device, dtype, sharding=Sharding(rank, world))
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model import DiffusionGemma
from moe import Experts

TIMEOUT = datetime.timedelta(seconds=120)


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes: (rank, world size, this rank's device)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return rank, world, device


def finish(code: int = 0):
    """End this rank: wait until every rank is done, close the process group while the interpreter
    is whole, flush, and leave without the interpreter's finalization. Why: a gloo worker thread lets
    go of a finished collective's tensors a moment after the collective returns; when that moment
    falls inside the interpreter's finalization, the thread's last decref of a Python tensor asks for
    the GIL, Python ends the thread (pthread_exit) across a C++ frame that cannot unwind, and the rank
    aborts after its work is done ("terminate called without an active exception", SIGABRT: seen
    with torch 2.14.1, in a core dump). Never returns."""
    try:
        if dist.is_initialized():
            dist.barrier()  # nobody closes its connections while another rank still talks
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def all_agree(error: str | None) -> list[str | None]:
    """Every rank's error (None for none), on every rank: so one failing rank stops them all
    instead of leaving the others waiting in a collective."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def _all_reduce_hook(module, inputs, output):
    dist.all_reduce(output)
    return output


class Sharding:
    """How rank `rank` of `world` holds the model: prepare(net) cuts the meta network to this rank's
    share; read(name, safe_slice) reads that share of a checkpoint tensor (None: the whole tensor)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.slices: dict[str, tuple[int, int, int]] = {}  # name -> (dim, start, stop)

    def part(self, n: int) -> tuple[int, int]:
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size

    def cut(self, module: nn.Module, name: str, prefix: str, dim: int, start: int, stop: int) -> None:
        """Replace parameter `name` of module (on meta) by its [start, stop) part along dim."""
        p = getattr(module, name)
        shape = list(p.shape)
        shape[dim] = stop - start
        setattr(module, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=False))
        self.slices[f"{prefix}{name}"] = (dim, start, stop)

    def prepare(self, net: DiffusionGemma) -> None:
        c, N = net.config, self.world
        if c.quantization:
            raise ValueError("a quantized checkpoint cannot be split across ranks yet: use the bf16 one")
        for i, layer in enumerate(net.layers):
            p = f"layers.{i}."
            self.shard_attention(layer.self_attn, c.num_attention_heads, c.layer_kv_heads(i), c.layer_head_dim(i),
                                 p + "self_attn.")
            self.shard_mlp(layer.mlp, p + "mlp.")
            if c.num_experts % N:
                raise ValueError(f"{c.num_experts} experts do not split over {N} ranks")
            first, stop = self.part(c.num_experts)
            for name in ("gate_up_proj", "down_proj"):
                self.cut(layer.experts, name, p + "experts.", 0, first, stop)
            layer.experts.__class__ = LocalExperts
            layer.experts.first, layer.experts.num_experts = first, stop - first
        self.shard_mlp(net.self_conditioning, "self_conditioning.")
        if c.vocab_size % N:
            raise ValueError(f"the vocabulary ({c.vocab_size}) does not split over {N} ranks")
        v0, v1 = self.part(c.vocab_size)
        self.cut(net.embed_tokens, "weight", "embed_tokens.", 0, v0, v1)
        net.embed_tokens.__class__ = VocabEmbedding
        net.embed_tokens.first = v0
        net.__class__ = ShardedDiffusionGemma

    def shard_attention(self, attn, H: int, Hkv: int, d: int, prefix: str) -> None:
        N, group = self.world, H // Hkv
        per = H // N
        if H % N or (group % per and per % group):  # heads that do not split: the layer stays whole
            return
        h0, h1 = self.part(H)
        kv0, kv1 = h0 // group, (h1 - 1) // group + 1  # the KV heads these query heads use
        for lin, (a, b) in (("q_proj", (h0 * d, h1 * d)), ("k_proj", (kv0 * d, kv1 * d)),
                            ("v_proj", (kv0 * d, kv1 * d))):
            if getattr(attn, lin) is not None:
                self.cut(getattr(attn, lin), "weight", f"{prefix}{lin}.", 0, a, b)
        self.cut(attn.o_proj, "weight", prefix + "o_proj.", 1, h0 * d, h1 * d)
        attn.n_heads, attn.n_kv_heads = h1 - h0, kv1 - kv0
        attn.o_proj.register_forward_hook(_all_reduce_hook)

    def shard_mlp(self, mlp, prefix: str) -> None:
        n = mlp.gate_proj.weight.shape[0]
        if n % self.world:
            return  # stays whole on every rank
        a, b = self.part(n)
        self.cut(mlp.gate_proj, "weight", prefix + "gate_proj.", 0, a, b)
        self.cut(mlp.up_proj, "weight", prefix + "up_proj.", 0, a, b)
        self.cut(mlp.down_proj, "weight", prefix + "down_proj.", 1, a, b)
        mlp.down_proj.register_forward_hook(_all_reduce_hook)

    def read(self, name: str, safe_slice) -> torch.Tensor | None:
        if name not in self.slices:
            return None
        dim, a, b = self.slices[name]
        return safe_slice[a:b] if dim == 0 else safe_slice[:, a:b]


class LocalExperts(Experts):
    """This rank's experts [first, first + num_experts) of the routed set: each token's top-k sum
    over the slots whose expert is here, all-reduced over the ranks."""
    first: int = 0

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = idx.shape
        here = (idx >= self.first) & (idx < self.first + self.num_experts)  # (T, K)
        a = here.reshape(-1).nonzero().flatten()  # this rank's assignments, in t*K + slot order
        y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        if len(a):
            t = a // K
            rows = super().forward(x[t], idx.reshape(-1)[a, None] - self.first, weights.reshape(-1)[a, None])
            y.index_add_(0, t, rows.float())
        dist.all_reduce(y)
        return y.to(x.dtype)


class VocabEmbedding(nn.Embedding):
    """Rows [first, first + rows) of the embedding; a lookup all-reduces what each rank holds."""
    first: int = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        here = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * here[..., None]
        dist.all_reduce(out)
        return out


class ShardedDiffusionGemma(DiffusionGemma):
    """The tied head over a vocabulary split across ranks: logits gathered, self-conditioning embeddings reduced."""

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.embedding_matrix()).float()  # (B, S, V / N)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        cap = self.config.final_logit_softcapping
        return torch.tanh(torch.cat(parts, dim=-1) / cap) * cap

    def sc_embed(self, logits: torch.Tensor) -> torch.Tensor:
        E = self.embedding_matrix()  # (V / N, D)
        first = self.embed_tokens.first
        probs = logits.softmax(dim=-1, dtype=torch.float32)[..., first: first + E.shape[0]].to(E.dtype)
        out = torch.matmul(probs, E)
        dist.all_reduce(out)
        return out * self.embed_scale()


def load_sharded(load, device_type: str, error_type=RuntimeError):
    """load(sharding, device) on every rank; if any rank fails, every rank stops: rank 0 raises
    error_type naming the first rank that failed and why, the others leave quietly (SystemExit 1)."""
    rank, world, device = setup(device_type)
    error, result = None, None
    try:
        result = load(Sharding(rank, world), device)
    except Exception as e:  # anything: the other ranks must hear of it rather than wait
        error = e
    errors = all_agree(None if error is None else str(error))
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        if rank != 0:
            raise SystemExit(1)
        raise error_type(f"rank {failed[0][0]} of {world}: {failed[0][1]}")
    return result


def agree_min(value: int) -> int:
    """The smallest value any rank has (e.g. a batch size that fits everywhere)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def peak_memory_per_rank(device: torch.device) -> str:
    """Every rank's peak memory (GPU allocation, or process RSS), as one string."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        import resource
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    all_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(all_ranks, mine)
    return " / ".join(f"{m:.2f}" for m in all_ranks) + " GiB per rank" + (" (RSS)" if device.type != "cuda" else "")

