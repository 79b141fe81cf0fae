"""Typed canvases on the schema suite (scripts/schema_suite.json), each schema x 5 seeds, one sample
at a time, after a prompt that asks for JSON and shows the schema:

  plain      unconstrained generation of the layout's length: is its text valid (jsonschema)?
  template   the skeleton pinned, the holes free (no token sets, no repair): valid?
  typed      editing.fill_json: the skeleton pinned, the holes restricted, repaired: valid?

and the time of `typed` against `plain` (the same prompt and length), as medians; mean repair
rounds and choices snapped. --gemma4 TOKENIZER also runs a tiny random checkpoint with that
tokenizer (the Gemma 4 vocabulary of 262,144 tokens). Prints a table, writes the JSON file.

    python scripts/json_bench.py --model weights-code --seeds 1 --limit 3 --json /tmp/json_bench.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import jsonschema  # noqa: E402  (a test dependency: the judge)
import torch  # noqa: E402

from generate import load  # noqa: E402
from sampler import block_diffusion  # noqa: E402
from editing import canvas_rows, fill_json  # noqa: E402
from structured import SchemaError, build, token_sets  # noqa: E402


def valid(text: str, schema: dict) -> bool:
    """Whether the text is JSON that the jsonschema library accepts under the schema."""
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def timed(fn):
    """fn() and the seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(model, tok, name: str, suite: list[dict], seeds: list[int], steps: int | None) -> dict:
    """Every schema of the suite, every seed: plain, template and typed generation, valid or not, timed."""
    settings = model.generation_settings.copy(steps=steps)
    t0 = time.perf_counter()
    sets = token_sets(tok, model.config.vocab_size)
    sets_seconds = time.perf_counter() - t0
    counts = {"plain": 0, "template": 0, "typed": 0}
    plain_s, typed_s, ratios, rounds, snapped, n = [], [], [], [], 0, 0
    for k, schema in enumerate(suite):
        text = f"Answer with JSON that satisfies this JSON Schema:\n{json.dumps(schema)}\nJSON:\n"
        prompt = tok.prompt_ids(text) if tok.is_chat else tok.encode_raw(text)
        layout = build(schema, tok, sets)
        length, pins, _ = canvas_rows([layout], sets.space)
        fixed = settings.copy(max_new_tokens=length, eos_token_ids=())
        for seed in seeds:
            n += 1
            plain, t_plain = timed(lambda: block_diffusion(model, [prompt], fixed, seeds=[seed]))
            counts["plain"] += valid(tok.decode(plain.tokens[0]), schema)
            template = block_diffusion(model, [prompt], fixed, pins=pins, seeds=[seed])
            counts["template"] += valid(tok.decode(template.tokens[0]), schema)
            try:
                typed, t_typed = timed(lambda: fill_json(model, tok, prompt, schema, settings, seed=seed))
                counts["typed"] += valid(typed.text, schema)
                rounds.append(typed.rounds)
                snapped += len(typed.snapped)
            except SchemaError as e:
                print(f"  schema {k} seed {seed}: {e}", file=sys.stderr)
                t_typed = float("nan")
            plain_s.append(t_plain)
            typed_s.append(t_typed)
            ratios.append(t_typed / t_plain)
        print(f"  {name} schema {k + 1}/{len(suite)}: {length} tokens", file=sys.stderr)
    return {"model": name, "samples": n, "valid": {m: c / n for m, c in counts.items()},
            "mean_repair_rounds": statistics.mean(rounds) if rounds else None, "choices_snapped": snapped,
            "median_plain_s": statistics.median(plain_s), "median_typed_s": statistics.median(typed_s),
            "median_ratio": statistics.median(ratios), "token_sets_s": sets_seconds}


def gemma4_model(tokenizer: str):
    """A tiny random checkpoint (the tests' shape) whose tokenizer is the Gemma 4 one."""
    from model import RELEASED_EOS, DiffusionGemma, DiffusionGemmaConfig, init_weights
    from sampler import GenerationSettings
    from tokenizer import Tokenizer
    cfg = DiffusionGemmaConfig(vocab_size=262144, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=8, global_head_dim=8, num_global_key_value_heads=1,
                               intermediate_size=16, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                               sliding_window=16, canvas_length=8, eos_token_id=list(RELEASED_EOS),
                               max_position_embeddings=4096, dtype="float32",
                               layer_types=["sliding_attention", "full_attention"])
    model = init_weights(DiffusionGemma(cfg), std=0.5, seed=0).eval()
    model.generation_settings = GenerationSettings()
    return model, Tokenizer(Path(tokenizer))


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/json_bench.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights-code", help="a checkpoint, or none (only --gemma4)")
    p.add_argument("--gemma4", metavar="TOKENIZER", help="also a tiny random checkpoint with this tokenizer.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, help="denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--limit", type=int, help="the first N schemas only")
    p.add_argument("--json", help="write the results here")
    return p


def main(a: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    suite = json.loads((HERE / "scripts" / "schema_suite.json").read_text())[: a.limit]
    seeds = list(range(a.seeds))
    models = [] if a.model == "none" else \
        [(a.model, lambda: load(a.model if Path(a.model).exists() else HERE / a.model, "cpu", torch.float32))]
    if a.gemma4:
        models.append(("random Gemma 4 vocabulary", lambda: gemma4_model(a.gemma4)))
    results = []
    for name, make in models:
        model, tok = make()
        results.append(run(model, tok, name, suite, seeds, a.steps))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{len(suite)} schemas x {len(seeds)} seeds, CPU ({machine})")
    print(f"{'model':<28} {'plain':>6} {'template':>9} {'typed':>6} {'rounds':>7} {'snapped':>8} "
          f"{'plain s':>8} {'typed s':>8} {'ratio':>6}")
    for r in results:
        v = r["valid"]
        print(f"{r['model']:<28} {v['plain']:>6.0%} {v['template']:>9.0%} {v['typed']:>6.0%} "
              f"{r['mean_repair_rounds']:>7.2f} {r['choices_snapped']:>8} {r['median_plain_s']:>8.3f} "
              f"{r['median_typed_s']:>8.3f} {r['median_ratio']:>6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "schemas": len(suite), "seeds": len(seeds),
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main(build_parser().parse_args())
