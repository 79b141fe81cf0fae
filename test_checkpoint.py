"""Checkpoints: config.json in every layout transformers writes, round trips, the Hugging Face cache,
atomic writes, and a corrupted download in many shapes: each is one line naming the file and what to
do (exit 1), with no traceback and nothing written."""

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

import generate
from checkpoint import load_model, resolve_checkpoint, save_checkpoint, staged_directory
from conftest import test_config
from hfconfig import CheckpointError, config_from_hf, config_to_hf, read_config
from model import DiffusionGemmaConfig

HERE = Path(__file__).resolve().parent
BUNDLED = HERE / "weights-code"  # two shards and an index: every file a download holds


def test_config_reads_both_layouts():
    base = {"model_type": "diffusion_gemma", "canvas_length": 32, "eos_token_id": [1, 106],
            "text_config": {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}}
    released = dict(base, text_config=dict(base["text_config"], global_head_dim=32, num_global_key_value_heads=1))
    c = config_from_hf(released)
    assert (c.layer_head_dim(5), c.layer_kv_heads(5), c.layer_head_dim(0), c.layer_kv_heads(0)) == (32, 1, 16, 2)
    newer = dict(base, text_config=dict(base["text_config"], global_head_dim=None, num_global_key_value_heads=None,
                                        per_layer_config={"5": {"head_dim": 32, "num_key_value_heads": 1}}))
    c2 = config_from_hf(newer)
    assert (c2.layer_head_dim(5), c2.layer_kv_heads(5), c2.layer_head_dim(4)) == (32, 1, 16)
    # transformers 5.17 writes an empty per_layer_config (and no globals) when the full layers use the
    # sliding layers' sizes; nulls without per_layer_config mean the same
    for text in (dict(base["text_config"], per_layer_config={}),
                 dict(base["text_config"], global_head_dim=None, num_global_key_value_heads=None)):
        c3 = config_from_hf(dict(base, text_config=text))
        assert (c3.layer_head_dim(5), c3.layer_kv_heads(5)) == (16, 2)
    # absent globals: transformers' defaults, head_dim 512 and the sliding layers' kv heads
    c4 = config_from_hf(base)
    assert (c4.layer_head_dim(5), c4.layer_kv_heads(5)) == (512, 2)
    assert c.eos_token_id == [1, 106] and config_from_hf(dict(base, eos_token_id=1)).eos_token_id == [1]
    with pytest.raises(CheckpointError, match="'llama'"):
        config_from_hf({"model_type": "llama"})


@pytest.mark.parametrize("name", ["26b-a4b", "small", "sudoku-6", "test-b", "test-c"])
def test_config_round_trip(name):
    cfg = test_config(name) if name.startswith("test") else DiffusionGemmaConfig.from_name(name)
    back = config_from_hf(config_to_hf(cfg))
    for i in range(cfg.num_hidden_layers):
        assert (back.layer_head_dim(i), back.layer_kv_heads(i)) == (cfg.layer_head_dim(i), cfg.layer_kv_heads(i))
    assert back.layer_types == cfg.layer_types and back.canvas_length == cfg.canvas_length


@pytest.mark.parametrize("name,folder", [("small", "weights-code"), ("sudoku-6", "weights")])
def test_the_named_sizes_are_the_bundled_configs(name, folder):
    """model.CONFIGS says what the bundled config.json files say, field for field."""
    bundled = dataclasses.replace(read_config(HERE / folder), passthrough={})  # its vision_config stays in the file
    assert bundled == DiffusionGemmaConfig.from_name(name)


def test_released_shape():
    c = DiffusionGemmaConfig()
    assert c.layer_types.count("full_attention") == 5 and c.layer_head_dim(29) == 512 and c.layer_kv_heads(29) == 2
    assert c.layer_head_dim(0) == 256 and c.layer_kv_heads(0) == 8 and c.eos_token_id == [1, 106]


def test_save_load_round_trip_sharded(tmp_path):
    model = load_model(BUNDLED)
    save_checkpoint(model, tmp_path / "copy", max_shard_bytes=2 ** 20)
    files = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 5
    again = load_model(tmp_path / "copy")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileExistsError):  # never over an existing directory without force
        save_checkpoint(model, tmp_path / "copy")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_staged_directory_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "out", force=True) as d:
            (d / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old.txt").exists()
    with staged_directory(tmp_path / "out", force=True) as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]


