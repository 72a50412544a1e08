"""The conversation API: chat templates as transformers renders them, several images, streams with results."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dream_export.cli import DEMO_DIR
from dream_export.demo import scenes
from dream_export.errors import UsageError
from dream_export.runtime import ContextLengthError
from dream_export.runtime.chat import ChatTemplate, normalize


def _image(k: int):
    return scenes.render(scenes.make_sample(scenes.HELDOUT_SEED_BASE + k, "describe")[0])


def _user(*parts):
    return {"role": "user", "content": [{"type": "image", "image": p} if not isinstance(p, str) else
                                        {"type": "text", "text": p} for p in parts]}


def test_conversation_ids_match_the_hf_processor(demo_pipeline):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(DEMO_DIR / "vlm")
    a, b = _image(1), _image(2)
    conv = [_user(a, "Describe the image."), {"role": "assistant", "content": "A red circle."},
            _user(b, "And this one?")]
    # transformers' form: image placeholders, text parts
    hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
          {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]}]
    text = proc.apply_chat_template(hf, add_generation_prompt=True)
    ref = proc(text=text, images=[a, b], add_special_tokens=False, return_tensors="np")["input_ids"][0].tolist()
    assert demo_pipeline.chat_ids(conv) == ref


def test_system_prompt_is_kept_when_the_template_has_no_system_role(demo_pipeline):
    # the demo's (LLaVA) template drops system messages: the prompt goes before the first user text
    img = _image(1)
    with_system = demo_pipeline.chat_ids([{"role": "system", "content": "Answer briefly."}, _user(img, "Hi")])
    assert with_system == demo_pipeline.chat_ids([_user(img, "Answer briefly.\n\nHi")])
    # a template with a system role renders it itself
    tpl = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}{{ p['text'] }}"
                       "{% endfor %}{% endfor %}", "", "", "<image>")
    assert tpl.renders_system
    assert tpl.render(normalize([{"role": "system", "content": "S"}, _user("U")])[0], []) == "<system>S<user>U"


def test_several_images_are_spliced_in_order(demo_pipeline):
    a, b = _image(1), _image(2)
    emb2, mask2, _ = demo_pipeline.chat_embeds([_user(a, b, "Describe the images.")])
    rows = demo_pipeline.n_image_tokens
    assert mask2.sum() == 2 * rows
    for k, img in enumerate((a, b)):
        emb1, mask1, _ = demo_pipeline.prompt_embeds(img, "x")
        np.testing.assert_array_equal(emb2[mask2][k * rows:(k + 1) * rows], emb1[mask1])
    res = demo_pipeline.chat([_user(a, b, "Describe the images.")], max_new_tokens=12)
    assert res.stats["images"] == 2 and res.stats["prompt_tokens"] == len(mask2) and len(res.tokens) == 12


def test_text_only_turns_and_multi_turn_answers(demo_pipeline):
    res = demo_pipeline.generate(None, "Hello.", max_new_tokens=6)
    assert res.stats["images"] == 0 and len(res.tokens) == 6
    img = _image(3)
    first = demo_pipeline.generate(img, "Describe the image.", max_new_tokens=40)
    follow = demo_pipeline.chat([_user(img, "Describe the image."), {"role": "assistant", "content": first.text},
                                 _user("Describe the image.")], max_new_tokens=8)
    assert follow.stats["prompt_tokens"] > first.stats["prompt_tokens"] + len(first.tokens)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "part 0"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "system messages must come"),
    ([{"role": "assistant", "content": [{"type": "image", "image": 1}]}, {"role": "user", "content": "x"}],
     "only user messages"),
])
def test_bad_conversations_are_refused_before_decoding(demo_pipeline, messages, match):
    with pytest.raises(UsageError, match=match):
        demo_pipeline.chat_stream(messages)


def test_over_capacity_is_a_context_length_error(demo_pipeline):
    with pytest.raises(ContextLengthError, match="KV capacity"):
        demo_pipeline.chat_stream([_user(_image(1), "tell me " * 300)])


def test_stream_carries_its_result_and_deltas_join_to_its_text(demo_pipeline):
    img = _image(4)
    stream = demo_pipeline.stream(img, "Describe the image.", max_new_tokens=60)
    assert stream.result is None
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == stream.result.text
    assert stream.result.tokens == demo_pipeline.generate(img, "Describe the image.", max_new_tokens=60).tokens
    assert stream.result.stats["prompt_tokens"] == stream.prompt_tokens


def test_an_abandoned_stream_frees_the_pipeline(demo_pipeline):
    img = _image(5)
    want = demo_pipeline.generate(img, "Describe the image.", max_new_tokens=20).tokens
    stream = demo_pipeline.stream(img, "Describe the image.", max_new_tokens=60)
    next(stream)
    stream.close()
    assert stream.result is None
    got = []  # another thread gets the pipeline at once
    t = threading.Thread(target=lambda: got.append(demo_pipeline.generate(img, "Describe the image.",
                                                                           max_new_tokens=20).tokens))
    t.start()
    t.join(timeout=120)
    assert got == [want]
