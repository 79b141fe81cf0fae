"""What the command line shows while it generates: the refining canvas, the streamed answer, the
closing line, and the one-line messages for mistakes and for things that go wrong on the device.

    import sys; from terminal import dim, closing_line
    print(dim("thinking: ...", sys.stderr), file=sys.stderr)
"""

import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch

from sampler import NonFiniteLogits, trim


class UsageError(Exception):
    """A mistake in what was asked for: the command line says so in one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (exit 2) instead of a usage block."""
    def error(self, message: str):  # one line instead of argparse's usage block
        if message == "argument --pin: expected one argument":  # `--pin -1:x` reads as a flag
            message = "argument --pin: expected OFFSET:TEXT with OFFSET 0 or more (write --pin=TEXT if TEXT starts with -)"
        self.exit(2, f"error: {message} (see --help)\n")


def positive(kind):
    """An argparse type: a whole number (kind int) or a number (kind float) greater than 0."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {s}")
        return v
    return parse


def device_name(s: str) -> str:
    """An argparse type: a device string torch knows (cuda, cuda:1, cpu, mps)."""
    try:
        torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {s!r}: use cuda, cuda:N, cpu or mps") from None
    return s


def plural(n: int, word: str) -> str:
    """'1 canvas', '2 canvases', '1 token', '3 tokens'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def dim(text: str, stream) -> str:
    """Grey when the stream is a terminal (thoughts, drafts), plain otherwise."""
    return f"\033[2m{text}\033[0m" if getattr(stream, "isatty", lambda: False)() else text


@dataclass
class Display:
    """What the terminal shows: nothing but the text (quiet), the canvas refining (show_canvas),
    and the one line announcing the fast path, printed as generation starts."""
    quiet: bool = False
    show_canvas: bool = False
    announce: str | None = None


class CanvasView:
    """--show-canvas: redraws row 0's current argmax canvas in place on stderr at every step.
    render(ids) -> str turns the canvas into what is drawn (default: the tokenizer's decode); label
    names the row drawn ("sample 1 of 8"). On a terminal, frames stay up at least min_frame s."""

    def __init__(self, render, max_steps: int, label: str = "", stream=sys.stderr, min_frame: float = 0.06,
                 column=lambda: 0):
        self.render, self.max_steps, self.label, self.out, self.lines = render, max_steps, label, stream, 0
        self.column = column  # where the cursor stands on its line (text printed without a newline): 0 at its start
        self.at = 0
        self.min_frame = min_frame if getattr(stream, "isatty", lambda: False)() else 0.0
        self.last = 0.0

    def draw(self, ci: int, step: int, state) -> None:
        text = self.render(state.argmax[0].tolist()).replace("\r", "")
        width = max(20, shutil.get_terminal_size((100, 20)).columns)
        done = self.max_steps - step + 1  # steps run so far on this canvas
        header = (f"canvas {ci + 1} · step {done}/{self.max_steps} · accepted {int(state.accepted[0].sum())}"
                  + (f" · {self.label}" if self.label else ""))
        body = [header] + [ln[i: i + width] for ln in text.split("\n") for i in range(0, max(len(ln), 1), width)]
        wait = self.min_frame - (time.monotonic() - self.last)
        if wait > 0:
            time.sleep(wait)  # a frame a person can see
        self.clear()
        self.at = self.column() % width
        body = [""] * bool(self.at) + body  # mid-line (after a prompt): the frame starts on the next line
        self.out.write("\033[33m" + "\n".join(body) + "\033[0m\n")
        self.out.flush()
        self.lines, self.last = len(body), time.monotonic()

    def clear(self) -> None:
        """Erase the frame, the cursor back where it stood before it."""
        if self.lines:
            self.out.write(f"\033[{self.lines}F" + (f"\033[{self.at}C" if self.at else "") + "\033[J")
            self.lines = 0


