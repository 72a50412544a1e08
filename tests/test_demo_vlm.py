"""The shipped demo VLM loads through `from_pretrained` and really looks at the image."""

from dream_export.demo import scenes
from dream_export.demo.evaluate import generate_answers


def test_processor_expands_image_to_patch_tokens(demo_vlm):
    model, processor = demo_vlm
    from dream_export.demo.prompts import PromptEncoder

    scene, s = scenes.make_sample(1)
    enc = PromptEncoder(processor).encode([scenes.render(scene)], [s.prompt])
    n_img = int((enc["input_ids"] == model.config.image_token_index).sum())
    assert n_img == (96 // 32) ** 2 + 1  # the CLS token and one token per grid cell
    assert tuple(enc["pixel_values"].shape) == (1, 3, 96, 96)


def test_counting_and_colour_questions_are_answered_from_the_image(demo_vlm):
    model, processor = demo_vlm
    data = [(sc, s) for sc, s in scenes.heldout(12) if s.task in ("count", "color")]
    images = [scenes.render(sc) for sc, _ in data]
    answers = generate_answers(model, processor, images, [s.prompt for _, s in data], max_new_tokens=16)
    acc = sum(scenes.first_clause(a) == s.key for a, (_, s) in zip(answers, data, strict=True)) / len(data)
    assert acc >= 0.8
    # the same questions asked about other scenes' images lose the answers: the image is what matters
    shuffled = images[1:] + images[:1]
    answers = generate_answers(model, processor, shuffled, [s.prompt for _, s in data], max_new_tokens=16)
    acc_wrong = sum(scenes.first_clause(a) == s.key for a, (_, s) in zip(answers, data, strict=True)) / len(data)
    assert acc_wrong < acc - 0.3
