"""Benchmark the denoising step: ours (CUDA kernels + graph) vs transformers vs ours (plain PyTorch).

At the released 26B-A4B shape with random bf16 weights built directly on the GPU: a 1024-token
prompt, 16 fixed denoising steps per canvas (no early stop, no end token). Every row shares one set
of weight tensors (transformers builds them; ours points at the same memory). Rows are measured in
order of importance (the kernel path and its agreement with transformers first) and each is
printed, and written to the JSON file, as soon as it is measured, so a crash or a time limit loses
nothing already measured.

A canvas costs its steps plus one commit pass of the same size; the time of one canvas is measured
as the time between two canvases' commits (the prompt's prefill drops out): ms/step = per canvas /
(steps + 1), tok/s = canvas_length / per canvas. The same run measures the device's copy bandwidth
and bf16 matmul rate; the floor of a step is the bytes it must read / the bandwidth.

    python scripts/bench.py --tiny --steps 4 --json /tmp/bench.json   # a tiny shape, anywhere, plus bare generate.py
    python scripts/bench.py                   # released shape on a GPU (about 60 GB)
    python scripts/bench.py --quant int8,int4 # bf16, then int8 and int4 experts in one run: speed, logit error, agreement
    python scripts/bench.py --quant int4 --memory   # peak memory of the int4 model generating from a 4k prompt
    python scripts/bench.py --vision          # the vision tower: ms per image, ours and transformers'
    python scripts/bench.py --finetune        # LoRA steps on a 4k sequence, bf16 then int4 base: peak memory, s/step
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the project: run as python scripts/bench.py or python -m scripts.bench
sys.path.insert(0, str(ROOT))

from checkpoint import PREFIX  # noqa: E402
from hfconfig import config_to_hf  # noqa: E402
from generate import choose_fast_path  # noqa: E402
from kvcache import KVCache  # noqa: E402
from model import CONFIGS, DiffusionGemma, DiffusionGemmaConfig, init_weights  # noqa: E402
from sampler import GenerationSettings, SamplerSettings, block_diffusion  # noqa: E402
from terminal import Parser  # noqa: E402

# --tiny: a shape that runs anywhere and that the kernels take (sizes multiples of 64, head_dim 16k)
TINY = CONFIGS["tiny-kernels"]
PLAIN = {"denoise": None}  # block_diffusion's defaults: the plain path


def sync(device):
    """Wait for the device (timings must include the GPU's work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=3) -> float:
    """Best wall time of fn over `repeat` runs, after one warm-up run."""
    fn()  # warm-up (kernel builds, allocator)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def device_ceilings(device) -> dict:
    """Copy bandwidth (read + write bytes / s) and bf16 matmul rate, measured now."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, 5)
    a = b = None  # free the 2 GB before the matmul
    m = 8192 if device.type == "cuda" else 1024
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    return {"bandwidth_GBps": 2 * n / t / 1e9, "bf16_TFLOPs": 2 * m ** 3 / timed(lambda: x @ x, device, 5) / 1e12}


def step_bytes(model) -> int:
    """Bytes one step reads, for any weight format: every parameter and buffer, with the embedding
    read twice (the tied head and self-conditioning read it whole; the lookup reads only the canvas's
    rows, which is nothing beside it)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    E = model.embedding_matrix()
    return total + E.numel() * E.element_size()


def fixed_steps(n_canvas: int, C: int, steps: int) -> GenerationSettings:
    """n_canvas canvases of exactly `steps` steps: no early stop, no end token."""
    return GenerationSettings(max_new_tokens=n_canvas * C, eos_token_ids=(),
                              sampler=SamplerSettings(max_steps=steps, confidence_threshold=None))


def on_device(device, dtype):
    """Build modules directly on the device in dtype (never a full-size model through the CPU)."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                yield
        finally:
            torch.set_default_dtype(old)
    return scope()


def build_hf(cfg: DiffusionGemmaConfig, device, dtype):
    """transformers' model with random weights, one copy of its text stack on the device. Its
    constructor builds the encoder's and the decoder's copies of the stack before post_init ties them
    (101 GB at the released shape, more than an 80 GB GPU): so it is built on meta, where nothing is
    allocated and the ties are made, then materialised once (the stack plus one tensor at the peak)
    and initialised. The encoder's layer scalars are buffers that init_weights leaves alone and ties
    do not cover: they are copied from the decoder's, as the released checkpoint holds them."""
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion
    d = config_to_hf(cfg)
    hf_cfg = HFConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                      canvas_length=cfg.canvas_length, eos_token_id=cfg.eos_token_id)
    with on_device("meta", dtype):
        hf = DiffusionGemmaForBlockDiffusion(hf_cfg).eval()
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # a tied Parameter stays one object
    try:
        hf.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    with torch.no_grad():
        hf.init_weights()  # weights, rotary tables, embedding scales, the decoder's layer scalars; ties again
        for enc, dec in zip(hf.model.encoder.language_model.layers, hf.model.decoder.layers):
            enc.layer_scalar.copy_(dec.layer_scalar)
    return hf


