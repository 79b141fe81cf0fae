"""The benchmark and the GPU check, on the CPU: bench.py writes each row as soon as it is measured (a
crash keeps what came before), and scripts/device_check.sh --dry-run runs every phase's CPU part
within the files a device run can bring back."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from scripts import bench

pytestmark = pytest.mark.slow  # every test here starts programs

HERE = Path(__file__).resolve().parent


def test_rows_are_written_as_they_come(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(bench, "bare_run_seconds", lambda: 1.5)
    calls = []
    real = bench.per_canvas_ours

    def crash_on_second(*a, **kw):  # the plain row is the second of ours on the CPU: fail it
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(bench, "parity", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("parity broke")))
    monkeypatch.setattr(bench, "per_canvas_ours", crash_on_second)
    args = bench.build_parser().parse_args(["--tiny", "--steps", "2", "--json", str(out), "--device", "cpu"])
    with pytest.raises(RuntimeError, match="parity broke"):
        bench.main(args)
    report = json.loads(out.read_text())
    assert [r["system"] for r in report["rows"]] == ["transformers 5.17.0", "ours, plain PyTorch"]
    assert report["floor_ms_per_step"] > 0 and report["rows"][0]["ms_per_step"] > 0 and calls


def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=HERE, capture_output=True, text=True,
                       timeout=900, env=env)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 0, summary + p.stderr[-2000:]
    for phase in ("env", "build", "unit", "micro", "model", "bench", "quant", "memory", "vision", "finetune"):
        assert f"{phase}: exit 0" in summary, summary
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and "logs.tgz" in files and "summary.txt" in files, files
    micro = json.loads((tmp_path / "out" / "micro.json").read_text())
    assert {"ceilings", "moe", "attention", "layer"} <= set(micro)
    bench_json = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["system"] for r in bench_json["rows"]] == ["transformers 5.17.0", "ours, plain PyTorch"]
    assert bench_json["parity"]["plain"]["committed_identical"]
    vision = json.loads((tmp_path / "out" / "bench_vision.json").read_text())
    assert [r["system"] for r in vision["rows"]] == ["vision tower, 1 image", "vision tower, 4 images"]
    assert all(r["max_abs_diff"] < 1e-4 and r["ms_per_image"] > 0 for r in vision["rows"])


def test_transformers_model_is_built_on_meta_then_once_on_the_device():
    """build_hf never holds the encoder's and the decoder's copies of the stack (101 GB at the released
    shape): the two paths share storage, and with the same weights the model gives what a model
    constructed directly gives, buffers included (the encoder's layer scalars copied from the decoder's)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from conftest import test_config
    cfg = test_config("test-b")
    hf = bench.build_hf(cfg, "cpu", torch.float32)
    enc, dec = hf.model.encoder.language_model, hf.model.decoder
    assert enc.layers[0].mlp.gate_proj.weight.data_ptr() == dec.layers[0].mlp.gate_proj.weight.data_ptr()
    assert hf.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()
    assert all(torch.equal(e.layer_scalar, d.layer_scalar) for e, d in zip(enc.layers, dec.layers))
    with bench.on_device("cpu", torch.float32):
        direct = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    direct.load_state_dict(hf.state_dict())
    for (name, a), (_, b) in zip(hf.named_buffers(), direct.named_buffers()):
        assert torch.equal(a, b), name
    prompt, canvas = torch.arange(3, 30)[None], torch.arange(40, 48)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=prompt, decoder_input_ids=canvas).logits,
                                   direct(input_ids=prompt, decoder_input_ids=canvas).logits, atol=0, rtol=0)


def test_device_check_reruns_one_phase(tmp_path):
    """PHASES=micro runs env and micro only (a second call in the same loan repeats what failed)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PHASES="micro")
    p = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=HERE, capture_output=True, text=True,
                       timeout=300, env=env)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 0, summary + p.stderr[-2000:]
    ran = [ln.split("] ", 1)[1].split(":")[0] for ln in summary.splitlines() if ": exit " in ln]
    assert ran == ["env", "build", "micro"], summary
