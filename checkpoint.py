"""Checkpoints of DiffusionGemma: find them, read their config and tensors, write them.

The layout is the one transformers 5.17.0 reads and writes for `google/diffusiongemma-26B-A4B-it`
(DiffusionGemmaForBlockDiffusion.save_pretrained): config.json with a nested text_config,
generation_config.json, safetensors shards with model.safetensors.index.json. The text stack is
stored once, under `model.decoder.*`; transformers ties the encoder and lm_head to it, so only the
30 encoder `layer_scalar` buffers are stored again. The vision tower (`model.encoder.vision_tower.*`,
`model.encoder.embed_vision.*`) is read only when an image is given (load_vision).

Every problem with a checkpoint is a CheckpointError whose message names the file and what to do
(hfconfig.py reads and checks the two JSON files); a device that cannot be used is a DeviceError,
never blamed on the files.

    import tempfile; from checkpoint import load_model, save_checkpoint; from hfconfig import read_generation_config
    model = load_model("weights-code", device="cpu")     # a directory, or a Hugging Face repo id
    settings = read_generation_config("weights-code", model.config.eos_token_id)
    save_checkpoint(model, tempfile.mkdtemp() + "/copy", generation=settings)
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hfconfig import CheckpointError, config_to_hf, generation_config_to_hf, read_config, read_json
from model import DiffusionGemma, DiffusionGemmaConfig

if TYPE_CHECKING:  # quant.py and vision.py are imported where a checkpoint needs them
    from vision import Vision, VisionConfig

PREFIX = "model.decoder."  # where the checkpoint keeps the shared text stack
ENCODER_SCALAR = "model.encoder.language_model.layers.{}.layer_scalar"  # untied buffer copies
VISION_PREFIX = "model.encoder."  # + vision_tower.* and embed_vision.*: the tensor names of vision.Vision

# ---------------------------------------------------------------------------------------------
# Locating a checkpoint
# ---------------------------------------------------------------------------------------------

def hf_cache_dirs() -> list[Path]:
    """Where the Hugging Face cache may be, in the order huggingface_hub looks."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str, weights: bool = True) -> Path | None:
    """The snapshot of repo_id in the local Hugging Face cache (refs/main first, else the newest);
    with weights, only one that holds them (not one fetched for its configs alone)."""
    def complete(snap: Path) -> bool:
        return (snap / "config.json").exists() and (not weights or any(snap.glob("*.safetensors")))

    for base in hf_cache_dirs():
        repo = base / ("models--" + repo_id.replace("/", "--"))
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file() and complete(snaps / ref.read_text().strip()):
            return snaps / ref.read_text().strip()
        candidates = sorted((p for p in snaps.iterdir() if complete(p)), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


HERE = Path(__file__).resolve().parent  # the bundled models (weights/, weights-code/) sit beside this file
WEIGHT_FILES = ["*.safetensors"]
CONFIG_FILES = ["*.json", "tokenizer*", "*.jinja"]  # everything but the weights: configs, tokenizer, template


def resolve_checkpoint(model: str | Path, weights: bool = True) -> Path:
    """A local directory (a relative one that is not in the working directory is looked for beside
    this file, where the bundled models are), or a Hugging Face repo id found in the cache or
    downloaded. weights=False: a download fetches only the configs, tokenizer and template."""
    name = str(model)
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute() and (HERE / path).exists():
        path = HERE / path
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file; give a checkpoint directory or a Hugging Face repo id")
        return path
    if not (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        raise CheckpointError(f"{name} does not exist: give a checkpoint directory or a Hugging Face repo id")
    cached = find_in_hf_cache(name, weights)
    if cached is not None:
        return cached
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{name} is not in the local Hugging Face cache and huggingface_hub is not installed: "
            f"`pip install huggingface_hub`, or `hf download {name} --local-dir DIR` and use DIR") from None
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=CONFIG_FILES + WEIGHT_FILES * weights))
    except Exception as e:  # network, auth, unknown repo: one line, what to do
        raise CheckpointError(f"could not download {name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "download it yourself and use the directory") from None


# ---------------------------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------------------------

class DeviceError(Exception):
    """A device that cannot be used (not there, no driver, unknown name); the message says what to do."""


def open_device(device: str | torch.device) -> torch.device:
    """The device, checked before any weight is read: known to torch, present, and usable."""
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {str(device)!r}: use cuda, cuda:N, cpu or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError("CUDA is not available: this torch is a CPU build; install a CUDA build of torch, "
                              "or use --device cpu")
        if not torch.cuda.is_available():
            try:
                torch.cuda.init()
                why = "no GPU found"
            except Exception as e:  # the driver's own words
                why = str(e).splitlines()[0].rstrip(".")
            raise DeviceError(f"CUDA is not available: {why}; use --device cpu, or check the NVIDIA driver")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("MPS is not available on this machine: use --device cpu")
    try:
        torch.empty(1, device=device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise DeviceError(f"cannot use {device}: {str(e).splitlines()[0]}") from None
    return device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the device; a failure there is the device's (out of memory passes through as it is)."""
    try:
        return t.to(device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise DeviceError(f"cannot move the weights to {device}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------

def weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index} has no valid weight_map; download it again")
        for shard in sorted(set(wm.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / shard} (listed in {index.name}) is missing; download it again")
        return {name: path / shard for name, shard in wm.items()}
    if single.is_file():
        from safetensors import safe_open
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:
            raise unreadable(single, e) from None
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def unreadable(file: Path, e: Exception) -> CheckpointError:
    """The error for a safetensors file that cannot be read."""
    return CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; download it again")


def build_on_meta(config: DiffusionGemmaConfig, dtype: torch.dtype) -> DiffusionGemma:
    """The network with no memory behind it; quantized modules swapped in where config says so."""
    with torch.device("meta"):
        net = DiffusionGemma(config).to(dtype)
        if config.quantization:
            from quant import convert_for_runtime  # only for a quantized checkpoint
            convert_for_runtime(net, config.quantization)
    return net


def load_model(model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               sharding=None, config: DiffusionGemmaConfig | None = None) -> DiffusionGemma:
    """Build the model from a checkpoint, tensor by tensor, straight onto `device` in `dtype`.

    Only the text stack under `model.decoder.*` is read (the encoder copies are tied to it; the vision
    tower is load_vision's). Peak host memory stays near one tensor: each is opened from its shard and
    moved to the device before the next is read. sharding (distributed.Sharding) reshapes the network
    for one rank first (sharding.prepare(net)) and then reads only that rank's slice of each tensor
    (sharding.read(name, safe_slice) -> tensor, or None for a tensor every rank holds whole).
    config: the checkpoint's config.json, when it was read already.
    """
    path = resolve_checkpoint(model)
    config = config or read_config(path)
    dtype = dtype or config.torch_dtype()
    device = open_device(device)
    net = build_on_meta(config, dtype)
    if sharding is not None:
        sharding.prepare(net)
    read_into(net, path, PREFIX, dtype, device, sharding)
    return net.eval().requires_grad_(False)


def read_into(net: torch.nn.Module, path: Path, prefix: str, dtype, device, sharding=None) -> None:
    """Every tensor of net's (meta) state dict from the checkpoint, named prefix + its key, shard by shard."""
    from safetensors import safe_open
    wmap = weight_map(path)
    expected = {name: t for name, t in net.state_dict().items()}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if prefix + name not in wmap:
            where = next(iter(wmap.values())).name if len(set(wmap.values())) == 1 else "the shards"
            raise CheckpointError(f"tensor {prefix + name} is missing from {where} in {path}; "
                                  "the checkpoint is incomplete or not DiffusionGemma; download it again")
        by_file.setdefault(wmap[prefix + name], []).append(name)
    state = {}
    for file, names in by_file.items():
        try:
            f = safe_open(file, framework="pt", device="cpu")
        except Exception as e:
            raise unreadable(file, e) from None
        with f:
            for name in names:
                state[name] = read_tensor(f, file, name, expected[name], dtype, device, sharding=sharding, prefix=prefix)
    net.load_state_dict(state, assign=True, strict=True)


def read_tensor(f, file: Path, name: str, want: torch.Tensor, dtype, device, *, sharding=None,
                prefix: str = PREFIX) -> torch.Tensor:
    """One tensor (or this rank's slice of it), checked against the network's meta tensor: what goes
    wrong reading it is the file's fault, what goes wrong moving it is the device's."""
    full_name = prefix + name
    try:
        sl = f.get_slice(full_name)
        full = tuple(sl.get_shape())
        t = sharding.read(name, sl) if sharding is not None else None
        if t is None and full == tuple(want.shape):
            t = f.get_tensor(full_name)
    except Exception as e:
        raise unreadable(file, e) from None
    if t is None:
        raise CheckpointError(f"tensor {full_name} in {file} has shape {list(full)}, "
                              f"expected {list(want.shape)} from config.json; download it again")
    if tuple(t.shape) != tuple(want.shape):
        raise CheckpointError(f"tensor {full_name} in {file} has shape {list(full)}, which does not split into "
                              f"this rank's {list(want.shape)}; download it again")
    if want.is_floating_point() != t.is_floating_point() or (not want.is_floating_point() and want.dtype != t.dtype):
        raise CheckpointError(f"tensor {full_name} in {file} is {t.dtype}, expected "
                              f"{'a floating-point type' if want.is_floating_point() else want.dtype}; "
                              "download it again")
    if want.is_floating_point():
        t = t.to(want.dtype if name.endswith("_scale") else dtype)
    t = to_device(t, device)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"tensor {full_name} in {file} holds NaN or infinite values; download it again")
    return t


def vision_config(path: Path, config: DiffusionGemmaConfig) -> "VisionConfig":
    """The checkpoint's vision tower config; a CheckpointError when it has no tower (the tensors
    decide: a text-only checkpoint written here names the smallest tower but stores none)."""
    d = config.passthrough.get("vision_config")
    if not d or not any(k.startswith(VISION_PREFIX + "vision_tower.") for k in weight_map(path)):
        raise CheckpointError(f"{path} has no vision tower (no {VISION_PREFIX}vision_tower.* tensors), so it cannot "
                              "take images: use a checkpoint that has one, such as google/diffusiongemma-26B-A4B-it")
    if config.image_token_id is None or not 0 <= config.image_token_id < config.vocab_size:
        raise CheckpointError(f"{path}/config.json: image_token_id {config.image_token_id} is not one of the model's "
                              f"{config.vocab_size} tokens, so it cannot take images")
    from vision import VisionConfig  # the tower's files: only for a prompt with images
    try:
        return VisionConfig.from_hf(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: vision_config: {e}; this tower is not supported") from None


def load_vision(model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "Vision":
    """The vision tower and its embedder (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`),
    read only when an image is given; whole on every rank under torchrun (0.55B parameters)."""
    path = resolve_checkpoint(model)
    config = read_config(path)
    vc = vision_config(path, config)
    dtype = dtype or config.torch_dtype()
    device = open_device(device)
    from vision import Vision
    with torch.device("meta"):
        net = Vision(vc, config.hidden_size).to(dtype)
    read_into(net, path, VISION_PREFIX, dtype, device)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged_directory(out_dir: str | Path, force: bool = False):
    """Yield an empty temporary directory beside out_dir; on success it becomes out_dir (replacing
    it when force), on any failure it is removed: a reader never sees a half-written directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors make private files: the usual modes
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ShardWriter:
    """Safetensors shards of at most max_shard_bytes (one tensor may exceed it), written as tensors
    arrive, so that only the shard being filled is held; then the index. The names and layout
    transformers writes: model.safetensors alone, or model-0000i-of-0000n.safetensors + index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max_bytes = Path(out_dir), max_shard_bytes
        self.current, self.size, self.files, self.index, self.total = {}, 0, [], {}, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.size + n > self.max_bytes:
            self.flush()
        self.current[name] = t.detach().contiguous().cpu()
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file
        if self.current:
            fname = f"part-{len(self.files) + 1:05d}.safetensors"
            save_file(self.current, self.out_dir / fname, metadata={"format": "pt"})
            self.files.append(fname)
            self.index.update({k: fname for k in self.current})
            self.current, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.out_dir / self.files[0], self.out_dir / "model.safetensors")
            return
        names = {f: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in names.items():
            os.replace(self.out_dir / old, self.out_dir / new)
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": {k: names[v] for k, v in self.index.items()}},
            indent=2) + "\n")


def checkpoint_tensors(net: DiffusionGemma, vision: "Vision | None" = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for net (and a vision tower), under their checkpoint names."""
    tensors = {PREFIX + k: v for k, v in net.state_dict().items()}
    for i, layer in enumerate(net.layers):
        tensors[ENCODER_SCALAR.format(i)] = layer.layer_scalar.detach().clone()
    if vision is not None:
        tensors.update({VISION_PREFIX + k: v for k, v in vision.state_dict().items()})
    return tensors


def save_checkpoint(net: DiffusionGemma, out_dir: str | Path, max_shard_bytes: int = 16 * 2 ** 20,
                    generation=None, extra_files: list[Path] = (), force: bool = False, *,
                    vision: "Vision | None" = None, dtype: torch.dtype | None = None) -> None:
    """Write a checkpoint directory (config.json, safetensors, the generation_config.json of
    `generation` (sampler.GenerationSettings) if given, copies of extra_files) in the layout
    transformers reads and writes, atomically (staged_directory). vision: a tower to store with it
    (net.config must then name its image tokens: image_token_id, and boi/eoi in passthrough).
    dtype: the floating-point tensors cast to it as they are written (the model is left as it is)."""
    config = net.config if dtype is None else dataclasses.replace(net.config, dtype=str(dtype).removeprefix("torch."))
    hf = config_to_hf(config)
    if vision is not None:
        hf["vision_config"] = {"model_type": "gemma4_vision", **dataclasses.asdict(vision.config)}
    with staged_directory(out_dir, force) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)
        for name, t in checkpoint_tensors(net, vision).items():
            shards.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        shards.close()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config_to_hf(generation), indent=2) + "\n")
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
