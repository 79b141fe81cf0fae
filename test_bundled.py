"""The bundled models as a new user meets them: bare `python generate.py` solves its built-in Sudoku
(the solution is checked against the puzzle's one solution), and the code model continues a prompt."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import sudoku

pytestmark = pytest.mark.slow  # every test here starts programs

HERE = Path(__file__).resolve().parent


def run(*args):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=300)


def test_bare_generate_solves_its_puzzle():
    p = run()
    assert p.returncode == 0, p.stderr[-2000:]
    shape = sudoku.SHAPES[6]
    puzzle = sudoku.BUILTIN[6]
    (solution,) = sudoku.solve(puzzle, shape, limit=2)
    assert p.stdout.startswith(f"puzzle ({sum(1 for d in puzzle if d)} givens):\n{sudoku.format_grid(puzzle, shape)}\n\n")
    assert re.search(r"solution \(sample \d of 8\):\n" + re.escape(f"{sudoku.format_grid(solution, shape)}\nvalid ✓\n"),
                     p.stdout), p.stdout
    assert re.search(r"\d of 8 samples accepted by the Sudoku rules$", p.stderr.strip().splitlines()[-1])


def test_a_puzzle_of_ones_own():
    shape = sudoku.SHAPES[6]
    puzzle, solution = sudoku.make_puzzle(shape, givens=16, seed=12345)
    p = run("--sudoku", "".join(str(d) if d else "." for d in puzzle))
    assert p.stdout.startswith("puzzle (16 givens):"), p.stderr
    if p.returncode == 0:  # a valid grid that keeps the givens of a one-solution puzzle is its solution
        assert p.stdout.strip().endswith(f"{sudoku.format_grid(solution, shape)}\nvalid ✓")
    else:
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: none of the 8 samples")


@pytest.mark.parametrize("grid,message", [
    ("123", "a 6x6 grid needs 36 digits 1-6 (0 or . for empty), got 3"),
    ("7" + "." * 35, "r1c1=7 is out of range: the digits are 1-6"),
    ("11" + "." * 34, "r1c1=1 and r1c2=1 share a row, column or box"),
    ("12345." + "." * 29 + "6", "the puzzle has no solution: check the givens"),  # r1c6 must be 6, and column 6 has a 6
])
def test_a_puzzle_that_cannot_be_solved_is_refused(grid, message):
    p = run("--sudoku", grid)
    assert p.returncode == 2 and p.stderr == f"error: --sudoku: {message}\n" and p.stdout == ""


def test_a_prompt_or_a_chat_to_the_sudoku_model_is_refused():
    for args in (["hello"], ["--chat"], ["--batch-file", "README.md"]):
        p = run(*args)
        assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
        assert p.stderr.startswith("error: weights is a Sudoku model") and "--model weights-code" in p.stderr, p.stderr


def test_print_prompt_shows_what_the_sudoku_model_gets():
    p = run("--print-prompt")
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[0] == "<bos>" and lines[1].startswith("canvas: _ _ r1c3=6 r1c4=1 _ _ r2c1=2")
    assert lines[1].count("_") == 36 - 12 and p.stderr.strip() == "1 prompt tokens, 36 canvas positions, 12 pinned"


def test_code_model_continues_a_prompt():
    p = run("--model", "weights-code", "--max-new-tokens", "12", "--steps", "4", "def fibonacci(n):")
    assert p.returncode == 0 and p.stdout.startswith("def fibonacci(n):") and len(p.stdout) > len("def fibonacci(n):\n")
