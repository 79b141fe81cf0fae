"""Shared test fixtures: the test shapes, tiny DiffusionGemma checkpoints written by transformers, and
tokenizers.

The checkpoints have every feature of the released model (sliding and full layers, K = V and
proportional RoPE on the full layers, dense MLP + MoE, self-conditioning, a stand-in vision tower
that text-only runs never read; vision_ckpt a real one) at the sizes of TEST_CONFIGS["test-*"], which run in milliseconds on a CPU.
"""

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hfconfig import MINIMAL_VISION_CONFIG, config_to_hf, generation_config_to_hf
from data import train_tokenizer
from model import CONFIGS, RELEASED_EOS, DiffusionGemmaConfig
from sampler import GenerationSettings

HERE = Path(__file__).resolve().parent
# test-only files that are not part of the project (a Gemma 4 tokenizer.json and the released chat
# templates): the folder DIFFUSIONGEMMA_FIXTURES names, with gemma4-tokenizer/ and gemma4-chat-templates/;
# the tests that need them skip without it
FIXTURES = Path(os.environ.get("DIFFUSIONGEMMA_FIXTURES") or HERE / "no-fixtures")
GEMMA4_TOKENIZER = FIXTURES / "gemma4-tokenizer" / "tokenizer.json"
TEMPLATES = FIXTURES / "gemma4-chat-templates"
needs_gemma4 = pytest.mark.skipif(not GEMMA4_TOKENIZER.exists(),
                                  reason="no Gemma 4 tokenizer: set DIFFUSIONGEMMA_FIXTURES to run this test")

GENERATION_CONFIG = generation_config_to_hf(GenerationSettings())  # the released model's defaults

_TEST_A = dict(vocab_size=300, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, global_head_dim=32, num_global_key_value_heads=1, intermediate_size=96, num_experts=8,
               top_k_experts=2, moe_intermediate_size=32, sliding_window=16, canvas_length=16)
# the shapes the tests build, each a handful of milliseconds on a CPU
TEST_CONFIGS = {
    "tiny": dict(CONFIGS["tiny"], dtype="float32"),
    # parity: A has a prompt longer than its window and many canvases; B another layer pattern, head
    # sizes and routing; C full layers with the sliding layers' head size and KV heads
    "test-a": _TEST_A,
    "test-b": dict(vocab_size=320, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=12, global_head_dim=24, num_global_key_value_heads=2, intermediate_size=80, num_experts=6,
                   top_k_experts=3, moe_intermediate_size=16, sliding_window=24, canvas_length=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "test-c": dict(_TEST_A, global_head_dim=None, num_global_key_value_heads=None, canvas_length=8),
    "test-kernels": CONFIGS["tiny-kernels"],  # the shapes the CUDA kernels take
}


# a vision tower of odd sizes (the released one: 27 layers, 1152 wide, 16 heads of 72, patch 16), and
# its image processor settings (the released: 280 soft tokens of 3x3 patches of 16 pixels)
TEST_VISION = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=12, patch_size=4, pooling_kernel_size=3,
                   position_embedding_size=256, standardize=True)
TEST_PROCESSOR = dict(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)
IMAGE_TOKENS = {"<|image>": 300, "<|image|>": 301, "<image|>": 302}  # added after the tiny tokenizer's 300
# a chat format that takes images (content parts), as the released template writes them
IMAGE_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|image|>{% else %}"
                  "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


