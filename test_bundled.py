"""The bundled models as a new user meets them: bare `python generate.py` solves its built-in Sudoku
(the solution is checked against the puzzle's one solution), and the code model continues a prompt."""

import subprocess
import sys
from pathlib import Path

import sudoku

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
    assert p.stdout.startswith(f"puzzle ({sum(1 for d in puzzle if d)} givens):\n{sudoku.format_grid(puzzle, shape)}\n")
    assert f"solution:\n{sudoku.format_grid(solution, shape)}\nvalid ✓\n" in p.stdout
    assert "samples pass the Sudoku rules" in p.stderr.strip().splitlines()[-1]


def test_a_puzzle_of_ones_own():
    shape = sudoku.SHAPES[6]
    puzzle, solution = sudoku.make_puzzle(shape, givens=16, seed=12345)
    p = run("--sudoku", "".join(str(d) if d else "." for d in puzzle))
    assert p.stdout.startswith("puzzle (16 givens):") and "solution:" in p.stdout, p.stderr
    verdict = p.stdout.strip().splitlines()[-1]
    assert (verdict, p.returncode) in (("valid ✓", 0), ("invalid ✗", 1))
    if verdict == "valid ✓":  # a valid grid that keeps the givens of a one-solution puzzle is its solution
        assert sudoku.format_grid(solution, shape) in p.stdout
    bad = run("--sudoku", "123")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sudoku: a 6x6 grid needs 36 digits")


def test_code_model_continues_a_prompt():
    p = run("--model", "weights-code", "--max-new-tokens", "12", "--steps", "4", "def fibonacci(n):")
    assert p.returncode == 0 and p.stdout.startswith("def fibonacci(n):") and len(p.stdout) > len("def fibonacci(n):\n")
