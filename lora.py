"""LoRA adapters: a low-rank update of chosen linear layers, trained while the model stays frozen,
kept in PEFT's file format so that transformers + peft load an adapter made here and this loads one
made there.

A target layer W (out, in) becomes  y = W x + (alpha / r) * B A dropout(x),  A (r, in), B (out, r),
A random and B zero at the start (so the adapted model starts exactly at the base model), both in
fp32 whatever the base's dtype (int8/int4 bases included: the base is only ever read). The targets
are the attention projections and the dense MLP of every layer (TARGETS), not the routed experts.

transformers' DiffusionGemmaForBlockDiffusion reaches the one weight stack under two module paths,
`model.decoder.layers.N...` (the canvas pass) and `model.encoder.language_model.layers.N...` (the
causal pass over the prompt and committed canvases). An adapter made here updates the stack, so it
is written under both paths with the same tensors: whichever pass runs, transformers + peft apply
what this model applies. An adapter read here may also carry different tensors on the two paths
(peft trains them apart unless told not to), or only one path: then each pass applies its own
(with_adapter switches them as the model changes mode).

    from generate import load; from lora import add_lora, save_adapter, load_adapter
    model, tok = load("weights-code")
    add_lora(model, r=8, alpha=16)                 # the base frozen, A and B trainable
    save_adapter(model, "/tmp/adapter")            # adapter_config.json + adapter_model.safetensors
    model, tok = load("weights-code"); load_adapter(model, "/tmp/adapter")
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hfconfig import CheckpointError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = {"canvas": "model.decoder.", "causal": "model.encoder.language_model."}  # transformers' two paths
PEFT_PREFIX = "base_model.model."  # what peft puts before the model's own module names
BOTH = "both"


class Mode:
    """Which pass runs: "causal", "canvas", or None (training runs both in one sequence)."""
    current: str | None = None


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or quant.QuantLinear) plus its low-rank update(s): one pair
    (A, B) for both passes, or one per pass ("causal", "canvas") for an adapter that has them apart."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, mode: Mode | None = None,
                 passes: tuple = (BOTH,)):
        super().__init__()
        self.base, self.r, self.scaling, self.mode = base, r, scaling, mode or Mode()
        w = base.weight
        n_out, n_in = w.shape[0], w.shape[1] * (2 if getattr(base, "kind", None) == "int4" else 1)
        self.in_features, self.out_features = n_in, n_out
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(r, n_in, device=w.device)) for p in passes})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(n_out, r, device=w.device)) for p in passes})
        for a in self.lora_A.values():  # as peft and nn.Linear initialise A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pair(self):
        """The (A, B) of the pass that runs, or None when this adapter leaves that pass alone."""
        if BOTH in self.lora_A:
            return self.lora_A[BOTH], self.lora_B[BOTH]
        if self.mode.current is None:
            raise RuntimeError("an adapter with separate weights per pass cannot be trained or merged here")
        if self.mode.current not in self.lora_A:
            return None
        return self.lora_A[self.mode.current], self.lora_B[self.mode.current]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pair = self.pair()
        if pair is None:
            return y
        A, B = pair
        d = F.linear(F.linear(self.dropout(x.to(A.dtype)), A), B) * self.scaling  # (..., out) fp32
        return (y + d).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """scaling * B A (out, in), fp32: what merging adds to the weight."""
        A, B = self.pair()
        return (B @ A) * self.scaling


def targets_of(model, names=TARGETS):
    """(our module name, parent module, attribute) of every target layer: layers.N.self_attn.X, layers.N.mlp.X."""
    for i, layer in enumerate(model.layers):
        for owner_name, owner in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr in names:
                if getattr(owner, attr, None) is not None:
                    yield f"layers.{i}.{owner_name}.{attr}", owner, attr


def with_adapter(model) -> None:
    """The model's class, switched once to one that tells its adapter layers which pass runs."""
    if getattr(type(model), "sets_lora_mode", False):
        return

    class Adapted(type(model)):
        sets_lora_mode = True

        def forward_causal(self, *a, **kw):
            self.lora_mode.current = "causal"
            try:
                return super().forward_causal(*a, **kw)
            finally:
                self.lora_mode.current = None

        def forward_canvas(self, *a, **kw):
            self.lora_mode.current = "canvas"
            try:
                return super().forward_canvas(*a, **kw)
            finally:
                self.lora_mode.current = None
    Adapted.__name__ = "Adapted" + type(model).__name__
    model.__class__ = Adapted


def add_lora(model, r: int = 16, alpha: float = 32, dropout: float = 0.0, targets=TARGETS, *,
             passes: tuple = (BOTH,), rslora: bool = False) -> list[str]:
    """Every target layer wrapped in a LoRALinear (in place); the model frozen, the adapters trainable.
    Returns our names of the adapted layers."""
    if r < 1:
        raise ValueError(f"the rank must be 1 or more, not {r}")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    mode = getattr(model, "lora_mode", None) or Mode()
    model.lora_mode = mode
    scaling = alpha / (math.sqrt(r) if rslora else r)
    names = []
    for name, owner, attr in targets_of(model, targets):
        setattr(owner, attr, LoRALinear(getattr(owner, attr), r, scaling, dropout, mode, passes))
        names.append(name)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "targets": list(targets),
                         "use_rslora": rslora}
    return names


