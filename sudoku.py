"""Sudoku as a block-diffusion task: grids, puzzles with one solution, and their tokens.

A solved n x n grid (n = 6 with 2 x 3 boxes, or 9 with 3 x 3) is one canvas of n*n tokens after a
<bos>. Each token names its cell and its digit ("r1c1=5"), so the model is told where every cell
is; token (cell, digit) = FIRST_CELL_TOKEN + cell * n + digit - 1. A puzzle's givens are pinned
positions of the canvas: the model denoises only the empty cells, and the solution is checked.

Training grids come from a pool of base grids made by randomised backtracking, with the symmetries
that keep a grid valid applied on the fly (relabel the digits; permute the rows within a band, the
bands, the columns within a stack, the stacks; transpose when the boxes are square), so that no two
batches repeat. Evaluation puzzles come from other base grids (another seed), with cells removed
one by one while the solution stays unique.

    import sudoku
    shape = sudoku.SHAPES[6]
    puzzle, solution = sudoku.make_puzzle(shape, givens=14, seed=1)
    print(sudoku.format_grid(puzzle, shape))
    assert sudoku.is_valid(solution, shape)
"""

import random
from dataclasses import dataclass

import torch

from sampler import GenerationSettings, SamplerSettings, block_diffusion
from structured import Allowed

FIRST_CELL_TOKEN = 4  # after <pad> <eos> <bos> <unk>
BOS = 2
# givens of the evaluation slices: "easy" (>= 30 of 81, and the same share of 36) and "hard"
EASY = {6: (14, 20), 9: (30, 40)}
HARD = {6: (8, 11), 9: (20, 25)}
VALIDATION_SEED, TEST_SEED = 10 ** 6, 2 * 10 ** 6  # puzzles seen while training / reported by scripts/eval.py
DEMO_SAMPLES = 8  # bare `python generate.py` solves its puzzle best-of-8, with the rules as the check
# the 9x9 model's size (model.CONFIGS["sudoku-6"] is the bundled 6x6 one): 7.8M parameters, one canvas a grid
SUDOKU_9 = dict(vocab_size=4 + 81 * 9, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                intermediate_size=384, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
                sliding_window=128, max_position_embeddings=2 * 81 + 8, canvas_length=81, eos_token_id=[1],
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2)


@dataclass(frozen=True)
class Shape:
    """An n x n grid with boxes of box_rows x box_cols."""
    n: int  # digits 1..n, an n x n grid
    box_rows: int
    box_cols: int

    @property
    def cells(self) -> int:
        return self.n * self.n

    @property
    def vocab_size(self) -> int:
        return FIRST_CELL_TOKEN + self.cells * self.n


SHAPES = {6: Shape(6, 2, 3), 9: Shape(9, 3, 3)}
# the puzzles bare `python generate.py` solves (make_puzzle(shape, 12 / 30 givens, seed=7))
BUILTIN = {6: [0 if ch == "." else int(ch) for ch in "..61..2....364.3.532...4...........6"],
           9: [0 if ch == "." else int(ch) for ch in
               ".......9.376..9.25...54...34.2.3..816........5....47.9.6.9.....941....3.8.....916"]}


# ---------------------------------------------------------------------------------------------
# Checking and solving (grids are lists of n*n ints, 0 for an empty cell)
# ---------------------------------------------------------------------------------------------

def units(shape: Shape) -> list[list[int]]:
    """The cell indices of every row, column and box."""
    n = shape.n
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(br + i) * n + bc + j for i in range(shape.box_rows) for j in range(shape.box_cols)]
             for br in range(0, n, shape.box_rows) for bc in range(0, n, shape.box_cols)]
    return rows + cols + boxes


def is_valid(grid: list[int], shape: Shape, puzzle: list[int] | None = None) -> bool:
    """A full grid whose rows, columns and boxes each hold 1..n once (and that keeps the givens)."""
    if len(grid) != shape.cells or any(not 1 <= d <= shape.n for d in grid):
        return False
    if puzzle is not None and any(p and p != g for p, g in zip(puzzle, grid)):
        return False
    return all(sorted(grid[i] for i in unit) == list(range(1, shape.n + 1)) for unit in units(shape))


def _peers(shape: Shape) -> list[set[int]]:
    peers = [set() for _ in range(shape.cells)]
    for unit in units(shape):
        for i in unit:
            peers[i].update(unit)
    for i, p in enumerate(peers):
        p.discard(i)
    return peers


