"""The shipped demo VLM loads through `from_pretrained` and really looks at the image."""

from dream_export.demo import scenes
from dream_export.demo.evaluate import generate_answers, token_limit


def test_processor_expands_image_to_patch_tokens(demo_vlm):
    model, processor = demo_vlm
    from dream_export.core.prompts import PromptEncoder

    scene, s = scenes.make_sample(1)
    enc = PromptEncoder(processor).encode([scenes.render(scene)], [s.prompt])
    n_img = int((enc["input_ids"] == model.config.image_token_index).sum())
    assert n_img == (96 // 32) ** 2 + 1  # the CLS token and one token per grid cell
    assert tuple(enc["pixel_values"].shape) == (1, 3, 96, 96)


def _accuracy(model, processor, data, images):
    answers = generate_answers(model, processor, images, [s.prompt for _, s in data],
                               max_new_tokens=token_limit(data[0][1].task, key_only=True))
    return sum(scenes.answer_key(s.task, a) == s.key for a, (_, s) in zip(answers, data, strict=True)) / len(data)


def test_colour_and_count_questions_are_answered_from_the_image(demo_vlm):
    model, processor = demo_vlm
    for task in ("color", "count"):
        data = [(sc, s) for sc, s in scenes.heldout(16) if s.task == task]
        images = [scenes.render(sc) for sc, _ in data]
        acc = _accuracy(model, processor, data, images)
        assert acc >= 0.8, (task, acc)  # measured on 100 held-out prompts per task: see the asset README
        # the same questions about other scenes' images lose their answers: the image is what matters
        shuffled = _accuracy(model, processor, data, images[1:] + images[:1])
        assert shuffled < acc - 0.3, (task, acc, shuffled)
