"""A conversation with DiffusionGemma that keeps its KV cache from one turn to the next.

After each reply the whole conversation is rendered again with the chat template (which drops
earlier thoughts and ends the model's turn with `<turn|>`), the longest prefix of it that the cache
already holds is kept, the rest of the cache is rolled back (the committed canvas may hold a
thought, or padding after `<turn|>`), and only the new tokens are read causally. The cache then
holds exactly what one causal pass over the rendered conversation would. Sliding-window layers
keep enough tokens beyond their window to roll back a whole reply (kvcache.py, `spare`).

    from chat import Chat; from generate import load; from tokenizer import Tokenizer
    model, _ = load("weights-code")                 # a model of code: give its tokenizer a chat format
    tok = Tokenizer("weights-code/tokenizer.json", "{% for m in messages %}{{ m.content }}\\n{% endfor %}")
    chat = Chat(model, tok, model.generation_settings.copy(max_new_tokens=16))
    reply = chat.send("def add(a, b):")
    again = chat.send("and now subtract")       # reads only this turn's new tokens
"""

import sys

import torch

import distributed
from kvcache import KVCache
from sampler import GenerationSettings, RequestError, block_diffusion, denoise_canvas
from terminal import Display, StreamPrinter, dim


class Chat:
    """messages, a KV cache and the token ids it holds; send(text) -> the model's answer.
    send raises RequestError for a tokenizer without a chat format, or a conversation the model
    cannot hold."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, system: str | None = None,
                 thinking: bool = False, denoise=denoise_canvas):
        self.model, self.tok, self.settings, self.denoise = model, tokenizer, settings, denoise
        self.thinking = thinking
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = []
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the token ids the cache holds, in order
        self.last_read = 0  # tokens the last turn read causally

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def new_cache(self) -> KVCache:
        c = self.model.config
        spare = self.settings.positions(64, c.canvas_length)  # a whole reply, and some
        return KVCache(c.layer_types, c.sliding_window, spare=spare)

    def reuse_cache(self, ids: list[int]) -> int:
        """Roll the cache back to the longest prefix it shares with ids; returns that length."""
        keep = 0
        for a, b in zip(self.cached, ids[:-1]):  # at least one token is left to read
            if a != b:
                break
            keep += 1
        if self.cache is not None:
            try:
                self.cache.rollback(len(self.cached) - keep)
                return keep
            except ValueError:  # rolled back further than the sliding layers keep: start over
                pass
        self.cache = self.new_cache()
        return 0

    @torch.no_grad()
    def send(self, text: str, on_canvas=None) -> str:
        """The answer to a user turn. on_canvas(answer_so_far, thought_so_far) after each canvas."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.apply_chat_template(self.conversation(), thinking=self.thinking)
        c = self.model.config
        need = self.settings.positions(len(ids), c.canvas_length)
        if need > c.max_position_embeddings:
            self.messages.pop()
            raise RequestError(f"the conversation needs {need} positions but the model has {c.max_position_embeddings}: "
                               "/reset to start over")
        keep = self.reuse_cache(ids)
        self.last_read = len(ids) - keep

        def hook(ci, new, finished):
            if on_canvas is not None:
                split = self.tok.split_thought(new[0].tolist())
                on_canvas(self.tok.decode(split.answer),
                          None if split.thought is None else self.tok.decode(split.thought))

        result = block_diffusion(self.model, [ids[keep:]], self.settings, cache=self.cache, on_canvas=hook,
                                 denoise=self.denoise)
        self.cached = (ids[:keep] + result.sequences[0].tolist())[: self.cache.length]
        answer = self.tok.decode(self.tok.split_thought(result.tokens[0]).answer)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(model, tok, settings: GenerationSettings, display: Display, *, system: str | None = None,
              thinking: bool = False, denoise=denoise_canvas) -> int:
    """--chat: a line per user turn from stdin (a terminal or a pipe); /reset, /system TEXT, /exit;
    Ctrl-D ends. Each reply is printed canvas by canvas; from a pipe each turn is echoed first
    ("> text"), so that the transcript shows where every reply begins."""
    chat = Chat(model, tok, settings, system=system, thinking=thinking, denoise=denoise)
    interactive = sys.stdin.isatty()
    if display.announce and not display.quiet:
        print(display.announce, file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if distributed.launched():  # rank 0 reads; every rank takes the same turn
            box = [line]
            torch.distributed.broadcast_object_list(box, src=0)
            line = box[0]
        if not line:  # Ctrl-D or the end of the piped input
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            chat.system = line[len("/system"):].strip() or None
            chat.reset()
            print("(system prompt set; conversation reset)", file=sys.stderr)
            continue
        if not interactive:
            sys.stdout.write(f"> {line}\n")
        answer = StreamPrinter(sys.stdout)
        thought = StreamPrinter(sys.stderr, style=lambda s: dim(s, sys.stderr))

        def show(text, thought_text):
            if thinking and thought_text:
                thought.update("thinking: " + thought_text)
            answer.update(text)

        try:
            chat.send(line, on_canvas=show)
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if thought.text:
            sys.stderr.write("\n")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not display.quiet:
            print(dim(f"({chat.last_read} new tokens read, {chat.cache.length} in the cache)", sys.stderr),
                  file=sys.stderr)
