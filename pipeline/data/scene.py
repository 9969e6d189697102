"""Drawing of one synthetic panoptic scene (no file formats here; see `synthetic.py` for the writers).

A scene is 2-3 textured stuff regions split by slanted lines, then optionally a crowd cluster of small
objects of one thing class, then 1..max_things thing instances (disc / box / triangle, each with its
own colour, later ones occluding earlier ones), then optionally a void patch of dark noise on top.
Every class has a distinct shape AND colour or texture so that a small model can learn it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

THING_CLASSES = (
    # (name, COCO-style category id, base RGB colour, Cityscapes label id used by the gtFine writer)
    ("disc", 1, (215, 40, 40), 26),  # car
    ("box", 2, (40, 190, 60), 24),  # person
    ("triangle", 3, (45, 65, 215), 33),  # bicycle
)
STUFF_CLASSES = (
    ("sky", 10, (150, 200, 240), 23),
    ("ground", 11, (140, 100, 60), 7),  # road
    ("wall", 12, (128, 128, 128), 11),  # building
)
COLOUR_JITTER = 18
"""Per-instance colour jitter (+-) so that instances of one class are not identical."""
MIN_VISIBLE_FRACTION = 0.3
"""An instance that keeps less of its drawn area after occlusion becomes void (unlabelled sliver)."""
MIN_VISIBLE_PIXELS = 12


@dataclass
class SceneConfig:
    """Knobs of the generator (validated; the defaults make a small, clearly learnable dataset)."""

    height: int = 96
    width: int = 96
    max_things: int = 4
    min_thing_frac: float = 0.18
    max_thing_frac: float = 0.38
    crowd_prob: float = 0.25
    void_prob: float = 0.3
    things: tuple = field(default=THING_CLASSES)
    stuff: tuple = field(default=STUFF_CLASSES)

    def __post_init__(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ValueError(f"synth.height/width must be >= 16, got {self.height}x{self.width}")
        if self.max_things < 1:
            raise ValueError(f"synth.max_things must be >= 1, got {self.max_things}")
        if not 0 < self.min_thing_frac <= self.max_thing_frac <= 1:
            raise ValueError("synth.min_thing_frac/max_thing_frac must satisfy 0 < min <= max <= 1")
        for name in ("crowd_prob", "void_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"synth.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Scene:
    """One drawn image with its ground truth.

    image: uint8 [H, W, 3]; cls: int32 [H, W] index into things+stuff (things first), -1 on void;
    inst: int32 [H, W] object number (>= 1) for thing pixels, 0 elsewhere; crowd: bool [H, W].
    void_kind: 0 unlabelled / 1 ego-vehicle / 2 caravan-like object (only the Cityscapes writer uses it).
    """

    image: np.ndarray
    cls: np.ndarray
    inst: np.ndarray
    crowd: np.ndarray
    void_kind: int


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, aspect: float):
    if kind == "disc":
        return ((yy - cy) / r) ** 2 + ((xx - cx) / (r * aspect)) ** 2 <= 1.0
    if kind == "box":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * aspect)
    # triangle pointing up: apex at (cy - r, cx), base at cy + r spanning +-r*aspect
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r * aspect)


def _texture(name: str, base, yy, xx, rng) -> np.ndarray:
    h, w = yy.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    if name == "sky":  # smooth horizontal stripes
        img += (12 * np.sin(yy * 0.9))[..., None]
    elif name == "ground":  # coarse grain noise
        img += rng.uniform(-28, 28, size=(h, w, 1)).astype(np.float32)
    else:  # checkerboard bricks
        img += (np.where(((yy // 6) + (xx // 6)) % 2 == 0, 22, -22))[..., None]
    return img


def draw_scene(cfg: SceneConfig, rng: np.random.Generator) -> Scene:
    h, w = cfg.height, cfg.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n_things = len(cfg.things)
    cls = np.full((h, w), -1, np.int32)
    inst = np.zeros((h, w), np.int32)
    crowd = np.zeros((h, w), bool)
    img = np.zeros((h, w, 3), np.float32)

    # Stuff: a slanted horizon splits two classes; a third (when drawn) takes one side of the upper part.
    n_stuff = int(rng.integers(2, len(cfg.stuff) + 1))
    chosen = rng.permutation(len(cfg.stuff))[:n_stuff]
    horizon = h * rng.uniform(0.3, 0.65) + rng.uniform(-0.3, 0.3) * (xx - w / 2)
    regions = [yy < horizon, yy >= horizon]
    if n_stuff == 3:
        split = w * rng.uniform(0.3, 0.7) + rng.uniform(-0.5, 0.5) * (yy - h / 2)
        left = xx < split
        regions = [regions[0] & left, regions[1], regions[0] & ~left]
    for k, region in zip(chosen, regions):
        name, _, base, _ = cfg.stuff[k]
        img[region] = _texture(name, base, yy, xx, rng)[region]
        cls[region] = n_things + k

    obj = 0
    drawn_area: dict[int, int] = {}
    size = min(h, w)
    if rng.random() < cfg.crowd_prob:  # a tight cluster of small same-class objects = one crowd region
        c = int(rng.integers(n_things))
        name, _, base, _ = cfg.things[c]
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        for _ in range(int(rng.integers(4, 7))):
            r = rng.uniform(0.04, 0.07) * size
            m = _shape_mask(
                name, yy, xx, cy + rng.normal(0, 0.06 * size), cx + rng.normal(0, 0.06 * size), r, 1.0
            )
            img[m] = np.asarray(base, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
            cls[m], crowd[m], inst[m] = c, True, 0
    for _ in range(int(rng.integers(1, cfg.max_things + 1))):
        c = int(rng.integers(n_things))
        name, _, base, _ = cfg.things[c]
        r = 0.5 * rng.uniform(cfg.min_thing_frac, cfg.max_thing_frac) * size
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        m = _shape_mask(name, yy, xx, cy, cx, r, rng.uniform(0.75, 1.3))
        if not m.any():
            continue
        obj += 1
        colour = np.asarray(base, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        img[m] = colour + rng.uniform(-6, 6, size=(int(m.sum()), 3))
        cls[m], inst[m], crowd[m] = c, obj, False
        drawn_area[obj] = int(m.sum())

    void_kind = 0
    if rng.random() < cfg.void_prob:
        vh, vw = int(rng.uniform(0.1, 0.22) * h), int(rng.uniform(0.1, 0.22) * w)
        y0, x0 = int(rng.integers(0, h - vh)), int(rng.integers(0, w - vw))
        img[y0 : y0 + vh, x0 : x0 + vw] = rng.uniform(15, 60, size=(vh, vw, 1))
        cls[y0 : y0 + vh, x0 : x0 + vw] = -1
        inst[y0 : y0 + vh, x0 : x0 + vw] = 0
        crowd[y0 : y0 + vh, x0 : x0 + vw] = False
        void_kind = int(rng.integers(0, 3))
    for o, full in drawn_area.items():  # heavily occluded slivers become void
        vis = inst == o
        n = int(vis.sum())
        if n and (n < MIN_VISIBLE_PIXELS or n < MIN_VISIBLE_FRACTION * full):
            cls[vis], inst[vis] = -1, 0
    img += rng.uniform(-8, 8)  # global brightness jitter
    return Scene(np.clip(img, 0, 255).astype(np.uint8), cls, inst, crowd, void_kind)