def solve(grid: list[int], shape: Shape, limit: int = 2, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions, by backtracking on the cell with the fewest candidates."""
    peers, full = _peers(shape), set(range(1, shape.n + 1))
    grid, found = list(grid), []

    def search():
        best, best_cands = None, None
        for i, d in enumerate(grid):
            if d == 0:
                cands = full - {grid[j] for j in peers[i]}
                if best is None or len(cands) < len(best_cands):
                    best, best_cands = i, cands
                    if len(cands) <= 1:
                        break
        if best is None:
            found.append(list(grid))
            return
        order = sorted(best_cands)
        if rng is not None:
            rng.shuffle(order)
        for d in order:
            grid[best] = d
            search()
            if len(found) >= limit:
                return
        grid[best] = 0

    search()
    return found


def random_grid(shape: Shape, rng: random.Random) -> list[int]:
    """A uniformly shuffled search from the empty grid: one random solved grid."""
    return solve([0] * shape.cells, shape, limit=1, rng=rng)[0]


def make_puzzle(shape: Shape, givens: int, seed: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution): a random grid with cells removed in random order while the solution stays
    unique, down to `givens` (or as few as uniqueness allows)."""
    rng = random.Random(seed)
    solution = random_grid(shape, rng)
    puzzle = list(solution)
    order = list(range(shape.cells))
    rng.shuffle(order)
    left = shape.cells
    for i in order:
        if left <= givens:
            break
        keep, puzzle[i] = puzzle[i], 0
        if len(solve(puzzle, shape, limit=2)) == 1:
            left -= 1
        else:
            puzzle[i] = keep
    return puzzle, solution


def eval_puzzles(shape: Shape, count: int, givens: tuple[int, int], seed: int) -> list[tuple[list[int], list[int]]]:
    """`count` unique-solution puzzles with a number of givens drawn from the range [lo, hi]."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        target = rng.randint(*givens)
        puzzle, solution = make_puzzle(shape, target, rng.randrange(2 ** 62))
        if givens[0] <= sum(1 for d in puzzle if d) <= givens[1]:
            out.append((puzzle, solution))
    return out


# ---------------------------------------------------------------------------------------------
# Training grids: a pool of base grids, symmetries on the fly (tensors (B, n, n) of digits 1..n)
# ---------------------------------------------------------------------------------------------

def base_pool(shape: Shape, count: int, seed: int) -> torch.Tensor:
    """count random solved grids (B, n, n), the seeds of the training grids."""
    rng = random.Random(seed)
    return torch.tensor([random_grid(shape, rng) for _ in range(count)], dtype=torch.long).view(count, shape.n, shape.n)


def _block_perm(batch: int, blocks: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(B, blocks*size) index permutations that shuffle the blocks and the lines within each block."""
    outer = torch.argsort(torch.rand(batch, blocks, generator=g), dim=1)  # (B, blocks)
    inner = torch.argsort(torch.rand(batch, blocks, size, generator=g), dim=2)  # (B, blocks, size)
    return (outer[:, :, None] * size + inner).reshape(batch, blocks * size)


def augmented(pool: torch.Tensor, shape: Shape, batch: int, g: torch.Generator) -> torch.Tensor:
    """(B, n*n) solved grids: random pool entries under random validity-preserving symmetries."""
    n = shape.n
    grids = pool[torch.randint(0, len(pool), (batch,), generator=g)]  # (B, n, n)
    digits = torch.argsort(torch.rand(batch, n, generator=g), dim=1) + 1  # (B, n): relabel d -> digits[d-1]
    grids = torch.gather(digits, 1, (grids - 1).view(batch, -1)).view(batch, n, n)
    rows = _block_perm(batch, n // shape.box_rows, shape.box_rows, g)  # bands of box_rows rows
    grids = torch.gather(grids, 1, rows[:, :, None].expand(-1, -1, n))
    cols = _block_perm(batch, n // shape.box_cols, shape.box_cols, g)  # stacks of box_cols columns
    grids = torch.gather(grids, 2, cols[:, None, :].expand(-1, n, -1))
    if shape.box_rows == shape.box_cols:
        flip = torch.rand(batch, generator=g) < 0.5
        grids = torch.where(flip[:, None, None], grids.transpose(1, 2), grids)
    return grids.reshape(batch, n * n)


# ---------------------------------------------------------------------------------------------
# Tokens and text
# ---------------------------------------------------------------------------------------------

def to_tokens(grids: torch.Tensor, shape: Shape) -> torch.Tensor:
    """(B, n*n) digits 1..n -> (B, n*n) token ids."""
    cells = torch.arange(shape.cells, device=grids.device)
    return FIRST_CELL_TOKEN + cells * shape.n + grids - 1


def from_tokens(ids: list[int], shape: Shape) -> list[int]:
    """Token ids -> digits (0 where a token is not that cell's)."""
    out = []
    for cell, t in enumerate(ids[: shape.cells]):
        d = t - FIRST_CELL_TOKEN - cell * shape.n + 1
        out.append(d if 1 <= d <= shape.n else 0)
    return out + [0] * (shape.cells - len(out))


def token_name(cell: int, digit: int, n: int) -> str:
    """The token of a digit in a cell: r{row}c{col}={digit}, 1-based."""
    return f"r{cell // n + 1}c{cell % n + 1}={digit}"


def template(puzzle: list[int], shape: Shape, hole: str = "_") -> str:
    """The puzzle as template text for generate.py --template: a token per given, `hole` per empty cell."""
    return " ".join(token_name(i, d, shape.n) if d else hole for i, d in enumerate(puzzle))


def parse_grid(text: str, shape: Shape) -> list[int]:
    """Digits of a grid written as text: n*n digits, 0 or . for empty cells; other characters are
    ignored. ValueError names what is wrong: the count, a digit out of range, givens that clash, or
    a puzzle without a solution."""
    cells = [0 if ch in ".0" else int(ch) for ch in text if ch == "." or ch.isdigit()]
    if len(cells) != shape.cells:
        raise ValueError(f"a {shape.n}x{shape.n} grid needs {shape.cells} digits 1-{shape.n} (0 or . for empty), "
                         f"got {len(cells)}")
    wrong = next((i for i, d in enumerate(cells) if d > shape.n), None)
    if wrong is not None:
        raise ValueError(f"{token_name(wrong, cells[wrong], shape.n)} is out of range: the digits are 1-{shape.n}")
    for unit in units(shape):
        seen = {}
        for i in unit:
            if cells[i] and cells[i] in seen:
                raise ValueError(f"{token_name(seen[cells[i]], cells[i], shape.n)} and "
                                 f"{token_name(i, cells[i], shape.n)} share a row, column or box")
            seen[cells[i]] = i
    if not solve(cells, shape, limit=1):
        raise ValueError("the puzzle has no solution: check the givens")
    return cells


def format_grid(grid: list[int], shape: Shape) -> str:
    """The grid as lines of digits, boxes separated, '.' for empty cells."""
    n, lines = shape.n, []
    for r in range(n):
        if r and r % shape.box_rows == 0:
            lines.append("+".join(["-" * (2 * shape.box_cols - 1)] * (n // shape.box_cols)))
        row = [str(grid[r * n + c] or ".") for c in range(n)]
        lines.append("|".join(" ".join(row[c: c + shape.box_cols]) for c in range(0, n, shape.box_cols)))
    return "\n".join(lines)


def shape_of(tokenizer) -> Shape | None:
    """The Sudoku shape a tokenizer was made for, or None for any other tokenizer."""
    for shape in SHAPES.values():
        if tokenizer.token_id(token_name(shape.cells - 1, shape.n, shape.n)) == shape.vocab_size - 1:
            return shape
    return None


def write_tokenizer(shape: Shape, path) -> None:
    """A word-level tokenizer.json: <pad> <eos> <bos> <unk>, then one token per (cell, digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for cell in range(shape.cells):
        for d in range(1, shape.n + 1):
            vocab[token_name(cell, d, shape.n)] = FIRST_CELL_TOKEN + cell * shape.n + d - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.save(str(path))


# ---------------------------------------------------------------------------------------------
# Solving with a model
# ---------------------------------------------------------------------------------------------

def generation_settings(shape: Shape) -> GenerationSettings:
    """The sampling of a Sudoku model (its generation_config.json): one canvas, no end token, a
    generous step budget."""
    return GenerationSettings(max_new_tokens=shape.cells, sampler=SamplerSettings(max_steps=32, entropy_bound=0.5),
                              eos_token_ids=(), pad_token_id=0)


def pins_of(puzzle: list[int], shape: Shape) -> dict[int, int]:
    """{canvas offset: token} of the givens."""
    return {i: FIRST_CELL_TOKEN + i * shape.n + d - 1 for i, d in enumerate(puzzle) if d}


def cells_allowed(shape: Shape) -> Allowed:
    """Each canvas position may take only its own cell's tokens (block_diffusion's allowed=): no
    sample names a cell where another belongs."""
    return Allowed([[FIRST_CELL_TOKEN + cell * shape.n + d for d in range(shape.n)] for cell in range(shape.cells)],
                   [{cell: cell for cell in range(shape.cells)}])


@torch.no_grad()
def solve_with(model, puzzles: list[list[int]], shape: Shape, settings: GenerationSettings,
               samples: int = 1, **kw) -> list[list[list[int]]]:
    """Per puzzle, `samples` grids denoised by the model with the givens pinned (one batch).
    kw: block_diffusion's options (seeds, one per puzzle and sample; denoise; ...)."""
    prompts = [[BOS]] * (len(puzzles) * samples)
    pins = [pins_of(p, shape) for p in puzzles for _ in range(samples)]
    result = block_diffusion(model, prompts, settings.copy(max_new_tokens=shape.cells), pins=pins, **kw)
    grids = [from_tokens(row[1:].tolist(), shape) for row in result.sequences]
    return [grids[i * samples: (i + 1) * samples] for i in range(len(puzzles))]


def solve_rate(model, pairs: list[tuple[list[int], list[int]]], shape: Shape, settings: GenerationSettings, *,
               samples: int = 1, seed: int = 0, batch: int = 256) -> float:
    """Share of puzzles solved exactly: with samples > 1, by any sample that passes the validity check
    (best-of-N; a valid grid that keeps the givens of a unique-solution puzzle is its solution)."""
    torch.manual_seed(seed)
    solved, per_batch = 0, max(1, batch // samples)
    for i in range(0, len(pairs), per_batch):
        chunk = pairs[i: i + per_batch]
        for (puzzle, solution), grids in zip(chunk, solve_with(model, [p for p, _ in chunk], shape, settings, samples)):
            solved += any(is_valid(g, shape, puzzle) for g in grids)
    return solved / max(len(pairs), 1)
