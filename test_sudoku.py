"""Sudoku as a task: the rules by hand, grids that stay valid under every symmetry, puzzles with one
solution, tokens and text, and a Sudoku model trained, exported and run by generate.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sudoku
from tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
SIX = sudoku.SHAPES[6]
GRID6 = [1, 2, 3, 4, 5, 6,
         4, 5, 6, 1, 2, 3,
         2, 3, 1, 5, 6, 4,
         5, 6, 4, 2, 3, 1,
         3, 1, 2, 6, 4, 5,
         6, 4, 5, 3, 1, 2]


def test_rules_by_hand():
    assert sudoku.is_valid(GRID6, SIX)
    swapped = list(GRID6)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # rows still hold 1..6, columns no longer do
    assert not sudoku.is_valid(swapped, SIX)
    boxes = [1, 2, 3, 4, 5, 6] * 6  # every row valid, columns and boxes not
    assert not sudoku.is_valid(boxes, SIX)
    puzzle = [0] * 36
    puzzle[0] = 2
    assert not sudoku.is_valid(GRID6, SIX, puzzle)  # a given that the grid does not keep
    assert len(sudoku.units(SIX)) == 18 and sorted(sudoku.units(SIX)[12]) == [0, 1, 2, 6, 7, 8]


def test_symmetries_keep_grids_valid_and_vary():
    for shape in sudoku.SHAPES.values():
        pool = sudoku.base_pool(shape, 5, seed=1)
        grids = sudoku.augmented(pool, shape, 300, torch.Generator().manual_seed(0))
        assert all(sudoku.is_valid(g.tolist(), shape) for g in grids)
        assert len({tuple(g.tolist()) for g in grids}) > 250  # from only 5 base grids


def test_puzzles_have_one_solution():
    for shape, givens in ((SIX, 10), (sudoku.SHAPES[9], 30)):
        puzzle, solution = sudoku.make_puzzle(shape, givens, seed=3)
        assert sum(1 for d in puzzle if d) == givens
        assert sudoku.solve(puzzle, shape, limit=2) == [solution] and sudoku.is_valid(solution, shape, puzzle)
    pairs = sudoku.eval_puzzles(SIX, 5, sudoku.HARD[6], seed=4)
    assert all(8 <= sum(1 for d in p if d) <= 11 for p, _ in pairs)
    for shape in sudoku.SHAPES.values():  # the built-in demo puzzles
        assert len(sudoku.solve(sudoku.BUILTIN[shape.n], shape, limit=2)) == 1


def test_tokens_and_text(tmp_path):
    ids = sudoku.to_tokens(torch.tensor([GRID6]), SIX)[0].tolist()
    assert ids[0] == sudoku.FIRST_CELL_TOKEN + 0 and ids[1] == sudoku.FIRST_CELL_TOKEN + 6 + 1  # cell 1, digit 2
    assert sudoku.from_tokens(ids, SIX) == GRID6
    sudoku.write_tokenizer(SIX, tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert sudoku.shape_of(tok) == SIX and tok.vocab_size == SIX.vocab_size
    assert tok.encode(" ".join(sudoku.token_name(i, d, 6) for i, d in enumerate(GRID6))) == ids
    puzzle = [d if i % 3 == 0 else 0 for i, d in enumerate(GRID6)]
    text = sudoku.template(puzzle, SIX)
    assert text.split()[:3] == ["r1c1=1", "_", "_"] and sudoku.parse_grid("1..4..2" + "." * 29, SIX)[:4] == [1, 0, 0, 4]
    assert sudoku.format_grid(GRID6, SIX).splitlines()[:3] == ["1 2 3|4 5 6", "4 5 6|1 2 3", "-----+-----"]


@pytest.mark.slow
def test_a_trained_model_runs_in_generate(tmp_path):
    """train.py --task sudoku for a few steps, exported, then generate.py shows a puzzle, a solution
    grid and the verdict (a model this briefly trained solves nothing: exit 1, 'invalid')."""
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    for args in (["--steps", "2", "--batch", "8", "--pool", "20", "--eval-every", "1"], ["--export", str(ckpt)]):
        p = subprocess.run([sys.executable, "train.py", "--task", "sudoku", "--grid", "6", "--out", str(out),
                            "--quiet", "--ar-weight", "0", "--preset", "tiny", *args], cwd=HERE, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "solved@1" in (out / "log.txt").read_text()
    p = subprocess.run([sys.executable, "generate.py", "--model", str(ckpt), "--steps", "3", "--samples", "2"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.stdout.startswith("puzzle (12 givens):") and "of 2 samples accepted by the Sudoku rules" in p.stderr
    if p.returncode == 0:  # a barely trained model: a valid grid is luck
        assert "solution (sample" in p.stdout and p.stdout.strip().endswith("valid ✓")
    else:
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: none of the 2 samples")
    from generate import load
    model, _ = load(ckpt, "cpu")
    grids = sudoku.solve_with(model, [sudoku.BUILTIN[6]], SIX, sudoku.generation_settings(SIX), samples=2)[0]
    for grid in grids:  # the givens are pinned: they come back
        assert all(g == d for g, d in zip(grid, sudoku.BUILTIN[6]) if d)


@pytest.mark.slow
def test_device_training_script_runs_small(tmp_path):
    """scripts/train_device.sh on the CPU, tiny and short: the files a device run returns, each small."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), MINUTES="0.05", BATCH="8", PUZZLES="4", DEVICE="cpu",
               PRESET="tiny")
    p = subprocess.run(["bash", "scripts/train_device.sh"], cwd=HERE, capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert len(files) <= 6 and all(f.stat().st_size <= 16 * 2 ** 20 for f in files)
    assert {"eval.json", "train_log.txt", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
