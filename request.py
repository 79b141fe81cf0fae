"""What every entrance checks before it generates: the command line (job.py), the Python API
(generate.py) and the server (server/api.py) refuse the same requests, in the same words, before
any weight is read where they can. A refusal is a sampler.RequestError: the command line prints it
as one line (exit 2), the server answers 400 naming the field, Python raises it.

The numbers of a request (max_new_tokens, steps, entropy_bound) are checked where they are set,
GenerationSettings.copy; the prompt's length against the model's positions by sampler.check_context.

    from request import check_prompts, check_text_model, check_chat
    from tokenizer import ChatFormat, load_tokenizer
    tok = load_tokenizer("weights-code")
    check_text_model(tok, "weights-code"); check_chat(tok, "weights-code", ChatFormat(raw=True))  # both pass
    print(check_prompts(["a", "b"]))  # ChatFormat(system="Be brief.") would be a RequestError: no chat format
"""

import sudoku
from sampler import RequestError
from tokenizer import ChatFormat, Tokenizer


def check_prompts(prompt) -> list[str]:
    """A request's prompts, one string or a list of them, as a list; RequestError for anything else."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"the prompt must be a string or a non-empty list of strings, not {type(prompt).__name__}")
    return list(prompts)


def check_text_model(tok: Tokenizer, name: str) -> None:
    """RequestError when the checkpoint is a Sudoku model, which fills grids and reads no text."""
    shape = sudoku.shape_of(tok)
    if shape is not None:
        raise RequestError(f"{name} is a Sudoku model: it fills {shape.n}x{shape.n} grids, not text; give it "
                           "--sudoku GRID (or nothing, for its built-in puzzle; sudoku.solve_with in Python), or use "
                           "--model weights-code for text")


def check_chat(tok: Tokenizer, name: str, chat: ChatFormat, conversation: bool = False, instead: str = "") -> None:
    """RequestError when the chat format asked for cannot be had: a system prompt or thinking with a
    raw prompt, which is given as written; a system prompt, thinking or a conversation from a
    tokenizer without a chat format (instead: what to use there)."""
    if chat.raw and (chat.thinking or chat.system is not None):
        raise RequestError("a raw prompt is given to the model as written: a system prompt and thinking go with "
                           "the chat format (leave out raw)")
    if (conversation or chat.thinking or chat.system is not None) and not tok.is_chat:
        raise RequestError(f"{name} has no chat format (no chat template or turn markers in its tokenizer): a "
                           "conversation, a system prompt and thinking need an instruction-tuned checkpoint"
                           + (f"; {instead}" if instead else ""))