def ours_sharing(hf, cfg: DiffusionGemmaConfig) -> DiffusionGemma:
    """Our model over the very tensors of the transformers model (no second copy)."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    hf_state = hf.state_dict()
    net.load_state_dict({k: hf_state[PREFIX + k] for k in net.state_dict()}, assign=True, strict=True)
    return net.eval().requires_grad_(False)


def per_canvas_ours(model, prompt, C, steps, fast: dict, device) -> float:
    """Seconds from one canvas's commit to the next's (a warm-up generation first). fast: the
    denoise and new_cache of generate.choose_fast_path."""
    stamps = []

    def on_canvas(ci, new, finished):
        sync(device)
        stamps.append(time.perf_counter())

    for _ in range(2):
        stamps.clear()
        block_diffusion(model, [prompt], fixed_steps(2, C, steps), on_canvas=on_canvas,
                        **{k: v for k, v in fast.items() if v is not None})
    return stamps[1] - stamps[0]


class Stamps:
    """A transformers streamer that notes the time of every put (the prompt, then each canvas)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        self.times.append(time.perf_counter())  # value.cpu() was the sync

    def end(self):
        pass


def per_canvas_hf(hf, prompt, C, steps, device) -> float:
    """transformers' seconds from one canvas's commit to the next's, the same span per_canvas_ours
    measures (a warm-up generation first)."""
    for _ in range(2):
        stamps = Stamps(device)
        hf.generate(prompt, max_new_tokens=2 * C, max_denoising_steps=steps, confidence_threshold=None,
                    eos_token_id=None, streamer=stamps)
    return stamps.times[2] - stamps.times[1]


def row(name, per_canvas, steps, C, device) -> dict:
    """One result row from the seconds a canvas took."""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"system": name, "steps": steps, "ms_per_canvas": per_canvas * 1e3,
            "ms_per_step": per_canvas * 1e3 / (steps + 1), "tok_s": C / per_canvas, "peak_GiB": peak}


@torch.no_grad()
def parity(hf, ours, prompt, C, steps, fast: dict) -> dict:
    """Ours against transformers on the same weights: denoiser logits on one canvas (argmax agreement,
    relative and max difference) and the committed canvas of a seeded generation at `steps` steps."""
    V = ours.config.vocab_size
    canvas = torch.randint(0, V, (1, C), device=prompt.device, generator=torch.Generator(prompt.device).manual_seed(1))
    ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    cache = KVCache(ours.config.layer_types, ours.config.sliding_window)
    ours.forward_causal(prompt, cache)
    got = ours.forward_canvas(canvas, cache)
    out = {"argmax_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
           "max_logit_diff": (ref - got).abs().max().item(),
           "relative_logit_error": ((ref - got).norm() / ref.norm()).item()}
    del ref, got, cache
    torch.manual_seed(0)
    hf_tokens = hf.generate(prompt, max_new_tokens=C, max_denoising_steps=steps, confidence_threshold=None,
                            eos_token_id=None).sequences[:, -C:]
    torch.manual_seed(0)
    ours_tokens = block_diffusion(ours, [prompt[0].tolist()], fixed_steps(1, C, steps),
                                  **{k: v for k, v in fast.items() if v is not None}).sequences[:, -C:]
    return {**out, "committed_identical": bool(torch.equal(hf_tokens, ours_tokens)),
            "committed_agreement": (hf_tokens == ours_tokens).float().mean().item()}