class StreamPrinter:
    """Prints a growing text to a stream as it grows (one call per committed canvas), so an answer
    appears canvas by canvas; `text` is what is on screen so far."""

    def __init__(self, stream=sys.stdout, before=None, style=None):
        self.out, self.text, self.before, self.style = stream, "", before, style or (lambda s: s)

    def update(self, text: str) -> None:
        if text.startswith(self.text) and len(text) > len(self.text):
            if self.before is not None:
                self.before()  # e.g. clear a progress bar's line first
            self.out.write(self.style(text[len(self.text):]))
            self.out.flush()
            self.text = text


def peak_memory(device: torch.device) -> str:
    """The device's peak allocation (CUDA), or the process's peak RSS."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    try:
        import resource
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process RSS)"
    except ImportError:
        return "n/a"


def free_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the device, or None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)
        if device.type == "cpu" and hasattr(os, "sysconf"):
            page = os.sysconf("SC_PAGE_SIZE")
            return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, RuntimeError):
        pass
    return None


def out_of_memory_line(device: torch.device, error: BaseException, loading: bool = False) -> str:
    """One line: what was being allocated, the device's memory, and the ways out."""
    import re
    asked = re.search(r"(?:Tried to allocate|allocate) ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", str(error))
    mem = free_memory(device)
    have = "" if mem is None else f" ({mem[0] / 2 ** 30:.1f} GiB free of {mem[1] / 2 ** 30:.1f} GiB)"
    what = f" allocating {asked.group(1)}" if asked else ""
    if loading:
        return (f"out of memory on {device}{have}{what} while loading the weights: quantize them "
                "(python quantize.py SRC DST --experts int8), or spread them over several GPUs (torchrun)")
    return (f"out of memory on {device}{have}{what}: quantize the weights (python quantize.py SRC DST --experts int8), "
            "generate fewer prompts at once (--batch-size), or ask for fewer tokens (--max-new-tokens)")


def closing_line(n_tokens: int, canvases: int, steps: list, seconds: float, device: torch.device, *,
                 budget: str | None = None, extra: str = "", peak: str | None = None) -> str:
    """The line printed after a generation: tokens, canvases, steps, speed, memory; budget names the
    token limit that cut the text short, if one did."""
    mean_steps = sum(steps) / max(len(steps), 1)
    return (f"{plural(n_tokens, 'token')}, {plural(canvases, 'canvas')}, {mean_steps:.1f} steps/canvas, "
            f"{n_tokens / max(seconds, 1e-9):.1f} tok/s, peak memory {peak or peak_memory(device)}, device {device}"
            + (f" (stopped at {budget})" if budget else "") + extra)


class Progress:
    """A tqdm bar on stderr (none when quiet or showing the canvas), the canvas view, and what each
    row has committed so far (shown on Ctrl-C or when the logits turn NaN)."""

    def __init__(self, display: Display, total: int, unit: str, view: CanvasView | None = None):
        from tqdm import tqdm
        if display.announce and not display.quiet:
            print(display.announce, file=sys.stderr)  # which path runs, once, as generation starts
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        disable=display.quiet or view is not None)
        self.view = view
        self.committed: dict[int, list[int]] = {}  # row -> its new tokens so far

    def on_step(self, ci, step, state):
        if self.view is not None:
            self.view.draw(ci, step, state)

    def record(self, start, new, settings):
        """After a commit: every row's new tokens so far (rows start, start + 1, ... of the input)."""
        if self.view is not None:
            self.view.clear()
        for b in range(new.shape[0]):
            self.committed[start + b] = trim(new[b].tolist(), settings)


def stopped(e, progress: Progress, show_row, printed: int, single: bool) -> int:
    """Ctrl-C or NaN logits during generation: what every unprinted row committed, then one line."""
    if isinstance(e, KeyboardInterrupt):
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # a second Ctrl-C ends at once
    progress.bar.close()
    if progress.view is not None:
        progress.view.clear()
    for row in sorted(progress.committed):
        if row >= printed:
            show_row(row, progress.committed[row])
    if single:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if isinstance(e, NonFiniteLogits):
        raise e
    print("interrupted", file=sys.stderr)
    return 130
