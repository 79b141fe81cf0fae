"""Typed canvases on JSONSchemaBench (guidance-ai/jsonschemabench on GitHub: about 10,000 JSON Schemas
people wrote, in splits): for each schema, one typed generation (editing.fill_json, one sample, up
to 2 more draws), and whether its value is valid (judged by the jsonschema package), refused (by
reason), or invalid (which must never happen); the time to lay the schema out, and to generate.

The data is fetched, never copied into this project: --data names a checkout (its data/ folder, or
the folder of split folders); without it, `git clone --depth 1` into ~/.cache/diffusiongemma/.
On each model: --model (default weights-code) and --gemma4 TOKENIZER (a tiny random checkpoint with
the Gemma 4 vocabulary). The prompt is short and the same for every schema: validity comes from the
canvas, not from what the model knows. --per-split N takes N schemas of each split (a seeded sample).

    python scripts/jsonschemabench.py --data ~/jsonschemabench --per-split 50 --json /tmp/jsb.json
    python scripts/jsonschemabench.py --model none --gemma4 tokenizer.json --layout-only

--layout-only lays out every schema without generating: how many are accepted, and the build times.
"""

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from editing import fill_json  # noqa: E402
from generate import load  # noqa: E402
from sampler import block_diffusion  # noqa: E402
from schema import judge  # noqa: E402
from structured import SchemaError, build, check_schema, token_sets  # noqa: E402

REPO = "https://github.com/guidance-ai/jsonschemabench"
# share of schemas with a valid output, JSONSchemaBench (arXiv 2501.10868) Table 4: the better of Guidance
# and llama.cpp on each split
PUBLISHED = {"Glaiveai2K": 0.96, "Github_easy": 0.86, "Snowplow": 0.82, "Github_medium": 0.69, "Kubernetes": 0.91,
             "WashingtonPost": 0.94, "Github_hard": 0.41, "JsonSchemaStore": 0.38}


def data_dir(given: str | None) -> Path:
    """The folder of split folders: --data, or a shallow clone in the cache made on first use."""
    if given:
        d = Path(given).expanduser()
        d = d / "data" if (d / "data").is_dir() else d
        if not d.is_dir():
            raise SystemExit(f"error: --data {given} is not a folder")
        return d
    cache = Path.home() / ".cache" / "diffusiongemma" / "jsonschemabench"
    if not (cache / "data").is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        print(f"fetching {REPO} into {cache}", file=sys.stderr)
        if subprocess.run(["git", "clone", "--depth", "1", REPO, str(cache)]).returncode:
            raise SystemExit(f"error: could not clone {REPO}: clone it yourself and give --data DIR")
    return cache / "data"


def reason(message: str) -> str:
    """A refusal's reason, short: the keyword or what was out of reach."""
    for pattern, name in ((r"\$ref", "$ref outside the schema"), (r"back-reference|lookaround", "pattern construct"),
                          (r"not a regular expression", "pattern syntax"), (r"not valid", "invalid schema"),
                          (r"positions", "canvas too long"), (r"nested deeper", "recursion"),
                          (r"additionalProperties is false", "unsatisfiable"), (r"no (whole )?number|above|no value",
                                                                                "unsatisfiable"),
                          (r"judge|rejected|could not|draw", "no valid sample"), (r"jsonschema", "jsonschema missing")):
        if re.search(pattern, message):
            return name
    return message.split(":")[-1].strip()[:40]


def run_model(name: str, model, tok, prompt: list[int], splits: dict, *, steps: int | None, timing: int,
              save=lambda out: None) -> dict:
    """Every schema of every split: valid / refused / invalid, build and generation times; save(results so
    far) after each split."""
    settings = model.generation_settings.copy(steps=steps)
    sets = token_sets(tok, model.config.vocab_size)
    out = {}
    for split, files in splits.items():
        r = {"schemas": 0, "valid": 0, "refused": {}, "invalid": 0, "crashed": 0, "build_ms": [], "typed_s": [],
             "ratio": []}
        for f in files:
            r["schemas"] += 1
            try:
                schema = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                r["refused"]["not JSON"] = r["refused"].get("not JSON", 0) + 1
                continue
            try:
                check_schema(schema)
                t0 = time.perf_counter()
                room = model.config.max_position_embeddings - len(prompt) - model.config.canvas_length
                lay = build(schema, tok, sets, max_positions=room)
                r["build_ms"].append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                filled = fill_json(model, tok, prompt, schema, settings, seed=0, rounds=2)
                r["typed_s"].append(time.perf_counter() - t0)
                if len(r["ratio"]) < timing:  # an unconstrained generation of the same length
                    fixed = settings.copy(max_new_tokens=len(lay.tokens), eos_token_ids=())
                    t0 = time.perf_counter()
                    block_diffusion(model, [prompt], fixed, seeds=[0])
                    r["ratio"].append(r["typed_s"][-1] / (time.perf_counter() - t0))
                if judge(schema).is_valid(filled.value):
                    r["valid"] += 1
                else:
                    r["invalid"] += 1
                    print(f"  INVALID {split}/{f.name}: {filled.text[:200]}", file=sys.stderr)
            except SchemaError as e:
                k = reason(str(e))
                r["refused"][k] = r["refused"].get(k, 0) + 1
            except RecursionError:
                r["refused"]["recursion"] = r["refused"].get("recursion", 0) + 1
            except Exception as e:  # a bug: counted, never hidden
                r["crashed"] += 1
                print(f"  CRASH {split}/{f.name}: {type(e).__name__}: {e}", file=sys.stderr)
        out[split] = r
        save(out)
        print(f"{name} {split}: {r['valid']}/{r['schemas']} valid, {sum(r['refused'].values())} refused, "
              f"{r['invalid']} invalid, {r['crashed']} crashed", file=sys.stderr, flush=True)
    return out


