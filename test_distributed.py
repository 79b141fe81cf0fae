"""Tensor and expert parallelism on the CPU (gloo, 2 processes started by torchrun): the same tokens
as one process, each rank holding only its share of the weights, and one clear error when a rank fails."""

from pathlib import Path

import pytest

from conftest import single, torchrun

pytestmark = pytest.mark.slow  # every test here starts programs

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", ["a", "b"])  # a: 1 KV head on the full layers (kept whole on both ranks)
def test_two_ranks_generate_what_one_does(name, ckpt_a, ckpt_b, tmp_path):
    path = {"a": ckpt_a, "b": ckpt_b}[name][0]
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\ndef add(a, b):\n", encoding="utf-8")
    args = ["--model", path, "--device", "cpu", "--max-new-tokens", 20, "--steps", 4, "--seed", 3, "--batch-file", prompts]
    one, two = single(*args), torchrun("generate.py", *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and two.stdout.count("=== ") == 2
    closing = [ln for ln in two.stderr.splitlines() if "canvases" in ln]
    assert len(closing) == 1 and "GiB per rank" in closing[0]  # rank 0 alone speaks


SCRIPT = """
import json, sys, torch, torch.distributed as dist
import checkpoint, distributed

path, mode = sys.argv[1], sys.argv[2]
if mode == "fail":
    real = checkpoint.weight_map
    def broken(p):
        if dist.get_rank() == 1:
            raise checkpoint.CheckpointError(f"{p}/model-00002-of-00002.safetensors (listed in the index) is missing")
        return real(p)
    checkpoint.weight_map = broken
def load(sharding, device):
    return checkpoint.load_model(path, device, torch.float32, sharding=sharding), sharding
try:
    model, sharding = distributed.load_sharded(load, "cpu", checkpoint.CheckpointError)
except checkpoint.CheckpointError as e:
    print("error:", e, file=sys.stderr)
    distributed.finish(1)
except SystemExit as e:
    distributed.finish(e.code)
state = model.state_dict()
whole = sum(t.numel() * t.element_size() for n, t in state.items() if n not in sharding.slices)
with open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w") as f:  # one file a rank: stdout lines interleave
    json.dump({"rank": dist.get_rank(), "bytes": sum(t.numel() * t.element_size() for t in state.values()),
               "whole": whole}, f)
distributed.finish(0)
"""


def tensor_bytes(net) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def test_each_rank_holds_its_share(ckpt_b, tmp_path):
    from checkpoint import load_model
    script = tmp_path / "share.py"
    script.write_text(SCRIPT)
    p = torchrun(script, ckpt_b[0], "share", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = tensor_bytes(load_model(ckpt_b[0], "cpu", torch_float32()))
    for r in ranks:  # the split tensors are halved; the rest (norms, router, scalars) is held whole
        split = r["bytes"] - r["whole"]
        assert split * 2 <= total - r["whole"] + 1 and r["bytes"] <= total / 2 + r["whole"]
    assert len(ranks) == 2 and ranks[0]["whole"] < total / 10


def torch_float32():
    import torch
    return torch.float32


def test_a_failing_rank_stops_every_rank(ckpt_b, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(SCRIPT)
    p = torchrun(script, ckpt_b[0], "fail", tmp_path, timeout=90)
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith(("error:", "[rank"))]  # not the launcher's report
    assert p.returncode != 0 and not any("Traceback" in ln for ln in ours), p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: rank 1 of 2: {ckpt_b[0]}/model-00002-of-00002.safetensors (listed in the index) is missing"]
