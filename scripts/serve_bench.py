"""serve.py under load, on this machine: 1, 4 and 16 concurrent clients (aggregate tok/s, p50/p95
latency, time to the first streamed canvas), and the prefix cache (time to the first canvas after a
1,000-token prompt the server has not seen, against one that shares all but its last line).

Each client sends `--requests` streamed completions one after the other (64 new tokens, its own
prompt and seed); the server runs in a subprocess on a free loopback port. Everything is printed as
a table and written to the JSON file.

    python scripts/serve_bench.py --model weights-code --json /tmp/serve_bench.json
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CANVAS = "--no-canvas" not in sys.argv


def start(model: str, batch_size: int) -> tuple[subprocess.Popen, int]:
    """The server (python -m server) on a free loopback port: the process and its port."""
    p = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--port", "0", "--batch-size",
                          str(batch_size), "--device", "cpu"], cwd=HERE, stderr=subprocess.PIPE, text=True)
    first = p.stderr.readline()
    if "serving" not in first:
        raise SystemExit(f"error: the server did not start: {first}{p.stderr.read()}")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # drain its log
    return p, int(first.split("http://127.0.0.1:")[1].split()[0])


def streamed(port: int, body: dict, canvas: bool = True) -> dict:
    """One streamed completion: seconds to the first canvas event (canvas=False: to the first text,
    the first committed canvas) and to the end, tokens received."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({**body, "stream": True, "stream_options": {"include_usage": True},
                                                      "diffusion": {**body.get("diffusion", {}), "stream_canvas": canvas}}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    first, tokens = None, 0
    for line in r:
        if first is None and (line.startswith(b"event: diffusion.canvas") or (not canvas and b'"text"' in line)):
            first = time.perf_counter() - t0
        elif line.startswith(b"data: {") and b'"usage"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    c.close()
    return {"first_canvas": first, "seconds": time.perf_counter() - t0, "tokens": tokens}


def concurrency(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each streaming `requests` completions one after another: aggregate tok/s,
    latency percentiles, time to the first canvas."""
    out, lock = [], threading.Lock()

    def client(k: int):
        for j in range(requests):
            r = streamed(port, {"prompt": f"def task_{k}_{j}(items):\n    result = []\n", "max_tokens": max_tokens,
                                "seed": 1000 * k + j, "diffusion": {"cache_prompt": False}}, CANVAS)
            with lock:
                out.append(r)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["seconds"] for r in out)
    return {"clients": clients, "requests": len(out), "tokens": sum(r["tokens"] for r in out), "seconds": wall,
            "tok_s": sum(r["tokens"] for r in out) / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "first_canvas_p50_s": statistics.median(r["first_canvas"] for r in out)}


def prefix_cache(port: int, tokens: int, trials: int) -> dict:
    """Time to the first canvas: a long prompt seen for the first time, then the same prompt with
    another last line (the cache holds all but that line)."""
    code = (HERE / "sampler.py").read_text() + (HERE / "model.py").read_text()
    miss, hit = [], []
    for t in range(trials):
        prefix = f"# file {t}\n" + code[t * 997: t * 997 + tokens * 4]  # about 4 characters a token
        miss.append(streamed(port, {"prompt": prefix + "\n# first", "max_tokens": 32, "seed": t})["first_canvas"])
        hit.append(streamed(port, {"prompt": prefix + "\n# second", "max_tokens": 32, "seed": t})["first_canvas"])
    return {"prefix_tokens_about": tokens, "trials": trials, "miss_first_canvas_s": statistics.median(miss),
            "hit_first_canvas_s": statistics.median(hit), "ratio": statistics.median(hit) / statistics.median(miss)}


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/serve_bench.py."""
    p = argparse.ArgumentParser(description="The server under load: concurrency and the prefix cache.")
    p.add_argument("--model", default="weights-code", help="checkpoint (default: the bundled code model)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens a request (default 64)")
    p.add_argument("--trials", type=int, default=3, help="prefix-cache trials (default 3)")
    p.add_argument("--json", default="serve_bench.json", help="where to write the results")
    p.add_argument("--no-canvas", action="store_true", help="clients stream text only (no event per step)")
    return p


def main(args: argparse.Namespace) -> int:
    server, port = start(args.model, batch_size=16)
    results = {"machine": "cpu", "model": args.model, "concurrency": []}
    try:
        streamed(port, {"prompt": "warm up", "max_tokens": 8})
        print("| clients | requests | aggregate tok/s | p50 latency | p95 latency | first canvas, p50 |\n|---|---|---|---|---|---|")
        for clients in (1, 4, 16):
            r = concurrency(port, clients, args.requests, args.max_tokens)
            results["concurrency"].append(r)
            print(f"| {clients} | {r['requests']} | {r['tok_s']:.0f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | "
                  f"{r['first_canvas_p50_s']:.2f} s |", flush=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
        base = results["concurrency"][0]["tok_s"]
        results["four_vs_one"] = results["concurrency"][1]["tok_s"] / base
        pc = results["prefix_cache"] = prefix_cache(port, 1000, args.trials)
        print(f"4 clients vs 1: {results['four_vs_one']:.2f}x the aggregate tok/s; 16 vs 1: "
              f"{results['concurrency'][2]['tok_s'] / base:.2f}x")
        print(f"prefix cache, ~1,000-token prefix: first canvas {pc['miss_first_canvas_s']:.3f} s on a miss, "
              f"{pc['hit_first_canvas_s']:.3f} s on a hit ({pc['ratio']:.2f}x)")
        Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
