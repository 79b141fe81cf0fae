"""DiffusionGemma over HTTP for editors and apps: the OpenAI API, llama.cpp's /infill, and canvases
streamed as they refine. The standard library's http.server, no framework: this file is the server
(routes, bodies, server-sent events, the command line); api.py the wire formats; batcher.py the
worker that owns the model.

  GET  /                      a page: a prompt (or a text with a <FILL> gap), the canvas refining, the text
  GET  /health, /v1/models
  POST /v1/chat/completions   messages (system, user, assistant, tool), tools, thinking, n, seed, stop,
                              max_tokens, stream (server-sent events, data: [DONE])
  POST /v1/completions        a raw prompt; with `suffix`, the gap between prompt and suffix is filled
  POST /infill                llama.cpp's: input_prefix, input_suffix, input_extra, prompt, n_predict
Every request may carry a "diffusion" object: steps, entropy_bound, pins {offset: text}, template
(text whose holes `_` are filled, the rest pinned), stream_canvas (an `event: diffusion.canvas` after
every denoising step), cache_prompt. A request's seed (default: a random one, returned as
system_fingerprint) gives the same text whether it ran alone or in a batch.

    python -m server --model weights-code --port 8000
    python -m server --model google/diffusiongemma-26B-A4B-it --host 0.0.0.0 --api-key SECRET
"""

import argparse
import http.server
import json
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from server.api import Api, ApiError, field, fingerprint, merge_done, tool_calls
from server.batcher import Batcher, Request
from checkpoint import DeviceError
from generate import choose_fast_path, load
from hfconfig import CheckpointError
from sampler import RequestError
from terminal import Parser, device_name, positive

