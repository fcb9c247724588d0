"""The runtime's prompt string equals transformers' apply_chat_template, for every template we know.

Templates (tests/data/chat_templates): the official Qwen2-VL one (Qwen2.5-VL ships the same text; it
writes a default system turn), the official Qwen3-VL-Instruct one (no default system turn; its
sha256 is pinned below), and a fine-tune's own format (own default system text, question before
the pages, numbered pages, a renamed role, raise_exception for unknown roles).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.chat import (ChatTemplate, check_messages, image_source, media_items, probe,
                                      resolve_template, user_messages)

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
NAMES = ("qwen2_vl", "qwen3_vl", "custom_reader")
QWEN3_VL_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"  # Qwen3-VL-8B-Instruct's


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from qvl_export.loading.synthetic import train_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(640), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


CHATS = {
    "text-only": user_messages("Write the word invoice three times."),
    "one-image": user_messages("What is the total?", 1),
    "two-images+system": user_messages("Compare the totals.", 2, system="Answer briefly."),
    "string-content": [{"role": "user", "content": "Hello there"}],
    "multi-turn": [
        {"role": "system", "content": [{"type": "text", "text": "You read invoices."}]},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Total?"}]},
        {"role": "assistant", "content": "2754"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "118"}]},
        {"role": "user", "content": "Sum them."},
    ],
}


def test_qwen3_vl_template_is_the_official_text():
    assert hashlib.sha256(template("qwen3_vl").encode("utf-8")).hexdigest() == QWEN3_VL_SHA256


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", NAMES)
def test_prompt_equals_apply_chat_template(name, chat, hf_tokenizer):
    src = template(name)
    messages = CHATS[chat]
    for add_generation_prompt in (True, False):
        ours = ChatTemplate(src, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}).render(
            messages, add_generation_prompt=add_generation_prompt)
        ref = hf_tokenizer.apply_chat_template(messages, chat_template=src, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        assert ours == ref
    n_images = len(media_items(messages))
    assert ours.count("<|image_pad|>") == n_images


def test_system_turn_depends_on_the_template():
    """Without a system message Qwen2-VL's template writes its default, Qwen3-VL's writes none."""
    chat = user_messages("Hi", 1)
    assert ChatTemplate(template("qwen2_vl")).render(chat).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert ChatTemplate(template("qwen3_vl")).render(chat).startswith("<|im_start|>user\n<|vision_start|>")
    assert "You read documents." in ChatTemplate(template("custom_reader")).render(chat)


def test_template_raise_exception_is_one_line():
    chat = [{"role": "tool", "content": "x"}]
    with pytest.raises(QvlError, match="knows only system, user and assistant"):
        ChatTemplate(template("custom_reader")).render(chat)


def test_sandbox_refuses_interpreter_internals():
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(QvlError, match="refused"):
        ChatTemplate(hostile).render(user_messages("x"))
    with pytest.raises(QvlError, match="refused"):
        ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns }}").render(user_messages("x"))


def test_broken_template_is_one_line():
    with pytest.raises(QvlError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }")


def test_probe_needs_one_placeholder_per_image():
    probe(ChatTemplate(template("qwen3_vl")), "<|image_pad|>")
    text_only = "{% for m in messages %}{{ m.role }}: {{ m.content if m.content is string else '' }}{% endfor %}"
    with pytest.raises(QvlError, match="0 <\\|image_pad\\|> markers for one image"):
        probe(ChatTemplate(text_only), "<|image_pad|>")


def test_resolution_order(tmp_path):
    """chat_template.json (the processor's file) > chat_template.jinja > tokenizer_config.json."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert resolve_template(tmp_path)[0] == "from tokenizer_config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert resolve_template(tmp_path)[0] == "from jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert resolve_template(tmp_path) == ("from json", "chat_template.json")


def test_no_template_is_one_line(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(QvlError, match="no chat template"):
        resolve_template(tmp_path)


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "type 'audio'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'"),
])
def test_bad_messages(bad, match):
    with pytest.raises(QvlError, match=match):
        check_messages(bad)


def test_image_sources(tmp_path):
    import base64

    png = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png)
    data = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert image_source({"type": "image", "image": str(png)}) == str(png)
    assert image_source({"type": "image_url", "image_url": {"url": f"file://{png}"}}) == str(png)
    assert image_source({"type": "image_url", "image_url": {"url": data}}) == png.read_bytes()
    with pytest.raises(QvlError, match="not fetched"):
        image_source({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
    with pytest.raises(QvlError, match="invalid base64"):
        image_source({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})
