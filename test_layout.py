"""The layout itself: imports flow one way (the network never imports what uses it), the network files
run on their own and carry only the reference (no fast-path plumbing), every file stands alone and
stays short, no function takes many positional parameters, public functions say what they do, and
the usage lines at the top of each file run as written."""

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py")
PRODUCTS = sorted([*HERE.glob("server/*.py"), *HERE.glob("scripts/*.py"), HERE / "cuda_kernels" / "graph.py"])
MODULES = {p.stem for p in SOURCES} | {"cuda_kernels", "server", "scripts"}
NETWORK = {"model", "attention", "moe", "kvcache", "vision"}


def imports_of(path: Path) -> set[str]:
    """Project modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES


def graph() -> dict[str, set[str]]:
    g = {p.stem: imports_of(p) - {p.stem} for p in SOURCES}
    g["cuda_kernels"] = imports_of(HERE / "cuda_kernels" / "__init__.py")
    return g


def test_no_import_cycles():
    g, done, stack = graph(), set(), []

    def visit(m):
        if m in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(g.get(m, ())):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def test_network_imports_only_the_network():
    g = graph()
    for m in NETWORK:
        assert g[m] <= NETWORK, f"{m}.py imports {sorted(g[m] - NETWORK)}"
    assert g["cuda_kernels"] <= NETWORK and g["sampler"] <= NETWORK | {"streams"} and g["quant"] <= NETWORK
    assert not g["streams"]


def test_no_root_module_imports_the_products():
    """The root holds the library and its programs; server/ and scripts/ are built on it and stand
    apart (nothing at the root imports them), and only the fast-path choice reaches the CUDA graph."""
    g = graph()
    for m, deps in g.items():
        assert not deps & {"server", "scripts"}, f"{m}.py imports {sorted(deps & {'server', 'scripts'})}"
    assert "graph" not in {p.stem for p in SOURCES}


@pytest.mark.slow
def test_network_runs_copied_alone(tmp_path):
    """The network files, and the sampler with its random streams, copied into an empty folder: a
    forward pass, a whole block-diffusion generation, and the bundled weights loaded by the names
    model.py's header gives."""
    for m in NETWORK | {"sampler", "streams"}:
        shutil.copy(HERE / f"{m}.py", tmp_path)
    code = ("from model import DiffusionGemma, DiffusionGemmaConfig, init_weights; from sampler import block_diffusion, "
            "GenerationSettings\n"
            "m = init_weights(DiffusionGemma(DiffusionGemmaConfig.from_name('small')), seed=0)\n"
            "r = block_diffusion(m, [[2, 5, 9]], GenerationSettings(max_new_tokens=40), seeds=[0])\n"
            "print(r.canvases, len(r.tokens[0]) <= 40, tuple(r.sequences.shape))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.split()[1:] == ["True", "(1,", "67)"], p.stderr + p.stdout
    code = ("import torch; from model import DiffusionGemma, DiffusionGemmaConfig, init_weights; from kvcache import KVCache\n"
            "m = init_weights(DiffusionGemma(DiffusionGemmaConfig.from_name('small')), seed=0)\n"
            "c = KVCache(m.config.layer_types, m.config.sliding_window); m.forward_causal(torch.tensor([[2, 5, 9]]), c)\n"
            "print(tuple(m.forward_canvas(torch.arange(32)[None], c).shape))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "(1, 32, 8192)", p.stderr
    # the checkpoint's tensors by the names model.py's header gives (model.decoder.X is X; skip model.encoder.)
    code = ("import json, torch; from safetensors.torch import load_file; from model import DiffusionGemma, "
            "DiffusionGemmaConfig\n"
            f"d = {str(HERE / 'weights-code')!r}; index = json.load(open(d + '/model.safetensors.index.json'))\n"
            "state = {}\n"
            "for f in sorted(set(index['weight_map'].values())): state.update(load_file(d + '/' + f))\n"
            "m = DiffusionGemma(DiffusionGemmaConfig.from_name('small'))\n"
            "mine = {k.removeprefix('model.decoder.'): v for k, v in state.items() if k.startswith('model.decoder.')}\n"
            "print(m.load_state_dict(mine, strict=True), len(state) - len(mine))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().startswith("<All keys matched successfully>"), p.stderr
    code = ("import torch; from vision import Vision, VisionConfig\n"
            "v = Vision(VisionConfig(num_hidden_layers=1, hidden_size=24, intermediate_size=32, num_attention_heads=2,"
            " num_key_value_heads=2, head_dim=12, patch_size=2), text_hidden=16)\n"
            "places = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing='xy'), -1).reshape(1, 9, 2)\n"
            "print(tuple(v(torch.rand(1, 9, 12), places).shape))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "(1, 16)", p.stderr


def text_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    return [HERE / f for f in tracked if f.endswith((".py", ".md", ".sh", ".cu", ".cpp", ".txt", ".ini"))
            and (HERE / f).exists() and not f.startswith("weights")]


# a path outside the repository, however it is spelled: the sibling folder's name as a path part
# (../shared, parent / "shared", "shared/fixtures"), an absolute path, a cited document outside;
# and from a file at the top level, any climb above its folder (scripts/ may climb one, to the top)
OUTSIDE = [r"[./\\'\"]" + "shared" + r"[/\\'\"]", r"/" + "work/", r"/" + "home/", "SPEC" + r"\.md", "SPEC" + " §"]
CLIMB = [r"\.\./", r"parent\.parent", r"parents\[\d\]"]


def test_stands_alone():
    """No file cites a document or a path that is not in the repository."""
    for f in text_files():
        if f.name == "test_layout.py":
            continue
        text = f.read_text(encoding="utf-8")
        for pattern in OUTSIDE + (CLIMB if f.parent == HERE else []):
            found = re.search(pattern, text)
            assert not found, f"{f.name} reaches outside the repository: {text[max(0, found.start() - 40): found.end() + 20]!r}"


def test_the_outside_check_sees_every_spelling():
    spellings = ['HERE.parent / "shared" / "fixtures"', "../shared/fixtures", "Path(__file__).parent.parent",
                 "Path(__file__).parents[1]", "/work/shared", "see SPEC.md"]
    assert all(any(re.search(p, s) for p in OUTSIDE + CLIMB) for s in spellings)
    assert not any(re.search(p, s) for p in OUTSIDE + CLIMB for s in ["sharded", "a shared stream", "share_memory()"])


REFERENCE = ["kvcache.py", "model.py", "attention.py", "moe.py", "sampler.py", "streams.py", "vision.py"]


@pytest.mark.parametrize("name", REFERENCE)
def test_the_reference_files_carry_only_the_reference(name):
    """The CUDA graph's names appear nowhere in the files a learner reads first (the fast paths
    wrap them from outside: cuda_kernels/graph.py, cuda_kernels/), except on a one-line seam comment."""
    for n, line in enumerate((HERE / name).read_text().splitlines(), 1):
        if "seam" in line:
            continue
        for word in ("Static", "sync_free", "sc_gate", "graph", "Graph"):
            assert word not in line, f"{name}:{n} mentions {word}: {line.strip()}"


def functions():
    for path in SOURCES + [HERE / "cuda_kernels" / "__init__.py"] + sorted((HERE / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield path, node


def test_no_function_takes_more_than_six_positional_parameters():
    wide = [f"{p.name}:{n.lineno} {getattr(n, 'name', 'lambda')}" for p, n in functions()
            if len([a for a in n.args.posonlyargs + n.args.args if a.arg not in ("self", "cls")]) > 6]
    assert not wide, f"more than six positional parameters (make the rest keyword-only): {wide}"


def test_the_sampler_step_stays_small():
    (step,) = [n for p, n in functions() if p.name == "sampler.py" and getattr(n, "name", "") == "sampler_step"]
    assert step.end_lineno - step.lineno + 1 <= 40 and len(step.args.args) <= 6


@pytest.mark.parametrize("path", SOURCES + PRODUCTS + sorted(HERE.glob("test_*.py")), ids=lambda p: p.name)
def test_files_stay_short(path):
    """The style guide's bound: a file past ~500 lines is probably two concepts."""
    assert len(path.read_text().splitlines()) <= 500, f"{path.name} has grown past one concept"


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES + PRODUCTS + [HERE / "cuda_kernels" / "__init__.py"], ids=lambda p: str(p.relative_to(HERE)))
def test_public_functions_have_docstrings(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} has no header docstring"
    missing = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and not n.name.startswith("_") and not ast.get_docstring(n) and n.name not in ("main",)]
    assert not missing, f"{path.name}: no docstring for {missing}"


def usage_lines(path: Path) -> list[str]:
    """The usage blocks of the header docstring: indented groups that begin as code does."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    groups, current = [], []
    for ln in doc.splitlines() + [""]:
        if ln.startswith("    "):
            current.append(ln[4:])
        else:
            if current:
                groups.append(current)
            current = []
    return [ln for g in groups if g[0].startswith(("python ", "torchrun ", "import ", "from ")) for ln in g]


def program_of(words: list[str]) -> tuple[str, list[str]]:
    """The module a command line runs (python X.py, python scripts/X.py, python -m X, torchrun ...
    X.py) and its arguments: "generate", "scripts.bench", "server.__main__"."""
    if "-m" in words:
        i = words.index("-m")
        name = words[i + 1]
        return name + (".__main__" if (HERE / name / "__main__.py").exists() else ""), words[i + 2:]
    start = next(i for i, w in enumerate(words) if w.endswith(".py"))  # after python / torchrun's own flags
    return words[start].removesuffix(".py").replace("/", "."), words[start + 1:]


def test_program_of_reads_every_form():
    assert program_of(shlex.split("python generate.py --steps 3")) == ("generate", ["--steps", "3"])
    assert program_of(shlex.split("python scripts/bench.py --tiny")) == ("scripts.bench", ["--tiny"])
    assert program_of(shlex.split("python -m server --port 1")) == ("server.__main__", ["--port", "1"])
    assert program_of(shlex.split("python -m scripts.eval")) == ("scripts.eval", [])
    assert program_of(shlex.split("torchrun --nproc-per-node 2 generate.py x")) == ("generate", ["x"])


@pytest.mark.parametrize("path", SOURCES + PRODUCTS + [HERE / "cuda_kernels" / "__init__.py"],
                         ids=lambda p: str(p.relative_to(HERE)))
@pytest.mark.slow
def test_usage_lines_run_as_written(path):
    lines = usage_lines(path)
    assert lines, f"{path.name} has no usage lines"
    shell = [ln for ln in lines if ln.startswith(("python ", "torchrun "))]
    code = "\n".join(ln for ln in lines if ln not in shell)
    for ln in shell:  # each command's flags are checked by the program's own parser
        module, argv = program_of(shlex.split(ln, comments=True))
        p = subprocess.run([sys.executable, "-c", f"import sys, importlib; m = importlib.import_module({module!r}); "
                            "m.build_parser().parse_args(sys.argv[1:])", *argv],
                           cwd=HERE, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{ln}: {p.stderr}"
    if code.strip():
        p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{path.name} usage:\n{code}\n{p.stderr[-2000:]}"


def test_the_readmes_reading_list_is_true():
    """README's "Read the code": the reference files in order, with line counts within 10% of the files'."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Read the code", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| \d \| `(\w+\.py)` \| ([\d,]+) \|", section, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(REFERENCE), rows
    for name, lines in rows:
        actual = len((HERE / name).read_text().splitlines())
        assert abs(actual - int(lines.replace(",", ""))) <= 0.1 * actual, f"{name}: README says {lines}, it has {actual}"


def test_every_file_a_readme_names_exists():
    for readme in [HERE / "README.md", *HERE.glob("*/README.md")]:
        for name in set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|sh|html|cu|cpp))`", readme.read_text())):
            found = (readme.parent / name).exists() or (HERE / name).exists() or any(HERE.glob(f"*/{name}"))
            assert found, f"{readme.relative_to(HERE)} names {name}, which is not in the repository"