def run_layouts(tok, vocab_size: int, room: int, splits: dict) -> dict:
    """--layout-only: every schema laid out (no generation): accepted or refused (by reason), build time."""
    sets = token_sets(tok, vocab_size)
    out = {}
    for split, files in splits.items():
        r = {"schemas": len(files), "laid_out": 0, "refused": {}, "crashed": 0, "build_ms": []}
        for f in files:
            try:
                schema = json.loads(f.read_text(encoding="utf-8"))
                check_schema(schema)
                t0 = time.perf_counter()
                build(schema, tok, sets, max_positions=room)
                r["build_ms"].append((time.perf_counter() - t0) * 1e3)
                r["laid_out"] += 1
            except (ValueError, UnicodeDecodeError, SchemaError, RecursionError) as e:
                k = "not JSON" if not isinstance(e, (SchemaError, RecursionError)) else reason(str(e))
                r["refused"][k] = r["refused"].get(k, 0) + 1
            except Exception as e:  # a bug: counted, never hidden
                r["crashed"] += 1
                print(f"  CRASH {split}/{f.name}: {type(e).__name__}: {e}", file=sys.stderr)
        out[split] = r
        ms = sorted(r["build_ms"]) or [0.0]
        top = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items(), key=lambda kv: -kv[1])[:3]) or "-"
        print(f"| {split} | {r['schemas']} | {r['laid_out'] / max(r['schemas'], 1):.1%} | {top} | {r['crashed']} | "
              f"{statistics.median(ms):.1f} | {ms[int(0.9 * (len(ms) - 1))]:.1f} | {ms[-1]:.0f} |", flush=True)
    return out


def table(results: dict) -> str:
    """The markdown table of one model's results, beside the published figures."""
    rows = ["| split | schemas | valid | published (best engine) | refused (top reasons) | invalid | build ms (median) "
            "| typed s (median) | typed / unconstrained |", "|---|---|---|---|---|---|---|---|---|"]
    for split, r in results.items():
        top = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items(), key=lambda kv: -kv[1])[:3]) or "-"
        med = lambda xs, fmt: fmt.format(statistics.median(xs)) if xs else "-"  # noqa: E731
        pub = PUBLISHED.get(split)
        rows.append(f"| {split} | {r['schemas']} | {r['valid'] / max(r['schemas'], 1):.0%} | "
                    f"{'-' if pub is None else f'{pub:.0%}'} | {top} | {r['invalid'] + r['crashed']} | "
                    f"{med(r['build_ms'], '{:.1f}')} | {med(r['typed_s'], '{:.2f}')} | {med(r['ratio'], '{:.2f}')} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/jsonschemabench.py."""
    p = argparse.ArgumentParser(description="Typed canvases on JSONSchemaBench: valid, refused, invalid, by split.")
    p.add_argument("--data", help="a checkout of guidance-ai/jsonschemabench (default: cloned into ~/.cache)")
    p.add_argument("--model", default="weights-code", help="a checkpoint, or none (only --gemma4)")
    p.add_argument("--gemma4", metavar="TOKENIZER", help="also a tiny random checkpoint with this tokenizer.json")
    p.add_argument("--per-split", type=int, help="schemas a split (a seeded sample; default: all)")
    p.add_argument("--splits", help="only these splits (comma-separated)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (default 8)")
    p.add_argument("--timing", type=int, default=10, help="schemas a split also timed unconstrained (default 10)")
    p.add_argument("--layout-only", action="store_true",
                   help="only lay every schema out (no generation): accepted, refused, build time")
    p.add_argument("--json", help="write the results here (after every split)")
    return p


def main(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(False)
    d = data_dir(args.data)
    names = sorted(p.name for p in d.iterdir() if p.is_dir())
    if args.splits:
        names = [n for n in names if n in args.splits.split(",")]
    rng = random.Random(0)
    splits = {}
    for n in names:
        files = sorted((d / n).glob("*.json"))
        splits[n] = sorted(rng.sample(files, min(args.per_split, len(files)))) if args.per_split else files
    models = [] if args.model == "none" else [(args.model, lambda: load(args.model))]
    if args.gemma4:
        from scripts.json_bench import gemma4_model
        models.append(("tiny random, Gemma 4 tokenizer", lambda: gemma4_model(args.gemma4)))
    report = {}

    def save(name, out):
        report[name] = out
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    for name, make in models:
        model, tok = make()
        prompt = tok.prompt_ids("Write the JSON value.") if tok.is_chat else tok.encode_raw("data = ")
        if args.layout_only:
            print(f"\n{name}\n| split | schemas | laid out | refused (top reasons) | crashed | build ms median | p90 | max |\n"
                  "|---|---|---|---|---|---|---|---|")
            room = model.config.max_position_embeddings - len(prompt) - model.config.canvas_length
            save(name, run_layouts(tok, model.config.vocab_size, room, splits))
            continue
        out = run_model(name, model, tok, prompt, splits, steps=args.steps, timing=args.timing,
                        save=lambda out, name=name: save(name, out))
        print(f"\n{name}\n{table(out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
