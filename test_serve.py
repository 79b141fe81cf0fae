"""The server (python -m server) as its clients meet it, on 127.0.0.1: the official openai client (chat and completions,
streamed and not, suffix, n, stop), tool calls through the Gemma 4 template, llama.vim's /infill
payload and warm-up, the page in headless Chromium, 16 concurrent clients each given its solo
answer, the prefix cache, a client that leaves mid-stream, a full queue, an API key, NaN logits,
Ctrl-C, and a hundred malformed or hostile requests after which the server still serves."""

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import CODE_TEMPLATE, TEMPLATES, Chrome, Server, needs_gemma4

pytestmark = pytest.mark.slow  # every test here starts programs

HERE = Path(__file__).resolve().parent
openai = pytest.importorskip("openai")
@pytest.fixture(scope="module")
def code_ckpt(tmp_path_factory):
    d = shutil.copytree(HERE / "weights-code", tmp_path_factory.mktemp("serve") / "code")
    (d / "chat_template.jinja").write_text(CODE_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def server(code_ckpt):
    s = Server(code_ckpt, "--batch-size", 16, "--timeout", 2, "--max-body", 65536)
    yield s
    s.stop()


def test_chat_and_completions_with_the_openai_client(server, code_ckpt):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [str(code_ckpt)]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    one = client.chat.completions.create(model="x", messages=msgs, max_tokens=24, seed=7)
    assert one.object == "chat.completion" and one.choices[0].finish_reason in ("stop", "length")
    assert one.usage.prompt_tokens > 5 and one.usage.completion_tokens <= 24
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=msgs, max_tokens=24, seed=7, stream=True) if c.choices)
    assert text == one.choices[0].message.content  # streamed = whole, for the same seed
    done = client.completions.create(model="x", prompt="import os\n", max_tokens=40, seed=3)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt="import os\n", max_tokens=40, seed=3, stream=True, stream_options={"include_usage": True})
        if c.choices)
    assert streamed == done.choices[0].text and len(done.choices[0].text) > 0
    two = client.completions.create(model="x", prompt="import os\n", max_tokens=16, seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == done.choices[0].text[: len(two.choices[0].text)]
    cut = done.choices[0].text[5:9]  # a stop string that the text holds: the text ends before it
    stopped = client.completions.create(model="x", prompt="import os\n", max_tokens=40, seed=3, stop=[cut])
    assert stopped.choices[0].text == done.choices[0].text.split(cut)[0] and stopped.choices[0].finish_reason == "stop"


def test_suffix_fills_the_gap_as_infill_does(server, code_ckpt):
    """The gap is filled with the suffix pinned after it: what generate.infill gives for the seed."""
    import generate
    client = server.client()
    prompt, suffix = "def area(w, h):\n    return ", "\n\nprint(area(2, 3))\n"
    got = client.completions.create(model="x", prompt=prompt, suffix=suffix, max_tokens=8, seed=11)
    model, tok = generate.load(code_ckpt, "cpu", torch.float32)
    want = generate.infill(model, tok, prompt + "<FILL>" + suffix, fill_length=8, seed=11)
    assert got.choices[0].text == want and got.usage.completion_tokens <= 8


LLAMA_VIM = {"id_slot": 0, "input_prefix": "import os\n\ndef main():\n", "input_suffix": "\n\nif __name__ == '__main__':\n",
             "input_extra": [{"filename": "util.py", "text": "def helper(x):\n    return x + 1\n"}],
             "prompt": "    path = ", "n_predict": 128, "n_indent": 4, "top_k": 40, "top_p": 0.90,
             "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
             "t_max_predict_ms": 1000, "response_fields": ["content", "timings/*", "truncated", "tokens_cached"]}


def test_infill_takes_llama_vims_payload(server):
    status, _, warm = server.post("/infill", dict(LLAMA_VIM, n_predict=0))  # its warm-up primes the cache
    assert status == 200 and warm["content"] == ""
    status, _, r = server.post("/infill", dict(LLAMA_VIM, n_predict=16))
    assert status == 200 and isinstance(r["content"], str) and r["truncated"] is False
    assert r["tokens_cached"] >= r["tokens_evaluated"] - 1 and r["timings"]["predicted_n"] <= 16
    assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"} <= set(r["timings"])


def test_infill_at_the_top_of_a_file_and_its_timings(server, code_ckpt):
    """An empty prefix (and an empty warm-up) is answered as llama.cpp answers it: a gap after
    <bos>; the same text generate.infill gives; prompt_ms is measured, not 0."""
    import generate
    status, _, warm = server.post("/infill", {"input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0})
    assert status == 200 and warm["content"] == "", warm
    status, _, r = server.post("/infill", {"input_prefix": "", "prompt": "", "input_suffix": "\nprint(1)\n",
                                           "n_predict": 8, "seed": 5})
    model, tok = generate.load(code_ckpt)
    assert status == 200 and r["content"] == generate.infill(model, tok, "<FILL>\nprint(1)\n", fill_length=8, seed=5)
    assert r["timings"]["prompt_ms"] > 0 and r["timings"]["predicted_ms"] > 0


def test_completion_prompt_forms(server, code_ckpt):
    """OpenAI's forms of `prompt`: a list of strings, token ids, lists of token ids. Each prompt gets
    what it gets alone with the same seed; prompt k's choices are k * n ... k * n + n - 1."""
    import generate
    client = server.client()
    model, tok = generate.load(code_ckpt)
    alone = [client.completions.create(model="x", prompt=p, max_tokens=8, seed=4, n=2) for p in ("a = ", "def g(")]
    both = client.completions.create(model="x", prompt=["a = ", "def g("], max_tokens=8, seed=4, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [c.text for r in alone for c in r.choices]
    assert both.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    ids = tok.encode_raw("a = ")
    by_ids = client.completions.create(model="x", prompt=ids, max_tokens=8, seed=4, n=2)
    assert [c.text for c in by_ids.choices] == [c.text for c in alone[0].choices]
    many = client.completions.create(model="x", prompt=[ids, tok.encode_raw("def g(")], max_tokens=8, seed=4, n=2)
    assert [c.text for c in many.choices] == [c.text for c in both.choices]
    streamed = {}
    for c in client.completions.create(model="x", prompt=["a = ", "def g("], max_tokens=8, seed=4, n=2, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(4)] == [c.text for c in both.choices]


def test_temperature_scales_the_schedule_and_fields_it_cannot_honour_are_refused(server, code_ckpt):
    import generate
    client = server.client()
    model, tok = generate.load(code_ckpt)
    ids = tok.encode_raw("x = ")
    for t in (1, 0.5, 1.7):  # the command line's --temperature, the same text
        got = client.completions.create(model="x", prompt="x = ", max_tokens=12, seed=0, temperature=t)
        rc, out, err = subprocess_cli("--model", code_ckpt, "--raw", "--temperature", t, "--max-new-tokens", 12, "--quiet",
                                      "x = ")
        assert rc == 0 and out == "x = " + got.choices[0].text + "\n", err
    texts = {t: client.completions.create(model="x", prompt="x = ", max_tokens=12, seed=0, temperature=t).choices[0].text
             for t in (1, 0.5, 1.7)}
    assert len(set(texts.values())) > 1  # it does something
    s = generate.settings_for(model, temperature=0.5)
    assert (s.sampler.t_min, s.sampler.t_max) == (0.5 * model.generation_settings.sampler.t_min,
                                                  0.5 * model.generation_settings.sampler.t_max)
    for field_, value in (("top_p", 0.5), ("logprobs", 2), ("logit_bias", {"5": 1}), ("presence_penalty", 0.3),
                          ("temperature", 0)):
        status, _, body = server.post("/v1/completions", {"prompt": "x", "max_tokens": 4, field_: value})
        assert status == 400 and body["error"]["param"] == field_ and field_ in body["error"]["message"], body
    for field_, value in (("top_p", 1), ("logprobs", None), ("logit_bias", {}), ("presence_penalty", 0)):  # neutral
        status, _, body = server.post("/v1/completions", {"prompt": "x", "max_tokens": 4, field_: value})
        assert status == 200, body
    assert ids  # the prompt has tokens


def subprocess_cli(*args):
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_messages_that_point_somewhere(tmp_path):
    """Against the bundled code model (no chat format): chat completions name the endpoints that take
    plain text; a prompt too long is blamed on the prompt; a negative seed's fingerprint; a malformed
    request line is the JSON error object; /health names the model; a canvas event holds only the
    request's own positions."""
    s = Server("weights-code")
    try:
        status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and "/v1/completions" in body["error"]["message"] and "/infill" in body["error"]["message"]
        status, _, body = s.post("/v1/completions", {"prompt": "x " * 5000, "max_tokens": 8})
        assert status == 400 and body["error"]["param"] == "prompt", body
        status, _, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 4, "seed": -3})
        assert status == 200 and body["system_fingerprint"] == "seed-m3"
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"HELLO\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # the headers and the body may come in separate packets
            reply += chunk
        reply = reply.decode()
        sock.close()
        assert " 400 " in reply.split("\r\n")[0] and json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["message"]
        assert json.loads(s.get("/health")[1])["model"] == "weights-code"
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        c.request("POST", "/v1/completions", json.dumps({"prompt": "def f(", "suffix": ")\n", "max_tokens": 5,
                                                         "stream": True, "diffusion": {"stream_canvas": True}}))
        events = [json.loads(ln[6:]) for ln in c.getresponse().read().decode().splitlines()
                  if ln.startswith("data: {") and '"canvas"' in ln and '"step"' in ln]
        assert events and all(len(e["tokens"]) == 5 + 2 for e in events)  # the gap and the pinned ")\n"
    finally:
        assert s.stop() == 0
    assert not any("Traceback" in ln for ln in s.lines)
    assert all(ln.count(" ms=") <= 1 for ln in s.lines)  # one log line a request, never two run together


def test_the_readmes_client_example_runs_against_the_bundled_model():
    """server/README.md's client code, as written, against `python -m server --model weights-code`."""
    readme = (HERE / "server" / "README.md").read_text(encoding="utf-8")
    code = next(b for b in readme.split("```python")[1:] if "OpenAI(base_url=" in b).split("```")[0]
    s = Server("weights-code")
    try:
        exec(code.replace("127.0.0.1:8000", f"127.0.0.1:{s.port}"), {})
    finally:
        assert s.stop() == 0


def test_concurrent_clients_each_get_their_solo_answer(server):
    prompts = [f"def function_{i}(x, y):\n" + "    " * (i % 3) for i in range(16)]
    body = lambda i: {"prompt": prompts[i], "max_tokens": 24, "seed": 100 + i,  # noqa: E731
                      "diffusion": {"cache_prompt": False}}
    solo = [server.post("/v1/completions", body(i))[2] for i in range(16)]
    together = [None] * 16

    def ask(i):
        together[i] = server.post("/v1/completions", body(i))[2]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(t is not None for t in together)
    assert [t["choices"][0]["text"] for t in together] == [s["choices"][0]["text"] for s in solo]
    assert max(t["diffusion"]["rows_in_batch"] for t in together) > 1  # they really shared batches


def test_a_shared_prefix_is_read_once(server):
    prefix = (HERE / "sampler.py").read_text()[:3000]
    a = server.post("/v1/completions", {"prompt": prefix + "\n# one", "max_tokens": 8, "seed": 1})[2]
    b = server.post("/v1/completions", {"prompt": prefix + "\n# two", "max_tokens": 8, "seed": 1})[2]
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert a["usage"]["prompt_tokens"] > 500 and cached >= a["usage"]["prompt_tokens"] - 8
    assert b["usage"]["prompt_tokens"] - cached <= 8  # only the new tokens were read
    fresh = server.post("/v1/completions", {"prompt": prefix + "\n# two", "max_tokens": 8, "seed": 1,
                                            "diffusion": {"cache_prompt": False}})[2]
    assert fresh["choices"][0]["text"] == b["choices"][0]["text"]


def test_a_client_that_leaves_stops_its_rows(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "class Parser:\n", "max_tokens": 512, "stream": True, "seed": 2,
                       "diffusion": {"stream_canvas": True}}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"diffusion.canvas") < 3:
        got += s.recv(65536)
    s.close()  # mid-stream
    for _ in range(200):
        if any("cancelled" in ln for ln in server.lines):
            break
        time.sleep(0.1)
    line = next(ln for ln in server.lines if "cancelled" in ln)
    stopped_after = int(line.split("after canvas ")[1].split()[0])
    assert stopped_after < 16  # of the 16 canvases 512 tokens take
    assert server.get("/health")[0] == 200


def hostile_requests() -> list[tuple[str, bytes, dict]]:
    """(path, body, extra headers): each one a mistake a server must answer with a 4xx."""
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    cases = [("/v1/completions", b, {}) for b in (b"", b"{", b"[1, 2]", b"null", b"\xff\xfe", b'{"prompt": "a",}',
                                                 b'"just a string"', b"{'prompt': 'x'}", "{\"prompt\": \"ü\"".encode())]
    fields = {"prompt": [None, 5, [], {}, "", [["a"]], [1, "a"], [-1], [10 ** 9], ["a"] * 17, ["a", ""], [True]],
              "max_tokens": ["8", -1, 0, 10 ** 12, 1.5, True, [8]],
              "temperature": [0, -1, 3, "hot"], "top_p": [0.5, "x"], "logprobs": [2, True], "top_logprobs": [3],
              "logit_bias": [{"1": 5}], "presence_penalty": [1], "frequency_penalty": [-0.5], "best_of": [2],
              "seed": ["s", 1.5, 10 ** 30, []], "n": [0, 17, "2", -3], "stop": [5, ["a"] * 5, [""], [1]],
              "suffix": [5, []], "stream": ["yes", 1], "echo": ["no"], "diffusion": [5, "x", []],
              "model": []}
    for name, bad in fields.items():
        for v in bad:
            body = {"prompt": "def f():", "max_tokens": 8, name: v}
            if name == "model" or (name == "prompt" and v is None):
                body.pop(name)
                body["prompt"] = None
            cases.append(("/v1/completions", j(body), {}))
    ext = {"steps": [0, "3", 10 ** 9], "entropy_bound": [-1, "x"], "pins": [{"x": ")"}, {"1": 5}, {"999": ")"}],
           "template": [5, "no holes"], "stream_canvas": ["y"], "cache_prompt": [3]}
    for name, bad in ext.items():
        for v in bad:
            cases.append(("/v1/completions", j({"prompt": "def f():", "max_tokens": 8, "diffusion": {name: v}}), {}))
    chat = [None, [], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
            [{"content": "x"}], [1, 2], [{"role": "assistant", "content": None, "tool_calls": "x"}],
            [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
            [{"role": "user", "content": "x" * 100}] * 200]
    for m in chat:
        cases.append(("/v1/chat/completions", j({"messages": m, "max_tokens": 8}), {}))
    hi = [{"role": "user", "content": "hi"}]
    for name in ("max_tokens", "seed", "n", "stop", "stream", "diffusion"):  # the same fields on the chat endpoint
        for v in fields[name][:3]:
            cases.append(("/v1/chat/completions", j({"messages": hi, "max_tokens": 8, name: v}), {}))
    for v in (-5, "8", 10 ** 12):
        cases.append(("/v1/chat/completions", j({"messages": hi, "max_completion_tokens": v}), {}))
    for name, bad in {"input_suffix": [5, []], "prompt": [7, {}], "cache_prompt": ["yes"], "seed": ["z"],
                      "input_extra": ["x", [{"text": 5}]]}.items():
        for v in bad:
            cases.append(("/infill", j({"input_prefix": "def f():\n", name: v}), {}))
    cases.append(("/v1/completions", b"[" * 60000, {}))  # nesting deep enough to break a recursive parser
    # half of a UTF-16 surrogate pair: legal JSON, no text
    cases += [(path, b'{"prompt": "\\udcff", "input_prefix": "\\udcff", "messages": [{"role": "user", "content": '
                     b'"\\ud800"}]}', {}) for path in ("/v1/completions", "/infill", "/v1/chat/completions")]
    cases.append(("/v1/completions", j({"prompt": ["ünïcödé"] * 3, "max_tokens": 8, "n": 0}), {}))
    cases += [("/v1/chat/completions", j({"messages": [{"role": "user", "content": "hi"}], "tools": "x"}), {}),
              ("/v1/completions", j({"prompt": "x " * 9000, "max_tokens": 8}), {}),  # longer than the context
              ("/v1/completions", j({"prompt": "x", "max_tokens": 5000}), {}),  # more than --max-tokens
              ("/v1/completions", b"x" * 70000, {}),  # over --max-body
              ("/v1/completions", j({"prompt": "x"}), {"Transfer-Encoding": "chunked"}),
              ("/v1/completions", j({"prompt": "x"}), {"Content-Length": "abc"}),
              ("/v1/nothing", j({"prompt": "x"}), {}), ("/infill", j({"input_prefix": 5}), {}),
              ("/infill", j({"input_extra": [5]}), {}), ("/infill", j({"n_predict": "12"}), {}),
              ("/infill", j({"input_prefix": "x", "n_predict": 10 ** 9}), {}),
              ("/v1/completions", j({"prompt": "\u0000\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
                                     "max_tokens": "many"}), {})]
    return cases


def test_malformed_and_hostile_requests_get_4xx_and_the_server_goes_on(server):
    cases = hostile_requests()
    assert len(cases) >= 100
    for path, body, headers in cases:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.putrequest("POST", path)
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            c.putheader("Content-Length", str(len(body)))
        for k, v in headers.items():
            c.putheader(k, v)
        c.endheaders()
        c.send(body)
        r = c.getresponse()
        payload = r.read()
        c.close()
        assert 400 <= r.status < 500, (path, body[:80], r.status, payload[:200])
        assert "message" in json.loads(payload)["error"], payload
    for partial in (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\"",  # a short body
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"):  # headers that never end (slow loris)
        s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        s.sendall(partial)
        reply = s.recv(65536)  # the server gives up on it after --timeout (2 s), answered or not
        assert reply == b"" or b" 408 " in reply.split(b"\r\n")[0] or b" 400 " in reply.split(b"\r\n")[0], reply
        s.close()
    assert server.get("/health")[0] == 200
    status, _, ok = server.post("/v1/completions", {"prompt": "def f(x):", "max_tokens": 8, "seed": 0})
    assert status == 200 and ok["choices"][0]["text"]


def test_one_log_line_per_request(server):
    server.get("/health?mark=7f3a")
    server.post("/v1/completions?mark=7f3a", {"prompt": "x", "max_tokens": 4})
    time.sleep(0.3)
    mine = [ln for ln in server.lines if "mark=7f3a" in ln]
    assert mine[0].startswith("GET /health?mark=7f3a 200 ") and len(mine) == 2
    assert mine[1].startswith("POST /v1/completions?mark=7f3a 200 tokens=") and " ms=" in mine[1]


def test_the_page_in_chromium(server, tmp_path):
    """The page at / generates, redraws the canvas and shows the final text: the DOM holds the API's
    answer for the same seed, and the screenshot has dark (text) pixels where that text is."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (.ci/run installs Debian's)")
    from PIL import Image
    want = server.post("/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 16, "seed": 0})[2]
    chrome = Chrome(exe)
    try:
        chrome.open(f"http://127.0.0.1:{server.port}/?prompt=def%20add(a,%20b):&tokens=16&run=1")
        for _ in range(300):
            if chrome.eval("document.getElementById('result').dataset.done") == "1":
                break
            time.sleep(0.1)
        assert chrome.eval("document.getElementById('result').textContent") == "def add(a, b):" + want["choices"][0]["text"]
        assert chrome.eval("document.getElementById('status').textContent").startswith("done:")
        box = chrome.eval("JSON.stringify(document.getElementById('result').getBoundingClientRect())")
        shot = tmp_path / "page.png"
        chrome.screenshot(shot)
    finally:
        chrome.close()
    r = json.loads(box)
    area = Image.open(shot).convert("L").crop((int(r["left"]), int(r["top"]), int(r["right"]), int(r["bottom"])))
    assert sum(1 for p in area.getdata() if p < 100) > 200  # the text is drawn there


# ---- servers of their own --------------------------------------------------------------------

def test_api_key_full_queue_and_ctrl_c(code_ckpt):
    s = Server(code_ckpt, "--api-key", "sesame", "--queue", 1, "--batch-size", 1)
    try:
        assert s.get("/health")[0] == 200
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 4})[0] == 401
        assert s.client(api_key="sesame").completions.create(model="x", prompt="x", max_tokens=4).choices
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post(
            "/v1/completions", {"prompt": "def f():", "max_tokens": 96}, {"Authorization": "Bearer sesame"})))
            for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        codes = sorted(r[0] for r in results)
        assert 200 in codes and 503 in codes, codes
        assert all(r[1].get("Retry-After") == "1" for r in results if r[0] == 503)
    finally:
        assert s.stop() == 0
    assert any("stopped" in ln for ln in s.lines)


def test_nan_logits_fail_the_batch_and_the_server_goes_on(tmp_path):
    from checkpoint import load_model, save_checkpoint
    from hfconfig import read_generation_config
    model = load_model(HERE / "weights-code")
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1e38)  # finite weights; times the embedding scale, infinite
    save_checkpoint(model, tmp_path / "nan", generation=read_generation_config(HERE / "weights-code", [1]),
                    extra_files=[HERE / "weights-code" / "tokenizer.json"])
    s = Server(tmp_path / "nan")
    try:
        for _ in range(2):
            status, _, r = s.post("/v1/completions", {"prompt": "def f():", "max_tokens": 8})
            assert status == 500 and "non-finite logits" in r["error"]["message"]
        assert s.get("/health")[0] == 200
    finally:
        s.stop()


def test_exposure_warning():
    import server.__main__ as serve
    assert serve.exposure_warning("127.0.0.1", None) is None and serve.exposure_warning("0.0.0.0", "k") is None
    assert "without --api-key" in serve.exposure_warning("0.0.0.0", None)


# ---- the Gemma 4 chat format: tools, thinking ---------------------------------------------------

@pytest.fixture(scope="module")
def gemma_server(chat_ckpt, tmp_path_factory):
    d = shutil.copytree(chat_ckpt, tmp_path_factory.mktemp("gemma") / "c")
    shutil.copy(TEMPLATES / "canonical-2026-07.jinja", d / "chat_template.jinja")
    s = Server(d)
    yield s, d
    s.stop()


@needs_gemma4
def test_tool_calls_round_trip_through_the_template(gemma_server):
    from tokenizer import load_tokenizer
    s, d = gemma_server
    tok = load_tokenizer(d)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    client = s.client()
    r = client.chat.completions.create(model="x", messages=msgs, tools=tools, max_tokens=24, seed=0,
                                       extra_body={"diffusion": {"pins": {"0": call}}})
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.prompt_tokens == len(
        tok.apply_chat_template(msgs, tools=tools))
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                     {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model="x", messages=follow, tools=tools, max_tokens=8, seed=0)
    rendered = tok.render_chat(follow, tools=tools)
    assert "<|tool_response>response:get_weather{value:<|\"|>sunny, 21 C<|\"|>}<tool_response|>" in rendered
    assert again.usage.prompt_tokens == len(tok.encode(rendered))


@needs_gemma4
def test_thinking_comes_back_as_reasoning_content(gemma_server):
    s, _ = gemma_server
    thought = "<|channel>thought\nweighing it<channel|>"
    r = s.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                           seed=0, extra_body={"thinking": True, "diffusion": {"pins": {"0": thought}}})
    m = r.choices[0].message
    assert m.reasoning_content.startswith("weighing it") and "weighing" not in m.content
