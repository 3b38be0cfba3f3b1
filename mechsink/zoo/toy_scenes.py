"""Scenes of the toy LVLM: Fashion-MNIST items on an 84x84 canvas, and the questions asked of them.

Pure data (numpy and PIL): what ``mechsink.zoo.toy`` trains and evaluates on.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechsink.errors import MechsinkError


class ToyError(MechsinkError):
    """The toy model's data or bundled files are missing or malformed."""


TOY_DIR = Path(__file__).resolve().parent / "toy_llava"
EVAL_DIR = TOY_DIR / "eval"
FASHION_DIR = Path(os.environ.get("MECHSINK_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

CANVAS, CELL, ITEM, PATCH = 84, 42, 28, 7
GRID = CANVAS // PATCH  # 12 patches a side
JITTER = (CELL - ITEM) // PATCH + 1  # items sit at 3x3 patch-aligned offsets inside their cell
# Five Fashion-MNIST classes with one-word names (label id in the original data set); the shirt-like
# classes (T-shirt, pullover, coat, shirt) are left out because they are hard to tell apart at this size.
CLASSES = {"trouser": 1, "dress": 3, "sneaker": 7, "bag": 8, "boot": 9}
CLASS_NAMES = tuple(CLASSES)
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")  # cell index = 2*row + col
NUMBERS = ("one", "two", "three", "four")
# POPE "adversarial" negatives: the class most easily mistaken for a present one (bag has none).
SIMILAR = {"sneaker": "boot", "boot": "sneaker", "trouser": "dress", "dress": "trouser"}
QUESTION_TYPES = ("presence", "global", "local")
ANSWERS = ("yes", "no", *NUMBERS, "nothing", *CLASS_NAMES)
MEAN = STD = 0.5  # pixel normalisation shared by the processor and the training loop
OBJECT_PIXEL = 26  # a patch holding any pixel brighter than this (of 255) is an object patch


def load_fashion(split: str) -> dict[str, np.ndarray]:
    """Fashion-MNIST items of the six toy classes.

    Returns {class name: uint8 array (N, 28, 28)}; `split` is "train" or "t10k"."""
    img_path, lab_path = (FASHION_DIR / f"{split}-{kind}-idx{d}-ubyte.gz"
                          for kind, d in (("images", 3), ("labels", 1)))
    if not img_path.exists():
        raise ToyError(f"Fashion-MNIST not found at {img_path}: run `apt-get install -y dataset-fashion-mnist` "
                       "or set MECHSINK_FASHION_MNIST")
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, ITEM, ITEM)
    with gzip.open(lab_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return {name: images[labels == lab] for name, lab in CLASSES.items()}


@dataclass(frozen=True)
class Scene:
    """Item layout of one canvas: cell i holds class `cells[i]` (or None), item `items[i]` of that
    class pool, shifted by `offsets[i]` = (dy, dx) pixels inside the cell (multiples of the patch size,
    so an item always covers whole patches: it makes recognition learnable in a CPU-sized budget)."""
    cells: tuple[str | None, ...]
    items: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]

    @property
    def classes(self) -> list[str]:
        return [c for c in self.cells if c is not None]

    @property
    def majority(self) -> str:
        names = self.classes
        return max(set(names), key=names.count)


def sample_scene(rng: np.random.Generator, pools: dict[str, np.ndarray], n_weights: np.ndarray | None = None) -> Scene:
    """1-4 items in distinct cells, drawn so that one class is always the unique majority.

    `n_weights` (4,) are the probabilities of 1..4 items; None draws the count uniformly."""
    n = int(rng.integers(1, 5)) if n_weights is None else int(rng.choice(4, p=n_weights)) + 1
    major = str(rng.choice(CLASS_NAMES))
    others = [str(c) for c in rng.permutation([c for c in CLASS_NAMES if c != major])]
    if n <= 2:
        names = [major] * n
    elif n == 3:
        names = [major] * 3 if rng.random() < 0.3 else [major, major, others[0]]
    else:
        pattern = rng.choice(3, p=[0.4, 0.4, 0.2])  # 2+1+1, 3+1, 4
        names = [[major, major, others[0], others[1]], [major] * 3 + [others[0]], [major] * 4][pattern]
    names = [str(c) for c in rng.permutation(names)]
    cells: list[str | None] = [None] * 4
    items, offsets = [0] * 4, [(0, 0)] * 4
    for cell, name in zip(rng.choice(4, n, replace=False), names):
        cells[cell] = name
        items[cell] = int(rng.integers(len(pools[name])))
        offsets[cell] = tuple(int(v) * PATCH for v in rng.integers(JITTER, size=2))
    return Scene(tuple(cells), tuple(items), tuple(offsets))


def render(scene: Scene, pools: dict[str, np.ndarray]) -> np.ndarray:
    """The canvas, uint8 (84, 84), black background."""
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    for cell, name in enumerate(scene.cells):
        if name is None:
            continue
        y = (cell // 2) * CELL + scene.offsets[cell][0]
        x = (cell % 2) * CELL + scene.offsets[cell][1]
        canvas[y:y + ITEM, x:x + ITEM] = pools[name][scene.items[cell]]
    return canvas


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> dict[str, str]:
    """One templated question of type `qtype` about `scene`: {prompt, answer, question_type, subtype}."""
    present = set(scene.classes)
    if qtype == "presence":
        if rng.random() < 0.5:
            name, answer, sub = str(rng.choice(sorted(present))), "yes", "pope-positive"
        else:
            absent = [c for c in CLASS_NAMES if c not in present]
            similar = sorted({SIMILAR[c] for c in present if c in SIMILAR} - present)
            if similar and rng.random() < 0.5:
                name, sub = str(rng.choice(similar)), "pope-adversarial"
            else:
                name, sub = str(rng.choice(absent)), "pope-random"
            answer = "no"
        prompt = f"is there a {name} ?"
    elif qtype == "global":
        if rng.random() < 0.5:
            prompt, answer, sub = "how many items ?", NUMBERS[len(scene.classes) - 1], "count"
        else:
            prompt, answer, sub = "which kind is most common ?", scene.majority, "majority"
    elif qtype == "local":
        cell = int(rng.integers(4))
        prompt, answer, sub = f"what is in the {CORNERS[cell]} corner ?", scene.cells[cell] or "nothing", "corner"
    else:
        raise ToyError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    return {"prompt": prompt, "answer": answer, "question_type": qtype, "subtype": sub}


def vocabulary() -> list[str]:
    """Every word the toy prompts and answers use."""
    words = ["USER:", "ASSISTANT:", "is", "there", "a", "?", "how", "many", "items", "which", "kind",
             "most", "common", "what", "in", "the", "corner", *CORNERS, *ANSWERS]
    return list(dict.fromkeys(words))


def dialogue(scene: Scene, turns: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """`turns` distinct questions about `scene`; the first one's type is uniform over the three types.

    A repeated question could be answered by copying the earlier answer, so none repeats."""
    kinds = [str(k) for k in rng.permutation(QUESTION_TYPES)]
    kinds += [str(rng.choice(QUESTION_TYPES)) for _ in range(turns - 3)]
    out: list[dict[str, str]] = []
    for kind in kinds[:turns]:
        for attempt in range(40):  # falls back to presence, which has the most distinct prompts
            q = ask(scene, kind if attempt < 20 else "presence", rng)
            if all(q["prompt"] != p["prompt"] for p in out):
                out.append(q)
                break
    return out


def make_split(seed: int, n_images: int, pools: dict[str, np.ndarray], per_image: tuple[str, ...] = QUESTION_TYPES):
    """(canvases uint8 (N, 84, 84), scenes, questions[i] = one question per entry of `per_image`)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, pools) for _ in range(n_images)]
    questions = [[ask(s, t, rng) for t in per_image] for s in scenes]
    return np.stack([render(s, pools) for s in scenes]), scenes, questions
