"""Procedural scenes and question/answer pairs for the demo VLM.

A scene is a 3×3 grid of 32-pixel cells on a 96×96 image; each cell holds at most one object: a shape
(circle, square, triangle, diamond) of some colour and size, or a coloured digit. The demo vision tower
uses 32-pixel patches, so each object lives in exactly one image token: the model's hard part becomes
reading attributes out of that token and binding them to the question, which a small model learns on
two CPU cores within the training budget.

Everything is a pure function of an integer seed, so the train / held-out split is fixed by seed
ranges and `make demo-model` reproduces the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 40),
    "green": (40, 185, 60),
    "blue": (40, 90, 240),
    "purple": (165, 60, 205),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASKS = ("describe", "count", "color", "position", "read")

# Held-out scenes come from a disjoint seed range, so no held-out image is ever trained on.
HELDOUT_SEED_BASE = 10_000_000
CALIB_SEED_BASE = 20_000_000


@dataclass(frozen=True)
class Obj:
    """One object in one grid cell."""

    cell: int
    kind: str  # a shape name, or "number"
    color: str
    size: str = "large"
    digit: int | None = None

    @property
    def where(self) -> str:
        pos = POSITIONS[self.cell]
        return "in the center" if pos == "center" else f"at the {pos}"

    @property
    def phrase(self) -> str:
        if self.kind == "number":
            return f"the number {self.digit} written in {self.color}"
        return f"a {self.size} {self.color} {self.kind}"


@dataclass
class Scene:
    """A generated scene: its objects (in reading order) and the seed that made it."""

    seed: int
    objects: list[Obj] = field(default_factory=list)
    background: int = 0

    @property
    def shapes(self) -> list[Obj]:
        return [o for o in self.objects if o.kind != "number"]

    @property
    def numbers(self) -> list[Obj]:
        return [o for o in self.objects if o.kind == "number"]


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example."""

    seed: int
    task: str
    prompt: str
    answer: str

    @property
    def key(self) -> str:
        """The part of the answer that exact-match accuracy is scored on (see `answer_key`)."""
        return answer_key(self.task, self.answer)


def first_clause(text: str) -> str:
    """Text up to and including the first '.' or ':' (the answer's factual core)."""
    cut = [i for i in (text.find("."), text.find(":")) if i >= 0]
    return text[: min(cut) + 1].strip() if cut else text.strip()


def answer_key(task: str, text: str) -> str:
    """The clause of an answer that states its fact: the count's verdict or the first clause.

    Counting answers check the objects one by one before they state the count, so their key is the
    clause that starts at the last "There " (the verdict); every other answer leads with its fact.
    """
    if task == "count" and "There " in text:
        return first_clause(text[text.rfind("There "):])
    return first_clause(text)