def adapters(model) -> dict[str, LoRALinear]:
    """{our module name: LoRALinear} of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model, out_dir: str | Path, base_model: str | None = None) -> None:
    """adapter_config.json and adapter_model.safetensors, as peft writes them for transformers'
    model: each tensor under both module paths of the stack (an adapter of both passes)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.lora_config
    state = {}
    for name, m in adapters(model).items():
        for p in m.lora_A:
            for pass_, prefix in PATHS.items():
                if p not in (BOTH, pass_):
                    continue
                key = f"{PEFT_PREFIX}{prefix}{name}"
                state[key + ".lora_A.weight"] = m.lora_A[p].detach().float().cpu().clone()  # a copy a path
                state[key + ".lora_B.weight"] = m.lora_B[p].detach().float().cpu().clone()
    modules = "|".join(cfg["targets"])
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": cfg["r"],
              "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"], "bias": "none",
              "target_modules": rf"model\.(decoder|encoder\.language_model)\.layers\.\d+\.(self_attn|mlp)\.({modules})",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": cfg["use_rslora"], "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


KEY = re.compile(r"^(?:base_model\.model\.)?(model\.decoder\.|model\.encoder\.language_model\.)"
                 r"(layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json, {our module name: {pass: {"A": tensor, "B": tensor}}}); CheckpointError
    for a directory that is not a LoRA adapter this can apply."""
    from safetensors.torch import load_file
    path = Path(path)
    files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} is not an adapter: it has no {' and no '.join(missing)}")
    try:
        cfg = json.loads(files[0].read_text())
        state = load_file(files[1])
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: the adapter files cannot be read ({str(e).splitlines()[0]}); write them again") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is a {cfg.get('peft_type')} adapter; only LoRA adapters are applied here")
    for key, unsupported in (("use_dora", True), ("bias", None), ("modules_to_save", None)):
        v = cfg.get(key)
        if (key == "bias" and v not in (None, "none")) or (key != "bias" and v):
            raise CheckpointError(f"{path}: {key} = {v!r} is not supported here (plain LoRA only)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported here")
    weights: dict = {}
    for key, t in state.items():
        m = KEY.match(key)
        if m is None:
            raise CheckpointError(f"{path}: {key} is not a LoRA weight of the language model's attention or dense "
                                  "MLP; this adapter is for another model or other modules")
        pass_ = "canvas" if m.group(1) == PATHS["canvas"] else "causal"
        weights.setdefault(m.group(2), {}).setdefault(pass_, {})[m.group(3)] = t
    return cfg, weights


def load_adapter(model, path: str | Path) -> list[str]:
    """Apply the adapter at path to the model (in place, not merged). An adapter whose two module
    paths hold the same tensors applies to both passes; otherwise each pass gets its own.
    CheckpointError, naming what does not fit, for an adapter of another model."""
    cfg, weights = read_adapter(path)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    ours = {name: (owner, attr) for name, owner, attr in targets_of(model)}
    for name, per_pass in weights.items():
        if name not in ours:
            raise CheckpointError(f"adapter {path} does not fit the model: it adapts {name}, which the model does "
                                  "not have; use the base it was trained on")
        for p in per_pass.values():
            if set(p) != {"A", "B"}:
                raise CheckpointError(f"adapter {path}: {name} has lora_{'B' if 'A' in p else 'A'} missing")
    same = all(set(pp) == set(PATHS) and all(torch.equal(pp["canvas"][k], pp["causal"][k]) for k in "AB")
               for pp in weights.values())
    passes = (BOTH,) if same else tuple(PATHS)
    mode = getattr(model, "lora_mode", None) or Mode()
    model.requires_grad_(False)
    model.lora_mode = mode
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    for name, per_pass in weights.items():
        owner, attr = ours[name]
        base = getattr(owner, attr)
        layer = LoRALinear(base, r, scaling, 0.0, mode, passes)
        for p in layer.lora_A:
            src = per_pass.get("canvas" if p == BOTH else p)
            if src is None:  # a pass this adapter leaves alone
                del layer.lora_A[p], layer.lora_B[p]
                continue
            if tuple(src["A"].shape) != (r, layer.in_features) or tuple(src["B"].shape) != (layer.out_features, r):
                raise CheckpointError(f"adapter {path} does not fit the model: {name} is {layer.out_features} x "
                                      f"{layer.in_features} here, the adapter's A {list(src['A'].shape)} and B "
                                      f"{list(src['B'].shape)} (rank {r}); use the base it was trained on")
            with torch.no_grad():
                layer.lora_A[p].copy_(src["A"])
                layer.lora_B[p].copy_(src["B"])
        setattr(owner, attr, layer)
    if not same:
        with_adapter(model)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": float(cfg.get("lora_dropout") or 0.0),
                         "targets": sorted({n.rsplit(".", 1)[1] for n in weights}),
                         "use_rslora": bool(cfg.get("use_rslora"))}
    return sorted(weights)


@torch.no_grad()
def merge_adapter(model) -> None:
    """Fold every adapter into its layer's weight (W + scaling B A, in fp32, back to W's dtype) and
    put the plain layer back: the model no longer knows it had an adapter."""
    for name, owner, attr in targets_of(model):
        layer = getattr(owner, attr)
        if not isinstance(layer, LoRALinear):
            continue
        if not isinstance(layer.base, nn.Linear):
            raise CheckpointError("a quantized base cannot take a merged adapter: merge into the bf16 checkpoint")
        if BOTH not in layer.lora_A:
            raise CheckpointError("this adapter has separate weights for the two passes; one weight stack cannot "
                                  "hold both merged: apply it unmerged (--adapter)")
        w = layer.base.weight
        w.copy_((w.float() + layer.delta().to(w.device)).to(w.dtype))
        setattr(owner, attr, layer.base)
    model.__dict__.pop("lora_config", None)