def test_repo_id_found_in_hf_cache(tmp_path, monkeypatch):
    """A repo id is looked up in HF_HUB_CACHE (models--ORG--NAME/snapshots/<rev>/, refs/main)."""
    repo = tmp_path / "hub" / "models--someone--tiny-diffusiongemma"
    shutil.copytree(BUNDLED, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("someone/tiny-diffusiongemma") == repo / "snapshots" / "abc123"
    with pytest.raises(CheckpointError, match="someone/absent-model"):
        resolve_checkpoint("someone/absent-model")


# ---- a corrupted download, in many shapes ----------------------------------------------------

def read_header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def retensor(shard: int, change):
    """Rewrite one tensor's header entry of shard 1 or 2."""
    def apply(d: Path):
        f = d / f"model-0000{shard}-of-00002.safetensors"
        header, data = read_header(f)
        name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
        change(header[name])
        write_header(f, header, data)
    return apply


def truncate(shard: int, where):
    def apply(d: Path):
        f = d / f"model-0000{shard}-of-00002.safetensors"
        raw = f.read_bytes()
        f.write_bytes(raw[: where(raw)])
    return apply


def edit_json(name: str, change):
    def apply(d: Path):
        f = d / name
        obj = json.loads(f.read_text())
        change(obj)
        f.write_text(json.dumps(obj))
    return apply


def write_text(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def header_len(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def set_text(key, value):
    return edit_json("config.json", lambda c: c["text_config"].__setitem__(key, value))


def bigger_tokenizer(d: Path):
    from data import train_tokenizer
    (d / "tokenizer.json").unlink()
    train_tokenizer(["a b c d e f g " * 50, "hello world " * 40] * 40, 9000, d / "tokenizer.json")
    tok = json.loads((d / "tokenizer.json").read_text())
    for i in range(8300):  # more tokens than the model's 8,192
        tok["model"]["vocab"][f"<x{i}>"] = len(tok["model"]["vocab"])
    (d / "tokenizer.json").write_text(json.dumps(tok))


CASES = {  # name: (damage, what the one line must name)
    **{f"shard{s}-truncated-{name}": (truncate(s, where), f"model-0000{s}-of-00002.safetensors")
       for s in (1, 2) for name, where in (("empty", lambda r: 0), ("in-length", lambda r: 5),
                                           ("in-header", lambda r: header_len(r) // 2),
                                           ("after-header", header_len), ("mid-data", lambda r: (header_len(r) + len(r)) // 2),
                                           ("last-byte", lambda r: len(r) - 1))},
    "header-length-huge": (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(
        struct.pack("<Q", 2 ** 40) + (d / "model-00001-of-00002.safetensors").read_bytes()[8:]), "model-00001-of-00002"),
    "header-length-short": (lambda d: (d / "model-00002-of-00002.safetensors").write_bytes(
        struct.pack("<Q", 16) + (d / "model-00002-of-00002.safetensors").read_bytes()[8:]), "model-00002-of-00002"),
    "header-json-garbage": (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(
        (lambda r: r[:20] + b"\xff\xfe{{" + r[24:])((d / "model-00001-of-00002.safetensors").read_bytes())),
        "model-00001-of-00002"),
    "dtype-wider": (retensor(1, lambda t: t.__setitem__("dtype", "F32")), "model-00001-of-00002"),
    "dtype-integer": (retensor(2, lambda t: t.__setitem__("dtype", "I16")), "model-00002-of-00002"),
    "shape-transposed": (retensor(1, lambda t: t.__setitem__("shape", t["shape"][::-1])), "model-00001-of-00002"),
    "shape-smaller": (retensor(2, lambda t: t.__setitem__("shape", [t["shape"][0] - 1, t["shape"][1]])),
                      "model-00002-of-00002"),
    "offsets-shifted": (retensor(1, lambda t: t.__setitem__("data_offsets", [o + 2 for o in t["data_offsets"]])),
                        "model-00001-of-00002"),
    "offsets-beyond-end": (retensor(2, lambda t: t.__setitem__("data_offsets", [t["data_offsets"][0], 10 ** 9])),
                           "model-00002-of-00002"),
    "nan-in-weights": (lambda d: (d / "model-00002-of-00002.safetensors").write_bytes(
        (lambda r: r[: header_len(r)] + b"\xff\xff" * 8 + r[header_len(r) + 16:])(
            (d / "model-00002-of-00002.safetensors").read_bytes())), "model-00002-of-00002"),
    "index-missing-shard": (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002"),
    "index-missing-tensor": (edit_json("model.safetensors.index.json", lambda i: i["weight_map"].pop(
        "model.decoder.layers.1.experts.down_proj")), "model.decoder.layers.1.experts.down_proj"),
    "index-not-json": (write_text("model.safetensors.index.json", "{\"weight_map\": "), "model.safetensors.index.json"),
    "index-no-weight-map": (write_text("model.safetensors.index.json", "{\"weights\": {}}"), "model.safetensors.index.json"),
    "config-not-json": (write_text("config.json", "{\"model_type\": "), "config.json"),
    "config-not-object": (write_text("config.json", "[1, 2]"), "config.json"),
    "config-other-model": (edit_json("config.json", lambda c: c.__setitem__("model_type", "gemma4")), "config.json"),
    "config-no-text-config": (edit_json("config.json", lambda c: c.pop("text_config")), "config.json"),
    "config-size-string": (set_text("hidden_size", "256"), "config.json"),
    "config-size-negative": (set_text("num_hidden_layers", -6), "config.json"),
    "config-size-zero": (set_text("vocab_size", 0), "config.json"),
    "config-size-float": (set_text("intermediate_size", 512.5), "config.json"),
    "config-heads-do-not-split": (set_text("num_key_value_heads", 3), "config.json"),
    "config-top-k-too-large": (set_text("top_k_experts", 99), "config.json"),
    "config-layer-types-length": (set_text("layer_types", ["full_attention"] * 3), "config.json"),
    "config-layer-type-unknown": (set_text("layer_types", ["sliding_attention"] * 5 + ["global"]), "config.json"),
    "config-last-layer-sliding": (set_text("layer_types", ["full_attention"] + ["sliding_attention"] * 5), "config.json"),
    "config-size-disagrees-with-weights": (set_text("intermediate_size", 256), "model-0000"),
    "config-dtype-unknown": (edit_json("config.json", lambda c: c.__setitem__("dtype", "bfloat8")), "config.json"),
    "generation-zero-steps": (edit_json("generation_config.json", lambda g: g.__setitem__("max_denoising_steps", 0)),
                              "generation_config.json"),
    "generation-negative-bound": (edit_json("generation_config.json", lambda g: g["sampler_config"].__setitem__(
        "entropy_bound", -1.0)), "generation_config.json"),
    "generation-temperatures-reversed": (edit_json("generation_config.json", lambda g: g.update(t_min=0.9, t_max=0.3)),
                                         "generation_config.json"),
    "generation-no-new-tokens": (edit_json("generation_config.json", lambda g: g.__setitem__("max_new_tokens", 0)),
                                 "generation_config.json"),
    "generation-eos-string": (edit_json("generation_config.json", lambda g: g.__setitem__("eos_token_id", "eos")),
                              "generation_config.json"),
    "generation-not-json": (write_text("generation_config.json", "{"), "generation_config.json"),
    "tokenizer-not-json": (write_text("tokenizer.json", "{\"model\": "), "tokenizer.json"),
    "tokenizer-missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer-too-big": (bigger_tokenizer, "tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_checkpoint_is_one_line(case, tmp_path, capsys):
    change, named = CASES[case]
    d = shutil.copytree(BUNDLED, tmp_path / "ckpt")
    change(d)
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))
    rc = generate.run(["--model", str(d), "--device", "cpu", "--quiet", "--max-new-tokens", "4", "--steps", "1", "x"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert named in lines[0], lines[0]
    assert any(w in lines[0] for w in ("download it again", "use ", "give ", "fix it")), lines[0]
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.slow
def test_corruption_through_the_command_line(tmp_path):
    """The same, as a user runs it: exit 1, one line, no traceback."""
    import subprocess
    import sys
    d = shutil.copytree(BUNDLED, tmp_path / "ckpt")
    truncate(1, lambda r: header_len(r) + 100)(d)
    p = subprocess.run([sys.executable, "generate.py", "--model", str(d), "x"], cwd=HERE, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "truncated or corrupted" in p.stderr, p.stderr