def make_scene(seed: int) -> Scene:
    """Sample a scene: 1–6 objects in distinct cells, up to two of them digits."""
    rng = random.Random(seed)
    n = rng.choices([1, 2, 3, 4, 5, 6], weights=[2, 3, 3, 3, 2, 2])[0]
    cells = sorted(rng.sample(range(GRID * GRID), n))
    n_numbers = rng.choices([0, 1, 2], weights=[5, 3, 1])[0] if n > 1 else rng.choice([0, 0, 0, 1])
    number_cells = set(rng.sample(cells, min(n_numbers, n)))
    objs = []
    for c in cells:
        color = rng.choice(list(COLORS))
        if c in number_cells:
            objs.append(Obj(c, "number", color, digit=rng.randrange(10)))
        else:
            objs.append(Obj(c, rng.choice(SHAPES), color, rng.choice(SIZES)))
    return Scene(seed, objs, background=rng.randrange(0, 48))


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: no system font files, so every machine renders the same digits.
    try:
        return ImageFont.load_default(size=24)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 96×96 RGB image (deterministic jitter from the scene seed)."""
    rng = random.Random(scene.seed * 7919 + 1)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cy, cx = divmod(o.cell, GRID)
        base = np.array(COLORS[o.color])
        fill = tuple(int(v) for v in np.clip(base + [rng.randint(-15, 15) for _ in range(3)], 0, 255))
        if o.kind == "number":
            x0 = cx * CELL + rng.randint(7, 11)
            y0 = cy * CELL + rng.randint(0, 4)
            draw.text((x0, y0), str(o.digit), fill=fill, font=_font())
            continue
        # Small shapes stay near the cell centre: the vision tower embeds each 32-pixel cell with one
        # linear patch projection, which cannot tell a 5-pixel square from a diamond anywhere in the cell.
        r = rng.randint(12, 14) if o.size == "large" else rng.randint(7, 8)
        j = 15 - r if o.size == "large" else 3
        mx = cx * CELL + CELL // 2 + rng.randint(-j, j)
        my = cy * CELL + CELL // 2 + rng.randint(-j, j)
        if o.kind == "circle":
            draw.ellipse([mx - r, my - r, mx + r, my + r], fill=fill)
        elif o.kind == "square":
            s = int(r * 0.85)
            draw.rectangle([mx - s, my - s, mx + s, my + s], fill=fill)
        elif o.kind == "triangle":
            draw.polygon([(mx, my - r), (mx - r, my + r), (mx + r, my + r)], fill=fill)
        elif o.kind == "diamond":
            draw.polygon([(mx, my - r), (mx + r, my), (mx, my + r), (mx - r, my)], fill=fill)
    arr = np.asarray(img, dtype=np.int16) + np.random.default_rng(scene.seed).integers(-6, 7, img.size + (3,))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(n: int, noun: str) -> str:
    if n == 0:
        return f"There are no {noun}s in the image."
    if n == 1:
        return f"There is one {noun} in the image"
    return f"There are {NUMBER_WORDS[n]} {noun}s in the image"


def _describe(scene: Scene, rng: random.Random) -> tuple[str, str]:
    prompt = rng.choice([
        "Describe the image.", "What do you see in this picture?", "Describe everything in the image.",
        "Give a detailed description of this image.", "What is in the image?", "Tell me what the picture shows.",
    ])
    n = len(scene.objects)
    head = f"The image shows {NUMBER_WORDS[n]} object{'s' if n > 1 else ''} on a dark background."
    parts = []
    for o in scene.objects:
        where = o.where
        parts.append(f"{where[0].upper()}{where[1:]} there is {o.phrase}.")
    return prompt, " ".join([head, *parts, "That is everything in the image."])


def _count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    mode = rng.choice(["all", "shape", "shape", "color", "color"])
    if mode == "all":
        prompt = rng.choice([
            "How many objects are there?", "How many things are in the image?",
            "Count the objects in the picture.", "How many objects can you see?",
        ])
        n = len(scene.objects)
        head = _count_phrase(n, "object")
        return prompt, f"{head}: {_join([o.phrase for o in scene.objects])}."
    if mode == "shape":
        shape = rng.choice(SHAPES)
        prompt = rng.choice([
            f"How many {shape}s are there?", f"How many {shape}s can you see?",
            f"Count the {shape}s.", f"How many {shape}s are in the picture?",
        ])
        hits = [o for o in scene.shapes if o.kind == shape]
        noun = shape
    else:
        color = rng.choice(list(COLORS))
        prompt = rng.choice([
            f"How many {color} shapes are there?", f"How many {color} shapes can you see?",
            f"Count the {color} shapes.", f"How many {color} shapes are in the picture?",
        ])
        hits = [o for o in scene.shapes if o.color == color]
        noun = f"{color} shape"
    # A small decoder cannot count matches across image tokens in one step (trained that way, it answered
    # "no" to every colour or shape count), but it reads objects in order without error. So the answer
    # walks the objects in reading order, names each one's queried attribute, and decides right after
    # that word (comparing it with the question's word is then one attention step; a decision placed
    # after the whole object phrase was mostly "no"), keeping a running tally before the count.
    steps, tally = [], 0
    for o in scene.objects:
        attr = "number" if o.kind == "number" else (o.color if mode == "color" else o.kind)
        where = POSITIONS[o.cell]
        if o in hits:
            tally += 1
            steps.append(f"{where}: {attr} yes, that makes {NUMBER_WORDS[tally]}")
        else:
            steps.append(f"{where}: {attr} no")
    verdict = _count_phrase(len(hits), noun)
    return prompt, f"Checking each object: {'; '.join(steps)}. {verdict.rstrip('.')}."


def _unique(objs: list[Obj], key) -> list[Obj]:
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals, strict=True) if vals.count(v) == 1]


def _color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    unique_kind = _unique(scene.shapes, lambda o: o.kind)
    spelling = rng.choice(["colour", "color"])
    if unique_kind and rng.random() < 0.6:
        o = rng.choice(unique_kind)
        prompt = rng.choice([
            f"What {spelling} is the {o.kind}?", f"Which {spelling} is the {o.kind}?",
            f"Tell me the {spelling} of the {o.kind}.", f"What {spelling} does the {o.kind} have?",
        ])
        return prompt, f"The {o.kind} is {o.color}. It is {o.phrase} {o.where} of the image."
    o = rng.choice(scene.objects)
    pos = POSITIONS[o.cell]
    what = "number" if o.kind == "number" else "object"
    prompt = rng.choice([
        f"What {spelling} is the {what} at the {pos}?", f"Which {spelling} is the {what} at the {pos}?",
        f"Tell me the {spelling} of the {what} at the {pos}.",
    ]) if pos != "center" else rng.choice([
        f"What {spelling} is the {what} in the center?", f"Which {spelling} is the {what} in the center?",
    ])
    return prompt, f"The {what} {o.where} is {o.color}. It is {o.phrase}."


def _position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    unique_cs = _unique(scene.shapes, lambda o: (o.color, o.kind))
    if unique_cs and rng.random() < 0.5:
        o = rng.choice(unique_cs)
        if rng.random() < 0.6:
            prompt = rng.choice([f"Where is the {o.color} {o.kind}?", f"Where can I find the {o.color} {o.kind}?",
                                 f"In which part of the image is the {o.color} {o.kind}?"])
            return prompt, (f"The {o.color} {o.kind} is {o.where} of the image. "
                            f"It is {o.size}, and the image has {NUMBER_WORDS[len(scene.objects)]} objects in total.")
        prompt = rng.choice([f"Is the {o.color} {o.kind} large or small?", f"How big is the {o.color} {o.kind}?"])
        return prompt, (f"The {o.color} {o.kind} is {o.size}. It is {o.where} of the image, "
                        f"one of {NUMBER_WORDS[len(scene.objects)]} objects.") if len(scene.objects) > 1 else (
                        f"The {o.color} {o.kind} is {o.size}. It is {o.where} of the image, the only object there.")
    cell = rng.randrange(GRID * GRID)
    pos = POSITIONS[cell]
    at = "in the center" if pos == "center" else f"at the {pos}"
    prompt = rng.choice([f"What is {at}?", f"What can you see {at}?", f"What object is {at}?"])
    hit = [o for o in scene.objects if o.cell == cell]
    if not hit:
        return prompt, (f"There is nothing {at}. "
                        f"The image shows {_join([f'{o.phrase} {o.where}' for o in scene.objects])}.")
    return prompt, (f"There is {hit[0].phrase} {at}. It is one of {NUMBER_WORDS[len(scene.objects)]} objects "
                    f"in the image.") if len(scene.objects) > 1 else (
                    f"There is {hit[0].phrase} {at}. It is the only object in the image.")


def _read(scene: Scene, rng: random.Random) -> tuple[str, str]:
    nums = scene.numbers
    prompt = rng.choice([
        "What number is written in the image?", "Read the number in the picture.",
        "What does the text in the image say?", "Which digits are written in the image?",
    ])
    if not nums:
        return prompt, (f"There is no number written in the image. "
                        f"It shows {_join([o.phrase for o in scene.objects])}.")
    if len(nums) == 1:
        o = nums[0]
        return prompt, f"The number {o.digit} is written in the image. It is {o.color} and {o.where}."
    a, b = nums[0], nums[1]
    return prompt, (f"The numbers {a.digit} and {b.digit} are written in the image. "
                    f"The {a.digit} is {a.color} and {a.where}, and the {b.digit} is {b.color} and {b.where}.")


_TASK_FNS = {"describe": _describe, "count": _count, "color": _color, "position": _position, "read": _read}


def make_sample(seed: int, task: str | None = None) -> tuple[Scene, Sample]:
    """Scene and one question about it; the task is drawn from the seed unless given."""
    scene = make_scene(seed)
    rng = random.Random(seed * 104729 + 7)
    if task is None:
        weights = [2, 3, 3, 2, 2 if scene.numbers else 1]
        task = rng.choices(TASKS, weights=weights)[0]
    prompt, answer = _TASK_FNS[task](scene, rng)
    return scene, Sample(seed, task, prompt, answer)


def heldout(n_per_task: int) -> list[tuple[Scene, Sample]]:
    """The fixed held-out split: `n_per_task` samples of every task from the held-out seed range."""
    out = []
    for t, task in enumerate(TASKS):
        for i in range(n_per_task):
            out.append(make_sample(HELDOUT_SEED_BASE + t * 100_000 + i, task))
    return out


def corpus_text(n: int, seed_base: int = 0) -> list[str]:
    """Prompts and answers of `n` training samples (for fitting the tokenizer)."""
    texts = []
    for i in range(n):
        _, s = make_sample(seed_base + i)
        texts += [f"USER: {s.prompt} ASSISTANT: {s.answer}"]
    return texts


def rendered_samples(n: int, seed_base: int = CALIB_SEED_BASE) -> list[tuple[Image.Image, str]]:
    """`n` rendered (image, question) pairs from the calibration seed range: the demo's inputs for the
    realistic parity feeds and the greedy-agreement check."""
    out = []
    for i in range(n):
        scene, sample = make_sample(seed_base + 7919 * i)
        out.append((render(scene), sample.prompt))
    return out
