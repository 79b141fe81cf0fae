"""The training corpus of the bundled code model: the Python standard library, and its tokenizer.

The .py files of this interpreter's standard library (tests excluded), about 5% of them held out by
name and never trained on, a manifest with each file's sha256, and a byte-level BPE tokenizer
trained on the training files with the special tokens <pad> <eos> <bos> <unk> at ids 0-3, as the
model's config names them. Used by train.py, scripts/eval.py and the tests.

    from data import stdlib_files, is_held_out
    files = [f for f in stdlib_files() if not is_held_out(f)]
"""

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import torch

PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # at ids 0..3


def stdlib_files() -> list[Path]:
    """The standard library's .py files, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)
             and not p.name.startswith("test_")]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def write_manifest(files: list[Path], path: Path) -> None:
    """One line per file: its sha256 and its path in the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root)}" for f in files]
    path.write_text(f"# Python {sys.version.split()[0]} standard library, {len(files)} files\n" + "\n".join(lines) + "\n")


def is_held_out(f: Path) -> bool:
    """About 5% of the files, chosen by name, never trained on."""
    return hashlib.sha256(f.name.encode()).digest()[0] < 13


def train_tokenizer(texts, vocab_size: int, out: Path):
    """A byte-level BPE over an iterable of texts, saved as tokenizer.json at out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return tok


def encode_corpus(tok, files: list[Path]) -> torch.Tensor:
    """All files as one stream of token ids, each file followed by <eos>."""
    ids = []
    for enc in tok.encode_batch([f.read_text(encoding="utf-8", errors="replace") for f in files],
                                add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int32)


def prepare(out: Path, vocab_size: int, max_files: int | None = None):
    """Tokenizer, manifest and the encoded corpus, made once per run directory."""
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    if max_files:
        train_files = [f for f in files if not is_held_out(f)][:max_files]
        files = train_files + [f for f in files if is_held_out(f)][:max(1, max_files // 4)]
    if not (out / "tokenizer.json").exists():  # each file is written under a temporary name, then renamed
        write_manifest(files, out / "manifest.txt.tmp")
        os.replace(out / "manifest.txt.tmp", out / "manifest.txt")
        train_tokenizer((f.read_text(encoding="utf-8", errors="replace") for f in files if not is_held_out(f)),
                        vocab_size, out / "tokenizer.json.tmp")
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    if not (out / "data.pt").exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        torch.save({"train": encode_corpus(tok, [f for f in files if not is_held_out(f)]),
                    "heldout": encode_corpus(tok, [f for f in files if is_held_out(f)])}, out / "data.pt.tmp")
        os.replace(out / "data.pt.tmp", out / "data.pt")
    return torch.load(out / "data.pt")