@contextlib.contextmanager
def threads(n: int):
    """torch's CPU thread count set to n inside the block. transformers' CPU generation can change with
    the thread count (its tokens at two threads differ from its tokens at one from the third canvas of
    test_parity's seed 1); ours does not (test_parity checks it at 1, 2 and 4). So every comparison of
    whole generations runs transformers at one thread, on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_config(name: str, **overrides) -> DiffusionGemmaConfig:
    """One of TEST_CONFIGS, with fields overridden."""
    return DiffusionGemmaConfig(**{**TEST_CONFIGS[name], **overrides})


test_config.__test__ = False  # a helper, not a test


def build_hf_model(name: str, seed: int = 0, vision: bool = False):
    """A transformers DiffusionGemmaForBlockDiffusion of TEST_CONFIGS[name] with random weights, every
    norm and scalar perturbed too so that a mix-up of any two of them shows. vision: a tower of
    TEST_VISION's sizes (else the smallest one, which the text never uses), image tokens IMAGE_TOKENS."""
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion
    ours = test_config(name)
    images = dict(boi_token_id=IMAGE_TOKENS["<|image>"], image_token_id=IMAGE_TOKENS["<|image|>"],
                  eoi_token_id=IMAGE_TOKENS["<image|>"]) if vision else {}
    cfg = HFConfig(vision_config=dict(TEST_VISION if vision else MINIMAL_VISION_CONFIG), eos_token_id=list(RELEASED_EOS),
                   canvas_length=ours.canvas_length, text_config=config_to_hf(ours)["text_config"], **images)
    torch.manual_seed(seed)
    hf = DiffusionGemmaForBlockDiffusion(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.03))
        for i, layer in enumerate(hf.model.decoder.layers):  # the two copies are equal, as released
            layer.layer_scalar.uniform_(0.7, 1.3)
            hf.model.encoder.language_model.layers[i].layer_scalar.copy_(layer.layer_scalar)
        if vision:  # positions that differ by place, and a standardisation that does something
            tower = hf.model.encoder.vision_tower
            tower.patch_embedder.position_embedding_table.normal_(0, 0.5)
            tower.patch_embedder.input_proj.weight.normal_(0, 0.1)
            tower.std_bias.normal_(0, 0.5)
            tower.std_scale.uniform_(0.5, 1.5)
    return hf


def write_hf_checkpoint(name: str, path: Path, seed: int = 0, vision: bool = False):
    """Save build_hf_model(name) with transformers; return transformers' model read back from it.
    vision: with the tower, transformers' image processor settings and a tokenizer that knows the
    image tokens."""
    hf = build_hf_model(name, seed, vision)
    hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    tiny_tokenizer_json(path, 300)  # every checkpoint a user downloads has one
    if vision:
        from tokenizers import AddedToken, Tokenizer
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
        Gemma4ImageProcessorPil(**TEST_PROCESSOR).save_pretrained(path)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
        assert [tok.token_to_id(t) for t in IMAGE_TOKENS] == list(IMAGE_TOKENS.values())
        tok.save(str(path / "tokenizer.json"))
        (path / "chat_template.jinja").write_text(IMAGE_TEMPLATE)
    # the reference reads the very files we read (generation_config.json included)
    return type(hf).from_pretrained(path, dtype=torch.float32).eval()


def tiny_tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE over a little English and Python, with the special tokens at ids 0-3."""
    text = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 3,
            "for i in range(10):\n    print(i)\n"] * 20
    train_tokenizer(text, vocab_size, path / "tokenizer.json")
    return path / "tokenizer.json"


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_a")
    return path, write_hf_checkpoint("test-a", path)


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_b")
    return path, write_hf_checkpoint("test-b", path, seed=1)


@pytest.fixture(scope="session")
def ckpt_c(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_c")
    return path, write_hf_checkpoint("test-c", path, seed=4)


@pytest.fixture(scope="session")
def vision_ckpt(tmp_path_factory):
    """test-b with a vision tower of TEST_VISION's sizes, as transformers writes it."""
    pytest.importorskip("PIL")
    path = tmp_path_factory.mktemp("ckpt_vision")
    return path, write_hf_checkpoint("test-b", path, seed=6, vision=True)