PAGE = Path(__file__).resolve().parent / "page.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOG_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: the route, the body read and checked, the reply (JSON, or server-sent events)."""
    protocol_version = "HTTP/1.1"
    service: Api = None  # set by main()
    max_body = 4 << 20
    routes = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/infill": "infill"}

    def log_message(self, format, *args):  # noqa: A002 (http.server's name) - replaced by log_line
        pass

    def log_line(self, status: int, tokens: int = 0) -> None:
        ms = (time.perf_counter() - getattr(self, "t0", time.perf_counter())) * 1e3
        with LOG_LOCK:  # one whole line at a time: requests end on several threads at once
            sys.stderr.write(f"{self.command} {self.path} {status} tokens={tokens} ms={ms:.0f}\n")
            sys.stderr.flush()

    def send_error(self, code, message=None, explain=None):  # http.server's own errors (a bad request line)
        """An error http.server itself finds (a malformed request line or header), as the JSON error
        object every other reply uses, not its HTML page."""
        self.t0 = time.perf_counter()
        self.command, self.path = getattr(self, "command", None) or "-", getattr(self, "path", None) or "-"
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # a line too broken to name its version
            self.request_version = "HTTP/1.0"  # still answered with a status line and headers
        self.close_connection = True
        try:
            self.send(code, ApiError(code, message or "bad request", kind="invalid_request_error").body(),
                      headers=[("Connection", "close")])
        except OSError:
            return
        self.log_line(code)

    def send(self, status: int, body: dict | str, content_type: str = "application/json", headers=()) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.t0 = time.perf_counter()
        s, path = self.service, self.path.split("?")[0]
        if path == "/":
            self.send(200, PAGE.read_text(encoding="utf-8"), "text/html; charset=utf-8")
        elif path == "/health":
            self.send(200, {"status": "ok", "model": s.name, "queued": s.batcher.queue.qsize()})
        elif path == "/v1/models" and self.authorized():
            self.send(200, {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                                        "owned_by": "diffusiongemma"}]})
        elif path != "/v1/models":
            self.send(404, ApiError(404, f"no such path {path}", kind="not_found").body())
        self.log_line(200 if path in ("/", "/health", "/v1/models") else 404)

    def authorized(self) -> bool:
        key = self.service.api_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key is None or secrets.compare_digest(given.encode(), key.encode()):
            return True
        self.send(401, ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                kind="authentication_error").body())
        return False

    def read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise ApiError(411, "send the body with a Content-Length")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if n > self.max_body:
            raise ApiError(413, f"the body has {n} bytes; at most {self.max_body}")
        try:
            raw = self.rfile.read(n)
        except (socket.timeout, TimeoutError):
            raise ApiError(408, "the body did not arrive in time") from None
        if len(raw) < n:
            raise ApiError(400, "the body is shorter than its Content-Length")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:  # JSON may escape half of a UTF-16 pair ("\\udcff"): that is no text a tokenizer can read
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"the body holds {e.object[e.start:e.end].encode('unicode_escape').decode()}, half "
                           "of a UTF-16 surrogate pair, which is not text: send whole characters") from None
        return body

    def do_POST(self):
        self.t0 = time.perf_counter()
        route = self.routes.get(self.path.split("?")[0])
        try:
            if route is None:
                raise ApiError(404, f"no such path {self.path}", kind="not_found")
            if not self.authorized():
                return self.log_line(401)
            body = self.read_json()
            try:
                reqs, how = getattr(self.service, route)(body)
            except RequestError as e:  # a template or pin that cannot be used as given
                raise ApiError(400, str(e), "diffusion" if route != "chat" else "messages") from None
            for i, req in enumerate(reqs):
                if not self.service.batcher.submit(req):
                    for queued in reqs[:i]:
                        queued.cancel()
                    self.send(503, ApiError(503, "the queue is full: try again shortly", kind="overloaded").body(),
                              headers=[("Retry-After", "1")])
                    return self.log_line(503)
            if field(body, "stream", bool, False):
                return self.stream(reqs, how, bool(field(body, "stream_options", dict, {}).get("include_usage")))
            done = self.service.wait(reqs)
            self.send(200, self.service.reply(reqs, how, done))
            return self.log_line(200, sum(map(len, done["tokens"])))
        except ApiError as e:
            self.send(e.status, e.body(), headers=[("Connection", "close")] if e.status in (408, 411, 413) else ())
            self.close_connection = e.status in (408, 411, 413)
            self.log_line(e.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: one request fails with a 500, the server goes on
            self.send(500, ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())
            self.log_line(500)

    def event(self, data, name: str | None = None) -> None:
        self.wfile.write(((f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n").encode())
        self.wfile.flush()

    def stream(self, reqs: list[Request], how: dict, include_usage: bool) -> None:
        """Server-sent events: a chunk per committed canvas (what the text gained), a canvas event
        per step when asked, the finish reasons, then data: [DONE]. A client that leaves stops its rows."""
        s, kind, req = self.service, how["kind"], reqs[0]
        choices = sum(r.n for r in reqs)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = {"chat": "chat.completion.chunk", "completion": "text_completion"}.get(kind)
        head = {"id": how["id"], "object": obj, "created": int(time.time()), "model": s.name,
                "system_fingerprint": fingerprint(req.seed)}
        hold = max((len(x) for x in how["stops"]), default=1) - 1  # what could still turn into a stop string
        sent = [["", ""] for _ in range(choices)]  # per choice: content, reasoning sent so far

        def delta(i, parts, final):
            text, thought = parts["content"], parts["reasoning"] or ""
            keep = len(text) if final else max(len(sent[i][0]), len(text) - hold)
            d = {}
            if text[:keep].startswith(sent[i][0]) and keep > len(sent[i][0]):
                d["content"], sent[i][0] = text[len(sent[i][0]): keep], text[:keep]
            if thought.startswith(sent[i][1]) and len(thought) > len(sent[i][1]):
                d["reasoning_content"], sent[i][1] = thought[len(sent[i][1]):], thought
            return d

        def chunk(i, d, finish=None):
            if kind == "infill":
                return self.event({"content": d.get("content", ""), "stop": finish is not None})
            piece = {"index": i, "delta": d, "finish_reason": finish} if kind == "chat" else \
                {"index": i, "text": d.get("content", ""), "logprobs": None, "finish_reason": finish}
            self.event({**head, "choices": [piece]})

        try:
            if kind == "chat":
                for i in range(choices):
                    chunk(i, {"role": "assistant", "content": ""})
            dones = []
            while True:
                ev, payload = req.events.get()
                if ev == "canvas":
                    self.event({**payload, "text": s.tok.decode(payload["tokens"])}, "diffusion.canvas")
                elif ev == "text":
                    d = delta(payload["choice"], s.text_of(payload["tokens"], how, False, payload["choice"]), False)
                    if d:
                        chunk(payload["choice"], d)
                elif ev == "error":
                    self.event(ApiError(payload["status"], payload["message"], kind="server_error").body())
                    break
                elif ev == "done":
                    dones.append(payload)
                    for i, tokens in enumerate(payload["tokens"], start=payload.get("first", 0)):
                        parts = s.text_of(tokens, how, True, i)
                        d = delta(i, parts, True)
                        if parts["calls"]:
                            d["tool_calls"] = tool_calls(parts["calls"])
                        if d:
                            chunk(i, d)
                        chunk(i, {}, parts["finish"])
                    if len(dones) < len(reqs):
                        continue
                    done = merge_done(dones)
                    if include_usage and kind != "infill":
                        self.event({**head, "choices": [], "usage": s.usage(reqs, done, how)})
                    self.log_line(200, sum(map(len, done["tokens"])))
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            for r in reqs:
                r.cancel()  # the worker stops these rows at the next step
            self.log_line(499)


class Server(http.server.ThreadingHTTPServer):
    """One thread a connection; the worker thread does the generating."""
    daemon_threads = True
    allow_reuse_address = True


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The line printed at start when the server listens beyond this machine with no key."""
    if host in LOOPBACK or api_key:
        return None
    return f"warning: listening on {host} without --api-key: anyone who reaches it can use the model"


def port_number(s: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {s}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The command line of python -m server."""
    p = Parser(prog="python -m server",
               description="Serve DiffusionGemma over HTTP: the OpenAI API, llama.cpp's /infill, a page.")
    p.add_argument("--model", default="weights-code", help="checkpoint directory or Hugging Face repo id "
                   "(default: the bundled code model)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (finetune.py's, or PEFT's) applied to the model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API")
    p.add_argument("--batch-size", type=positive(int), default=8, help="rows generated at once (default 8)")
    p.add_argument("--queue", type=positive(int), default=64, help="requests that may wait; more get 503 (default 64)")
    p.add_argument("--batch-wait", type=float, default=0.02, help="seconds a batch waits for more requests (0.02)")
    p.add_argument("--cache-mb", type=int, default=1024, help="memory for cached prompts, MiB (default 1024)")
    p.add_argument("--max-tokens", type=positive(int), default=4096, help="the most new tokens a request may ask")
    p.add_argument("--max-body", type=positive(int), default=4 << 20, help="largest request body, bytes (default 4 MiB)")
    p.add_argument("--timeout", type=positive(float), default=30.0, help="seconds a connection may take to send (30)")
    p.add_argument("--device", type=device_name, help="cuda, cuda:N, cpu or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (auto: the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--kernels", choices=["auto", "cuda", "torch"],
                   help="torch (default): plain PyTorch; cuda: the CUDA kernels; auto: cuda where possible")
    return p


def main(args: argparse.Namespace) -> int:
    import sudoku
    try:
        model, tok = load(args.model, args.device, args.dtype, adapter=args.adapter)
    except (CheckpointError, DeviceError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if sudoku.shape_of(tok):
        print(f"error: {args.model} is a Sudoku model, not a model of text: serve --model weights-code", file=sys.stderr)
        return 2
    fast, line = choose_fast_path(model, args.kernels or "torch", cuda_graph=False)
    if args.kernels is None:
        line = "kernels: torch (the default; --kernels auto takes the CUDA kernels where they run)"
    batcher = Batcher(model, args.batch_size, args.queue, args.cache_mb << 20, fast=fast,
                      wait=args.batch_wait)
    Handler.service = Api(model, tok, str(args.model), batcher, args.api_key, args.max_tokens)
    Handler.max_body, Handler.timeout = args.max_body, args.timeout
    try:
        server = Server((args.host, args.port), Handler)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror}; choose another --port", file=sys.stderr)
        return 1
    if exposure_warning(args.host, args.api_key):
        print(exposure_warning(args.host, args.api_key), file=sys.stderr)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]} ({line})", file=sys.stderr, flush=True)
    http = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http.start()
    try:
        batcher.loop()  # the model runs in the main thread: on a CPU, torch uses every core only there
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
