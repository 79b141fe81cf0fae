"""The worker that owns the model behind the server (python -m server): a bounded queue of requests, one batch of whatever
waits when the model is free, a random stream per request, a cache of recent prompts, and requests
that stop when their client goes away.

  - Requests queue (Batcher.submit; a full queue refuses, and the server answers 503). When the
    model is free, the first request and every one with the same sampler settings that waits, or
    arrives within `wait` seconds, up to batch_size rows (a request with n samples takes n rows),
    run as one block_diffusion batch.
  - Every row draws from its own random stream (streams.RandomStreams), seeded by its request's seed
    (sample i: seed + i), so a request gets the same tokens alone or in any batch, and the same as
    `generate.py --seed` gives that prompt.
  - A request alone in its batch reuses the KV cache of an earlier prompt that shares its beginning
    (PrefixCache): only the new tokens are read. Editors resend the same file on every keystroke.
  - Each request gets its events on its own queue: "canvas" after every step (when asked for), "text"
    after every commit, then "done" or "error". A request whose client left (cancel()) stops at the
    next step: its rows are marked finished, and the batch goes on without them.
  - NaN logits or running out of memory fail the batch's requests with an error event; the worker
    goes on with the next batch.

    import torch; from server.batcher import Batcher, Request; from generate import load
    model, tok = load("weights-code", "cpu", torch.float32)
    worker = Batcher(model, batch_size=4)   # the server runs worker.loop() in its main thread
    r = Request(tok.encode_raw("def f(x):"), model.generation_settings.copy(max_new_tokens=16), seed=0)
    worker.generate([r]); print(tok.decode(r.wait()["tokens"][0]))
"""

import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from images import embed_images
from kvcache import KVCache
from sampler import GenerationSettings, NonFiniteLogits, RequestError, block_diffusion, denoise_canvas, trim


@dataclass
class Request:
    """One request for the worker: a prompt's token ids, its settings (its own max_new_tokens and
    stop ids), seed and pins, and where its events go."""
    prompt: list[int]
    settings: GenerationSettings
    seed: int = 0
    n: int = 1  # samples, seeds seed .. seed + n - 1
    pins: dict | None = None  # {offset: token}
    canvas_events: bool = False  # an event after every denoising step
    cache_prompt: bool = True  # may read from and write to the prefix cache
    job: object = None  # instead of one generation: job(**fast paths) -> the "done" payload, run alone
    images: list | None = None  # the prompt's images (images.Patches), in the order of its image tokens
    first_choice: int = 0  # its samples are choices first_choice ... + n - 1 (several prompts share events)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens_cached: int = 0  # prompt tokens the prefix cache already held
    last_canvas: int = -1  # the last canvas committed for it
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    prompt_seconds: float = 0.0  # from started to the end of the causal pass over its prompt

    def cancel(self) -> None:
        """The client left: the rows stop at the next step."""
        self.cancelled.set()

    def wait(self) -> dict:
        """Block until "done" (its payload) or "error" (RuntimeError with the message)."""
        while True:
            kind, payload = self.events.get()
            if kind == "done":
                return payload
            if kind == "error":
                raise RuntimeError(payload["message"])

    def batch_key(self) -> tuple:
        """Requests with the same key can share a batch."""
        s = self.settings
        if self.job is not None:  # a job (a JSON Schema's repair rounds) runs by itself
            return ("job", id(self))
        return (tuple(sorted(vars(s.sampler).items())), s.eos_token_ids, s.pad_token_id, s.max_new_tokens == 0)