class Report:
    """The results so far, printed and written to the JSON file after every row."""

    def __init__(self, path: str, **head):
        self.path, self.data = path, {**head, "rows": [], "parity": {}}

    def add(self, key: str, value, line: str) -> None:
        if key == "rows":
            self.data["rows"].append(value)
        elif isinstance(value, dict) and isinstance(self.data.get(key), dict):
            self.data[key].update(value)  # parity, quality: one entry per path or format
        else:
            self.data[key] = value
        print(line, flush=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=2)


def fmt_row(r: dict, floor_ms: float, base_ms: float | None) -> str:
    """A markdown table row."""
    speed = f"{base_ms / r['ms_per_step']:.2f}" if base_ms else "-"
    peak = f"{r['peak_GiB']:.2f} GiB" if r["peak_GiB"] == r["peak_GiB"] else "n/a"
    return (f"| {r['system']} | {r['steps']} | {r['ms_per_step']:.2f} | {r['tok_s']:.0f} | {speed} | "
            f"{floor_ms / r['ms_per_step']:.3f} | {peak} |")


def bare_run_seconds() -> float:
    """Wall time of `python generate.py` with no arguments (the bundled model), as a user runs it."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device", "cpu"], cwd=ROOT, capture_output=True,
                   check=True)
    return time.perf_counter() - t


def bench_main(args, device, cfg, ceilings, report: Report) -> None:
    """The three systems on the same weights: the kernel path and its agreement with transformers
    first, then transformers, then the plain path and its agreement."""
    C, steps = cfg.canvas_length, args.steps
    hf = build_hf(cfg, device, torch.bfloat16)
    ours = ours_sharing(hf, cfg)
    prompt = torch.randint(5, cfg.vocab_size, (1, args.prompt or (128 if args.tiny else 1024)), device=device)
    floor_ms = step_bytes(ours) / (ceilings["bandwidth_GBps"] * 1e9) * 1e3
    report.add("floor_ms_per_step", floor_ms, f"floor {floor_ms:.2f} ms/step ({step_bytes(ours) / 1e9:.2f} GB read)")
    print("| system | steps | ms/step | tok/s | × transformers | floor / step | peak memory |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    rows = {}
    with torch.no_grad():
        if device.type == "cuda":  # the rows that matter most, first, while the model is on the kernels
            fast, line = choose_fast_path(ours, "cuda", cuda_graph=not args.no_cuda_graph)
            print(line, flush=True)
            rows["kernels"] = row("ours, CUDA kernels + graph", per_canvas_ours(ours, prompt[0].tolist(), C, steps, fast,
                                                                               device), steps, C, device)
            report.add("rows", rows["kernels"], fmt_row(rows["kernels"], floor_ms, None))
            report.add("parity", {"kernels": parity(hf, ours, prompt, C, steps, fast)},
                       f"kernels vs transformers: {report.data['parity']}")
            choose_fast_path(ours, "torch")
        rows["hf"] = row("transformers 5.17.0", per_canvas_hf(hf, prompt, C, steps, device), steps, C, device)
        report.add("rows", rows["hf"], fmt_row(rows["hf"], floor_ms, rows["hf"]["ms_per_step"]))
        plain_steps = steps if args.tiny else 4  # the per-expert loop is slow at full size: 4 steps tell enough
        rows["plain"] = row("ours, plain PyTorch", per_canvas_ours(ours, prompt[0].tolist(), C, plain_steps, PLAIN,
                                                                   device), plain_steps, C, device)
        report.add("rows", rows["plain"], fmt_row(rows["plain"], floor_ms, rows["hf"]["ms_per_step"]))
        checks = parity(hf, ours, prompt, C, plain_steps, PLAIN)
        report.add("parity", {"plain": checks}, f"plain vs transformers: argmax agreement {checks['argmax_agreement']:.4%}, "
                   f"max logit diff {checks['max_logit_diff']:.3g}, committed canvas "
                   f"{'identical' if checks['committed_identical'] else 'agreement %.2f%%' % (100 * checks['committed_agreement'])}")


def random_model(cfg: DiffusionGemmaConfig, device) -> DiffusionGemma:
    """Random bf16 weights, built and drawn directly on the device."""
    with on_device(device, torch.bfloat16):
        return init_weights(DiffusionGemma(cfg), seed=0).eval().requires_grad_(False)


@torch.no_grad()
def bench_quant(args, device, cfg, ceilings, report: Report) -> None:
    """bf16 experts, then each --quant format in turn, in one run (one build of the bf16 weights):
    speed, logit error and argmax agreement against bf16; or --memory."""
    from quant import quantized_copy
    kinds = args.quant.split(",")
    if any(k not in ("int8", "int4") for k in kinds):
        raise SystemExit(f"error: --quant takes int8, int4 or int8,int4, not {args.quant}")
    block = lambda kind: {"experts": kind, "group_size": args.group_size, "zero_point": True, "attention": None,  # noqa: E731
                          "mlp": None, "embedding": None}
    C, steps = cfg.canvas_length, args.steps
    dense = random_model(cfg, device)
    if args.memory:  # the quantized model alone, never beside the whole bf16 one
        qm = quantized_copy(dense, block(kinds[0]), free_source=True)
        del dense
        fast, line = choose_fast_path(qm, "auto")
        print(line, flush=True)
        prompt = torch.randint(5, cfg.vocab_size, (args.prompt or 4096,)).tolist()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        block_diffusion(qm, [prompt], fixed_steps(1, C, steps), **fast)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        report.add("memory", {"quant": kinds[0], "prompt_tokens": len(prompt), "peak_GiB": peak},
                   f"{kinds[0]} experts: peak memory {peak:.2f} GiB generating one canvas from a {len(prompt)}-token prompt")
        return
    prompt = torch.randint(5, cfg.vocab_size, (1, args.prompt or (128 if args.tiny else 1024)), device=device)
    canvas = torch.randint(0, cfg.vocab_size, (1, C), device=device)

    def measure(name, m):
        fast, line = choose_fast_path(m, "auto")
        print(line, flush=True)
        r = row(name, per_canvas_ours(m, prompt[0].tolist(), C, steps, fast, device), steps, C, device)
        r["floor_ms_per_step"] = step_bytes(m) / (ceilings["bandwidth_GBps"] * 1e9) * 1e3
        cache = KVCache(cfg.layer_types, cfg.sliding_window)
        m.forward_causal(prompt, cache)
        return r, m.forward_canvas(canvas, cache)

    base, ref = measure("bf16", dense)
    report.add("rows", base, f"bf16: {base['ms_per_step']:.2f} ms/step, {base['tok_s']:.0f} tok/s "
                             f"(own floor {base['floor_ms_per_step']:.2f} ms/step)")
    kinds = sorted(kinds, key=lambda k: k == "int8")  # int8 last: built while its bf16 source is dropped
    for kind in kinds:
        last = kind == kinds[-1]  # the bf16 weights are not needed after it: peak bf16 + one stack, not + int8
        qm = quantized_copy(dense, block(kind), free_source=last)
        if last:
            del dense
        r, logits = measure(kind + " experts", qm)
        del qm
        report.add("rows", r, f"{kind} experts: {r['ms_per_step']:.2f} ms/step, {r['tok_s']:.0f} tok/s "
                              f"(own floor {r['floor_ms_per_step']:.2f} ms/step)")
        rel = ((logits - ref).norm() / ref.norm()).item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        speedup = base["ms_per_step"] / r["ms_per_step"]
        report.add("quality", {kind: {"relative_logit_error": rel, "argmax_agreement": agree, "speedup_vs_bf16": speedup}},
                   f"{kind} vs bf16: {speedup:.2f}x the speed, relative logit error {rel:.4f}, "
                   f"denoiser argmax agreement {agree:.4%}")


def bench_finetune(args, device, cfg, report: Report, steps: int = 3) -> None:
    """finetune.py's step at the released shape: LoRA of rank 16 on the attention and dense MLP, the base
    frozen, gradient checkpointing per layer, one example of --prompt + --answer tokens (default 2,048 +
    2,048); on a bf16 base, then an int4 one (--quant: only those), one model at a time. The peak memory
    of the steps and the seconds a step (the first, which warms up, left out). The plain MoE: the fused
    kernels have no backward pass."""
    import finetune
    import lora
    from quant import quantized_copy
    n_prompt, n_answer = args.prompt or (128 if args.tiny else 2048), args.answer or (64 if args.tiny else 2048)
    ex = finetune.Example(torch.randint(5, cfg.vocab_size, (n_prompt,)).tolist(),
                          torch.randint(5, cfg.vocab_size, (n_answer,)).tolist(), line=0)
    for kind in (args.quant or "bf16,int4").split(","):
        if kind not in ("bf16", "int4"):
            raise SystemExit(f"error: --finetune takes --quant bf16, int4 or bf16,int4, not {args.quant}")
        base = random_model(cfg, device)
        if kind == "int4":
            base = quantized_copy(base, {"experts": "int4", "group_size": args.group_size, "zero_point": True,
                                         "attention": None, "mlp": None, "embedding": None}, free_source=True)
        lora.add_lora(base, r=16, alpha=32)
        finetune.checkpoint_layers(base)
        base.train()
        params = [p for p in base.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            loss, _, _ = finetune.example_loss(base, ex, torch.Generator().manual_seed(i), 0.5)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        n = sum(p.numel() for p in params)
        del base, opt, params
        report.add("finetune", {kind: {"tokens": n_prompt + n_answer, "lora_parameters": n, "peak_GiB": peak,
                                       "seconds_per_step": statistics.median(times[1:])}},
                   f"LoRA fine-tuning, {kind} base, {n_prompt} + {n_answer} tokens: {statistics.median(times[1:]):.2f} "
                   f"s/step, peak memory {peak:.2f} GiB, {n / 1e6:.1f}M adapter parameters")


# the released vision tower (config.json's vision_config), and a tiny one for --tiny
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3, standardize=True)
TINY_VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=32, patch_size=4, pooling_kernel_size=3, standardize=True)


def bench_vision(args, device, report) -> None:
    """The vision tower on images of a full patch budget (280 soft tokens each), ours and transformers'
    Gemma4VisionModel on the same random weights (built on the device): ms per image, agreement."""
    from transformers import Gemma4VisionConfig, Gemma4VisionModel
    from vision import Vision, VisionConfig
    sizes = TINY_VISION if args.tiny else VISION
    vc, text_hidden = VisionConfig(**sizes), 128 if args.tiny else 2816
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        ours = init_weights_like(Vision(vc, text_hidden)).to(dtype).eval()
        ref = Gemma4VisionModel(Gemma4VisionConfig(**sizes)).to(dtype).eval()
    ref.load_state_dict({k[len("vision_tower."):]: v for k, v in ours.state_dict().items() if k.startswith("vision_tower.")})
    # a grid of 60 x 42 patches (960 x 672 pixels at patch 16): 2,520 patches, 20 x 14 = 280 soft tokens
    places = torch.stack(torch.meshgrid(torch.arange(60), torch.arange(42), indexing="xy"), -1).reshape(-1, 2).to(device)
    n_patches = places.shape[0]
    params = sum(t.numel() * t.element_size() for t in ours.state_dict().values()) / 2 ** 30
    for batch in (1, 4):
        pixels = torch.rand(batch, n_patches, 3 * vc.patch_size ** 2, device=device)
        where = places[None].expand(batch, -1, -1).contiguous()
        with torch.no_grad():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_ours = timed(lambda: ours(pixels, where), device)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
            t_ref = timed(lambda: ours.embed_vision(ref(pixels, where).last_hidden_state), device)
            diff = (ours(pixels, where).float() - ours.embed_vision(ref(pixels, where).last_hidden_state).float()).abs().max().item()
        report.add("rows", {"system": f"vision tower, {batch} image{'s' * (batch > 1)}", "ms_per_image": t_ours * 1e3 / batch,
                            "transformers_ms_per_image": t_ref * 1e3 / batch, "max_abs_diff": diff, "peak_GiB": peak,
                            "weights_GiB": params},
                   f"vision tower, {batch} image(s) of 280 soft tokens: {t_ours * 1e3 / batch:.1f} ms/image "
                   f"(transformers {t_ref * 1e3 / batch:.1f}), max |diff| {diff:.2e}, weights {params:.2f} GiB, "
                   f"peak {peak:.2f} GiB")


def init_weights_like(net):
    """Random weights in place on the module's own device: matrices N(0, 0.02), the position table
    N(0, 0.5), norms and scales 1."""
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.ndim >= 2:
                t.normal_(0, 0.5 if "position_embedding" in name else 0.02)
            else:
                t.fill_(1.0)
    return net


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench.py."""
    p = Parser(description="Denoising-step benchmark: CUDA kernels vs transformers vs plain PyTorch.")
    p.add_argument("--tiny", action="store_true", help="a tiny shape that runs anywhere (the CPU)")
    p.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas (default 16)")
    p.add_argument("--prompt", type=int, help="prompt tokens (default 1024; 128 with --tiny)")
    p.add_argument("--device", help="device (default: cuda when available)")
    p.add_argument("--no-cuda-graph", action="store_true", help="kernels without the CUDA graph")
    p.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    p.add_argument("--quant", help="compare bf16 with int8, int4 or int8,int4 experts instead (one build)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (default 64)")
    p.add_argument("--memory", action="store_true", help="with --quant: peak memory from a 4k prompt, alone")
    p.add_argument("--vision", action="store_true", help="the vision tower instead: ours and transformers', per image")
    p.add_argument("--finetune", action="store_true", help="LoRA fine-tuning steps instead: peak memory, seconds a "
                   "step, on a bf16 and an int4 base (--quant: one of them)")
    p.add_argument("--answer", type=int, help="--finetune: answer tokens (default 2048; 64 with --tiny)")
    return p


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.tiny and device.type != "cuda":
        print("error: the released shape needs a CUDA GPU with about 60 GB; use --tiny on this machine", file=sys.stderr)
        return 2
    cfg = DiffusionGemmaConfig(**TINY) if args.tiny else DiffusionGemmaConfig.from_name("26b-a4b")
    torch.manual_seed(0)
    ceilings = device_ceilings(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(args.json, device=name, shape="tiny" if args.tiny else "released 26B-A4B", steps=args.steps,
                    canvas_length=cfg.canvas_length, **ceilings)
    print(f"device {name}, {report.data['shape']}, {args.steps} steps/canvas, canvas {cfg.canvas_length}; "
          f"copy bandwidth {ceilings['bandwidth_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_TFLOPs']:.1f} TFLOP/s",
          flush=True)
    if args.vision:
        bench_vision(args, device, report)
    elif args.finetune:
        bench_finetune(args, device, cfg, report)
    elif args.quant:
        bench_quant(args, device, cfg, ceilings, report)
    else:
        bench_main(args, device, cfg, ceilings, report)
    if args.tiny and not args.quant and not args.vision and not args.finetune:
        seconds = bare_run_seconds()
        report.add("bare_generate_seconds", seconds, f"bare `python generate.py` (bundled model, CPU): {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