@pytest.fixture(scope="session")
def chat_free_ckpt(tmp_path_factory):
    """test-b plus a tiny tokenizer (vocab 300 of the model's 320, no chat markers): runs the CLI end to end."""
    path = tmp_path_factory.mktemp("ckpt_cli")
    write_hf_checkpoint("test-b", path, seed=2)
    return path


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A checkpoint whose tokenizer is the Gemma 4 one (vocab 262,144, so the model is wide but
    shallow): the chat format with real ids, end to end."""
    if not GEMMA4_TOKENIZER.exists():
        pytest.skip("no Gemma 4 tokenizer: set DIFFUSIONGEMMA_FIXTURES to run this test")
    from checkpoint import save_checkpoint
    from model import DiffusionGemma, init_weights
    path = tmp_path_factory.mktemp("ckpt_chat") / "ckpt"
    cfg = test_config("tiny", vocab_size=262144, hidden_size=16, intermediate_size=16, moe_intermediate_size=16,
                      head_dim=8, global_head_dim=8, eos_token_id=list(RELEASED_EOS), max_position_embeddings=4096)
    save_checkpoint(init_weights(DiffusionGemma(cfg), std=0.5, seed=0), path, max_shard_bytes=2 ** 30,
                    generation=GenerationSettings(), extra_files=[GEMMA4_TOKENIZER])
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# a chat format of the code model's own: the bundled tokenizer has none (CI has no Gemma 4 files)
CODE_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def random_fillings(lay, n: int, seed: int = 0):
    """n canvases with every free position filled by a random token of its set."""
    import random
    rng = random.Random(seed)
    for _ in range(n):
        yield [t if t is not None else rng.choice(lay.sets[lay.free[j]]) for j, t in enumerate(lay.tokens)]


# ---- running the programs: the command line in a subprocess or in this process, torchrun --------

def cli(*args, cwd=HERE, timeout=180, env=None):
    """python generate.py ARGS in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
    return p.returncode, p.stdout, p.stderr


def in_process(capsys, *args):
    """generate.run(ARGS) in this process (quicker): (exit code, stdout, stderr)."""
    import generate
    rc = generate.run([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, code, *needles):
    """A user's mistake: exit `code`, no traceback, one line `error: ...` holding every needle."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, err


DIST_ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))


def torchrun(*args, n=2, timeout=120):
    """torchrun --nproc-per-node n ARGS (gloo on the CPU), each rank one thread."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                           str(29500 + os.getpid() % 1000), *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=DIST_ENV)


def single(*args):
    """python generate.py ARGS in one process, as the torchrun ranks are set up."""
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          timeout=120, env=DIST_ENV)


def default_ctrl_c():
    """Popen's preexec_fn for a child the tests stop with SIGINT: Ctrl-C's default action in the child, as at a
    terminal. A shell starts its background jobs with SIGINT ignored, and an ignored signal stays ignored across exec,
    so tests started that way would otherwise wait on a child that never hears it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """The server (python -m server) in a subprocess on a free loopback port; its stderr collected line by line."""

    def __init__(self, model, *flags):
        self.p = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model), "--port", "0",
                                   "--device", "cpu", *map(str, flags)], cwd=HERE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"), preexec_fn=default_ctrl_c)
        self.lines, first = [], self.p.stderr.readline()
        assert "serving" in first, first + self.p.stderr.read()
        self.port = int(first.split("http://127.0.0.1:")[1].split()[0])
        threading.Thread(target=lambda: self.lines.extend(iter(self.p.stderr.readline, "")), daemon=True).start()

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=kw.pop("api_key", "none"),
                             max_retries=0, **kw)

    def post(self, path, body, headers=None, raw=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else json.dumps(body).encode()
        c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        c.close()
        return out[0], out[1], json.loads(out[2]) if out[2] else None

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            return self.p.wait(timeout=30)
        finally:
            self.p.kill()


class Chrome:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, exe: str):
        r_in, self.w = os.pipe()
        self.r, w_out = os.pipe()

        def fds():
            a, b = os.dup(r_in), os.dup(w_out)  # out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.p = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                   "--window-size=1000,900", "--hide-scrollbars", "about:blank"], preexec_fn=fds,
                                  close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r_in)
        os.close(w_out)
        self.n, self.buf, self.session = 0, b"", None

    def send(self, method, params=None, session=True):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                self.buf += os.read(self.r, 1 << 20)
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:
                return reply["result"]

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Page.navigate", {"url": url})

    def eval(self, js):
        return self.send("Runtime.evaluate", {"expression": js, "returnByValue": True})["result"].get("value")

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self):
        self.p.kill()
        self.p.wait()