class PrefixCache:
    """KV caches of recent prompts (batch of one), within a byte budget, least recently used first
    out. take(prompt) hands out the one sharing the longest beginning with the prompt, rolled back
    to that beginning; put(prompt, cache) keeps a cache rolled back to its prompt. The caches keep
    `spare` tokens beyond the sliding window so that they can roll back a reply and an edit."""

    MIN_SHARED = 16  # a shorter common beginning is not worth another prompt's entry

    def __init__(self, model, budget_bytes: int, spare: int):
        self.model, self.budget, self.spare = model, budget_bytes, spare
        self.entries: list[tuple[list[int], KVCache]] = []  # oldest first

    def fresh(self) -> KVCache:
        c = self.model.config
        return KVCache(c.layer_types, c.sliding_window, spare=self.spare)

    def take(self, prompt: list[int]) -> tuple[KVCache, int]:
        """(cache, tokens of the prompt it holds): at least one prompt token is left to read. An entry
        is used when it shares MIN_SHARED tokens with the prompt, or all of its own."""
        best, keep = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = 0
            for a, b in zip(tokens, prompt[:-1]):
                if a != b:
                    break
                n += 1
            if n > keep and (n >= self.MIN_SHARED or n == len(tokens)):
                best, keep = i, n
        if best is None:
            return self.fresh(), 0
        tokens, cache = self.entries.pop(best)
        try:
            cache.rollback(cache.length - keep)
        except ValueError:  # rolled back further than the sliding layers keep
            return self.fresh(), 0
        return cache, keep

    def put(self, prompt: list[int], cache: KVCache) -> None:
        try:
            cache.rollback(cache.length - len(prompt))
        except ValueError:
            return
        self.entries.append((list(prompt), cache))
        while self.entries and sum(self.size(c) for _, c in self.entries) > self.budget:
            self.entries.pop(0)

    @staticmethod
    def size(cache: KVCache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v) if t is not None)


