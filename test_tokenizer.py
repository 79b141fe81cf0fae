"""The tokenizer and the chat format: both revisions of the released chat template rendered as
transformers renders them and tokenized to the published ids, the built-in format equal to the
canonical template, thoughts split from answers by token id, and broken templates named."""

import copy
import os
import shutil

import pytest

from conftest import GEMMA4_TOKENIZER, TEMPLATES, needs_gemma4
from hfconfig import CheckpointError
from tokenizer import ChatFormat, compile_template, load_tokenizer

pytestmark = needs_gemma4
PORTUGAL = "Write a long essay about Portugal."
PUBLISHED_OFF = [2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107, 105, 4368, 107, 100, 45518,
                 107, 101]  # release template, thinking off (transformers' integration test)
PUBLISHED_ON = [2, 105, 9731, 107, 98, 107, 106, 107, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106,
                107, 105, 4368, 107]  # thinking on, both revisions
CONVERSATIONS = {
    "user": [{"role": "user", "content": PORTUGAL}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "whitespace": [{"role": "user", "content": "  Why is the sky blue?\n"}],
    "history-with-thought": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "<|channel>thought\nplan<channel|>Hello!"},
                             {"role": "user", "content": "Bye"}],
}


def tokenizer_with(tmp_path, template: str | None):
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    target = d / "tokenizer.json"
    if not target.exists():
        try:
            os.symlink(GEMMA4_TOKENIZER, target)
        except OSError:
            shutil.copy(GEMMA4_TOKENIZER, target)
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The Gemma 4 tokenizer without a template (read once: it is 16 MB)."""
    return tokenizer_with(tmp_path_factory.mktemp("gemma4"), None)


def with_template(plain, template: str):
    tok = copy.copy(plain)
    tok.template = compile_template(template, "chat_template.jinja")
    return tok


def reference(template: str, messages, thinking: bool) -> str:
    """transformers' own renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                        enable_thinking=thinking, bos_token="<bos>")
    return rendered[0]


@pytest.mark.parametrize("revision", ["release-2026-06", "canonical-2026-07"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
def test_template_renders_as_transformers(plain, revision, conversation, thinking):
    template = (TEMPLATES / f"{revision}.jinja").read_text()
    tok = with_template(plain, template)
    messages = CONVERSATIONS[conversation]
    text = tok.render_chat(messages, thinking=thinking)
    assert text == reference(template, messages, thinking)
    assert tok.apply_chat_template(messages, thinking=thinking) == tok.encode(text)
    if conversation == "whitespace":
        assert "user\nWhy is the sky blue?<turn|>" in text  # the template trims the user's text
    if conversation == "history-with-thought":
        assert "plan" not in text and "<|turn>model\nHello!<turn|>\n" in text  # earlier thoughts dropped


@pytest.mark.parametrize("revision", ["release-2026-06", "canonical-2026-07"])
def test_published_ids(tmp_path, revision):
    tok = tokenizer_with(tmp_path, (TEMPLATES / f"{revision}.jinja").read_text())  # from the file, as shipped
    user = [{"role": "user", "content": PORTUGAL}]
    off = tok.apply_chat_template(user)
    assert off == (PUBLISHED_OFF if revision.startswith("release") else PUBLISHED_OFF[:-4])  # no empty thought
    assert tok.apply_chat_template(user, thinking=True) == PUBLISHED_ON
    assert tok.prompt_ids(PORTUGAL, ChatFormat(thinking=True)) == PUBLISHED_ON


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
def test_builtin_format_is_the_canonical_template(plain, conversation, thinking):
    tok = plain  # no template: the built-in canonical format
    assert tok.template is None and tok.is_chat
    canonical = (TEMPLATES / "canonical-2026-07.jinja").read_text()
    messages = CONVERSATIONS[conversation]
    assert tok.render_chat(messages, thinking=thinking) == reference(canonical, messages, thinking)


def test_split_thought_by_id(plain):
    tok = plain
    thought, answer = tok.encode("Let me think"), tok.encode("The answer.")
    label = tok.encode("thought\n")
    whole = tok.split_thought([100] + label + thought + [101] + answer)
    assert (whole.answer, whole.thought) == (answer, thought)
    assert tok.decode(whole.answer) == "The answer."  # no literal "thought" leaks into it
    plain = tok.split_thought(answer)
    assert (plain.answer, plain.thought) == (answer, None)
    unfinished = tok.split_thought([100] + label + thought)
    assert (unfinished.answer, unfinished.thought) == ([], thought)


def test_bad_templates_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="chat_template.jinja is not a valid jinja template"):
        tokenizer_with(tmp_path, "{% if %}")
    tok = tokenizer_with(tmp_path, "{{ raise_exception('only user turns') }}")
    with pytest.raises(CheckpointError, match="chat_template.jinja failed on this conversation: only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_in_tokenizer_config(tmp_path):
    tokenizer_with(tmp_path, None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<bos>"}, "chat_template": "{{ bos_token }}[{{ messages[0].content }}]"}')
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "<bos>[x]"
