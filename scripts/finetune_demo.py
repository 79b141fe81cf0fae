"""A task the bundled code model cannot do, taught by finetune.py in a few minutes on a CPU: read a number
from a docstring and write it into the code.

    def shift(x):
        \"\"\"x plus 31\"\"\"
        return x + 31            <- the answer; held-out: names and numbers never seen together

Writes the training and held-out files (400 and 30 examples, from a seed), runs finetune.py with LoRA on
weights-code, and prints the held-out exact-answer share before and after, from the run's log.

    python scripts/finetune_demo.py --out runs/demo --steps 1500
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "total", "value", "score", "shift", "bump", "step", "lift",
         "push", "grow", "move", "nudge"]


def example(k: int, name: str) -> dict:
    """One prompt and its answer."""
    return {"prompt": f'def {name}(x):\n    """x plus {k}"""\n', "completion": f"    return x + {k}\n", "group": "plus"}


def write_data(out: Path, seed: int = 1, train: int = 400, held: int = 30) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl: held-out (number, name) pairs never appear in training."""
    rng, seen = random.Random(seed), set()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(train):
            k, n = rng.randint(2, 60), rng.choice(NAMES)
            f.write(json.dumps(example(k, n)) + "\n")
            seen.add((k, n))
    with open(out / "heldout.jsonl", "w") as f:
        while held:
            k, n = rng.randint(2, 60), rng.choice(NAMES)
            if (k, n) not in seen:
                f.write(json.dumps(example(k, n)) + "\n")
                seen.add((k, n))
                held -= 1
    return out / "train.jsonl", out / "heldout.jsonl"


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/finetune_demo.py."""
    p = argparse.ArgumentParser(description="Teach the bundled code model a task with finetune.py, before and after.")
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default runs/demo)")
    p.add_argument("--steps", type=int, default=1500, help="LoRA steps (default 1500)")
    p.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    return p


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    train, held = write_data(out)
    run = out / ("full" if args.full else "lora")
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model", "weights-code", "--data", str(train), "--eval", str(held),
           "--out", str(run), "--steps", str(args.steps), "--eval-every", str(max(args.steps // 3, 1)), "--exact",
           "--quiet"] + (["--full", "--lr", "5e-4"] if args.full else ["--lr", "2e-3"])
    print(" ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode:
        return 1
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    print(f"held-out exact answers: {first['exact']['all']:.0%} before, {last['exact']['all']:.0%} after "
          f"{last['step']} steps ({last['minutes']:.1f} min); loss at t = 0.5: {first['loss@0.5']} -> {last['loss@0.5']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