class Batcher:
    """What runs the model: whichever thread calls loop() (the server's main thread: on a CPU torch's
    ops use every core only there), or generate(batch) called directly for one batch.
    fast: block_diffusion's denoise and new_cache (generate.choose_fast_path)."""

    def __init__(self, model, batch_size: int = 8, queue_size: int = 64, cache_bytes: int = 2 ** 30, *,
                 fast: dict | None = None, spare: int = 1024, wait: float = 0.02):
        self.model, self.batch_size, self.fast, self.wait = model, batch_size, fast or {}, wait
        self.queue: queue.Queue = queue.Queue(queue_size)
        self.waiting: list[Request] = []  # taken from the queue, left for a later batch
        self.prefixes = PrefixCache(model, cache_bytes, spare)
        self.alive = True

    def submit(self, req: Request) -> bool:
        """Queue a request; False when the queue is full."""
        try:
            self.queue.put_nowait(req)
            return True
        except queue.Full:
            return False

    def stop(self) -> None:
        """loop() returns once the batch it runs is done."""
        self.alive = False
        self.queue.put(None)

    def next_batch(self) -> list[Request]:
        """The first request waiting and those that may join it: what waits now, and what arrives
        within `wait` seconds (clients that send together then stay in step, batch after batch)."""
        first = self.waiting.pop(0) if self.waiting else self.queue.get()
        if first is None:
            return []
        deadline = time.perf_counter() + self.wait
        while sum(r.n for r in self.waiting) + first.n < self.batch_size:
            try:
                more = self.queue.get(timeout=max(deadline - time.perf_counter(), 0)) if self.wait else \
                    self.queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self.alive = False
                break
            self.waiting.append(more)
        batch, rows, rest = [first], first.n, []
        for r in self.waiting:
            if r.batch_key() == first.batch_key() and rows + r.n <= self.batch_size and not r.cancelled.is_set():
                batch.append(r)
                rows += r.n
            else:
                rest.append(r)
        self.waiting = rest
        return batch

    def loop(self) -> None:
        """Take batches and run them, until stop()."""
        while self.alive:
            batch = [r for r in self.next_batch() if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                self.generate(batch)
            except NonFiniteLogits as e:
                self.fail(batch, 500, f"{e}; the server goes on")
            except (torch.OutOfMemoryError, MemoryError):
                self.fail(batch, 503, "out of memory generating this batch: send fewer or shorter requests")
            except Exception as e:  # a bug must not end the server: the batch fails, the next one runs
                self.fail(batch, 500, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    @staticmethod
    def fail(batch: list[Request], status: int, message: str) -> None:
        for r in batch:
            r.events.put(("error", {"status": status, "message": message}))

    @torch.no_grad()
    def generate(self, batch: list[Request]) -> None:
        """One block_diffusion batch for these requests; each gets its own rows' tokens."""
        if batch[0].job is not None:
            return self.run_job(batch[0])
        rows = [(r, i) for r in batch for i in range(r.n)]
        C = self.model.config.canvas_length
        soft = {id(r): embed_images(self.model, r.images) for r in batch if r.images}  # the vision tower's work
        now = time.perf_counter()
        for r in batch:
            r.started = now
        alone = len(rows) == 1 and batch[0].cache_prompt
        cache, keep = self.prefixes.take(batch[0].prompt) if alone else (None, 0)
        batch[0].tokens_cached = keep
        if batch[0].settings.max_new_tokens == 0:  # a warm-up (all of the batch: batch_key): read the prompt
            return self.prime(batch, cache, keep)
        settings = batch[0].settings.copy(max_new_tokens=max(r.settings.max_new_tokens for r in batch))

        def stop_cancelled(finished):
            for b, (r, _) in enumerate(rows):
                if r.cancelled.is_set():
                    finished[b] = True

        def on_step(ci, step, state):
            stop_cancelled(state.finished)
            for b, (r, i) in enumerate(rows):
                if r.canvas_events and not r.cancelled.is_set():
                    within = r.settings.max_new_tokens - ci * C  # its own positions: the canvas may be wider
                    r.events.put(("canvas", {"choice": r.first_choice + i, "canvas": ci,
                                             "step": settings.sampler.max_steps - step + 1,
                                             "tokens": state.argmax[b, :within].tolist(),
                                             "accepted": int(state.accepted[b, :within].sum())}))

        def on_canvas(ci, new, finished):
            stop_cancelled(finished)
            for b, (r, i) in enumerate(rows):
                if not r.cancelled.is_set():
                    r.last_canvas = ci
                    r.events.put(("text", {"choice": r.first_choice + i, "tokens": trim(new[b].tolist(), r.settings)}))

        prompts = [r.prompt[keep:] if alone else r.prompt for r, _ in rows]
        fast = {k: v for k, v in self.fast.items() if not (alone and k == "new_cache")}  # a given cache grows
        denoise = fast.get("denoise", denoise_canvas)

        def timed_denoise(model, cache, state, *a, **kw):  # called right after the causal pass
            if state.index == 0:
                for r in batch:
                    r.prompt_seconds = time.perf_counter() - r.started
            return denoise(model, cache, state, *a, **kw)
        fast["denoise"] = timed_denoise
        result = block_diffusion(self.model, prompts, settings, pins=[r.pins or {} for r, _ in rows],
                                 seeds=[r.seed + i for r, i in rows], on_step=on_step, on_canvas=on_canvas,
                                 images=[soft.get(id(r)) for r, _ in rows] if soft else None, cache=cache, **fast)
        if alone:
            self.prefixes.put(batch[0].prompt, cache)
        for r in batch:
            mine = [b for b, (q, _) in enumerate(rows) if q is r]
            tokens = [trim(result.sequences[b, result.prompt_length:].tolist(), r.settings) for b in mine]
            if r.cancelled.is_set():
                print(f"(a request was cancelled: its rows stopped after canvas {r.last_canvas + 1} of "
                      f"{r.settings.canvases(self.model.config.canvas_length)})", file=sys.stderr, flush=True)
            r.events.put(("done", {"tokens": tokens, "canvases": result.canvases, "steps": result.steps,
                                   "seconds": time.perf_counter() - r.started, "prompt_seconds": r.prompt_seconds,
                                   "tokens_cached": r.tokens_cached, "rows_in_batch": len(rows),
                                   "first": r.first_choice}))

    def run_job(self, r: Request) -> None:
        """A request that is a job of its own (editing.fill_json for a JSON Schema)."""
        r.started = time.perf_counter()
        try:
            done = r.job(**self.fast)
        except RequestError as e:  # what the request asks cannot be met (a schema path no sample filled)
            return self.fail([r], 422, str(e))
        r.events.put(("done", {"canvases": len(done["steps"]), "tokens_cached": 0, "rows_in_batch": r.n, **done,
                               "seconds": time.perf_counter() - r.started, "first": r.first_choice}))

    def prime(self, batch: list[Request], cache, keep: int) -> None:
        """max_new_tokens 0: read the prompt into the prefix cache, generate nothing."""
        for r in batch:
            if cache is None:
                cache, keep = self.prefixes.take(r.prompt)
            t0 = time.perf_counter()
            self.model.forward_causal(torch.tensor([r.prompt[keep:]], device=self.model.device), cache)
            self.prefixes.put(r.prompt, cache)
            r.tokens_cached, seconds = keep, time.perf_counter() - t0
            r.events.put(("done", {"tokens": [[]], "canvases": 0, "steps": [], "seconds": seconds,
                                   "prompt_seconds": seconds, "tokens_cached": keep, "first": r.first_choice}))
            cache = None
