"""The demo dataset is deterministic, split by seed, and its answers have the documented shape."""

import numpy as np

from dream_export.demo import scenes


def test_same_seed_same_image_and_answer():
    a_scene, a = scenes.make_sample(123)
    b_scene, b = scenes.make_sample(123)
    assert a == b
    assert np.array_equal(np.asarray(scenes.render(a_scene)), np.asarray(scenes.render(b_scene)))
    assert scenes.make_sample(124)[1] != a


def test_heldout_split_is_fixed_and_disjoint_from_training_seeds():
    held = scenes.heldout(5)
    assert [s.seed for _, s in held] == [s.seed for _, s in scenes.heldout(5)]
    assert {s.task for _, s in held} == set(scenes.TASKS)
    assert min(s.seed for _, s in held) >= scenes.HELDOUT_SEED_BASE


def test_answers_mention_the_true_count_and_colour():
    for seed in range(200):
        scene, s = scenes.make_sample(seed, "count")
        assert 10 <= len(s.answer.split()) <= 110
        if s.prompt in {"How many objects are there?", "How many objects can you see?"}:
            n = len(scene.objects)
            assert scenes.NUMBER_WORDS[n] in s.key
    for seed in range(200):
        scene, s = scenes.make_sample(seed, "color")
        assert any(c in s.key for c in scenes.COLORS)


def test_count_answers_check_each_object_then_state_the_count():
    seen = 0
    for seed in range(300):
        scene, s = scenes.make_sample(seed, "count")
        if not s.answer.startswith("Checking each object:"):
            continue
        seen += 1
        checks = s.answer[len("Checking each object: "):s.answer.rindex(". There ")].split("; ")
        assert [c.split(":")[0] for c in checks] == [scenes.POSITIONS[o.cell] for o in scene.objects]
        yes = [c for c in checks if " yes, " in c]
        # the tally counts up one by one and the verdict states where it ended
        assert all(c.endswith(f"that makes {scenes.NUMBER_WORDS[i]}") for i, c in enumerate(yes, start=1))
        assert s.key.startswith("There ") and f" {scenes.NUMBER_WORDS[len(yes)]} " in s.key
        assert s.answer.endswith(s.key)
    assert seen > 100


def test_answer_key():
    tally = "Checking each object: top left: red no. There are no green shapes in the image."
    assert scenes.answer_key("count", tally) == "There are no green shapes in the image."
    assert scenes.answer_key("count", "There are two objects in the image: a red one.") == (
        "There are two objects in the image:")
    assert scenes.answer_key("color", "The circle is red. It is large.") == "The circle is red."


def test_first_clause():
    assert scenes.first_clause("There are two circles: a red one.") == "There are two circles:"
    assert scenes.first_clause("The circle is red. It is large.") == "The circle is red."
    assert scenes.first_clause("no stop") == "no stop"


def test_rendered_image_shows_object_colour_in_its_cell():
    scene, _ = scenes.make_sample(7)
    img = np.asarray(scenes.render(scene)).astype(int)
    for o in scene.shapes:
        r, c = divmod(o.cell, scenes.GRID)
        cell = img[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].reshape(-1, 3)
        target = np.array(scenes.COLORS[o.color])
        assert (np.abs(cell - target).max(1) < 40).sum() > 10  # the object's colour is really drawn there
