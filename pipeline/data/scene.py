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


@dataclass
class _Canvas:
    """A scene being drawn: float image, class map (-1 void), instance map (0 none) and crowd mask."""

    img: np.ndarray
    cls: np.ndarray
    inst: np.ndarray
    crowd: np.ndarray
    yy: np.ndarray
    xx: np.ndarray

    @classmethod
    def empty(cls, h: int, w: int) -> _Canvas:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        return cls(
            np.zeros((h, w, 3), np.float32), np.full((h, w), -1, np.int32), np.zeros((h, w), np.int32),
            np.zeros((h, w), bool), yy, xx,
        )  # fmt: skip


def _draw_stuff(c: _Canvas, cfg: SceneConfig, rng: np.random.Generator) -> None:
    """A slanted horizon splits two stuff classes; a third (when drawn) takes one side of the upper part."""
    h, w = cfg.height, cfg.width
    n_stuff = int(rng.integers(2, len(cfg.stuff) + 1))
    chosen = rng.permutation(len(cfg.stuff))[:n_stuff]
    horizon = h * rng.uniform(0.3, 0.65) + rng.uniform(-0.3, 0.3) * (c.xx - w / 2)
    regions = [c.yy < horizon, c.yy >= horizon]
    if n_stuff == 3:
        split = w * rng.uniform(0.3, 0.7) + rng.uniform(-0.5, 0.5) * (c.yy - h / 2)
        left = c.xx < split
        regions = [regions[0] & left, regions[1], regions[0] & ~left]
    for k, region in zip(chosen, regions):
        name, _, base, _ = cfg.stuff[k]
        c.img[region] = _texture(name, base, c.yy, c.xx, rng)[region]
        c.cls[region] = len(cfg.things) + k


def _draw_crowd(c: _Canvas, cfg: SceneConfig, rng: np.random.Generator) -> None:
    """Sometimes a tight cluster of small same-class objects: one crowd region."""
    h, w, size = cfg.height, cfg.width, min(cfg.height, cfg.width)
    if rng.random() >= cfg.crowd_prob:
        return
    k = int(rng.integers(len(cfg.things)))
    name, _, base, _ = cfg.things[k]
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    for _ in range(int(rng.integers(4, 7))):
        r = rng.uniform(0.04, 0.07) * size
        m = _shape_mask(
            name, c.yy, c.xx, cy + rng.normal(0, 0.06 * size), cx + rng.normal(0, 0.06 * size), r, 1.0
        )
        c.img[m] = np.asarray(base, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        c.cls[m], c.crowd[m], c.inst[m] = k, True, 0


def _draw_things(c: _Canvas, cfg: SceneConfig, rng: np.random.Generator) -> dict[int, int]:
    """1..max_things instances, each over what was there; returns {instance: drawn area}."""
    h, w, size = cfg.height, cfg.width, min(cfg.height, cfg.width)
    drawn_area: dict[int, int] = {}
    for _ in range(int(rng.integers(1, cfg.max_things + 1))):
        k = int(rng.integers(len(cfg.things)))
        name, _, base, _ = cfg.things[k]
        r = 0.5 * rng.uniform(cfg.min_thing_frac, cfg.max_thing_frac) * size
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        m = _shape_mask(name, c.yy, c.xx, cy, cx, r, rng.uniform(0.75, 1.3))
        if not m.any():
            continue
        obj = len(drawn_area) + 1
        colour = np.asarray(base, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        c.img[m] = colour + rng.uniform(-6, 6, size=(int(m.sum()), 3))
        c.cls[m], c.inst[m], c.crowd[m] = k, obj, False
        drawn_area[obj] = int(m.sum())
    return drawn_area


def _draw_void(c: _Canvas, cfg: SceneConfig, rng: np.random.Generator) -> int:
    """Sometimes an unlabelled dark patch; returns its kind (which Cityscapes void label it becomes)."""
    h, w = cfg.height, cfg.width
    if rng.random() >= cfg.void_prob:
        return 0
    vh, vw = int(rng.uniform(0.1, 0.22) * h), int(rng.uniform(0.1, 0.22) * w)
    y0, x0 = int(rng.integers(0, h - vh)), int(rng.integers(0, w - vw))
    patch = (slice(y0, y0 + vh), slice(x0, x0 + vw))
    c.img[patch] = rng.uniform(15, 60, size=(vh, vw, 1))
    c.cls[patch], c.inst[patch], c.crowd[patch] = -1, 0, False
    return int(rng.integers(0, 3))


def draw_scene(cfg: SceneConfig, rng: np.random.Generator) -> Scene:
    """One scene; every random number comes from ``rng``, in a fixed order (same rng state, same scene)."""
    c = _Canvas.empty(cfg.height, cfg.width)
    _draw_stuff(c, cfg, rng)
    _draw_crowd(c, cfg, rng)
    drawn_area = _draw_things(c, cfg, rng)
    void_kind = _draw_void(c, cfg, rng)
    for o, full in drawn_area.items():  # heavily occluded slivers become void
        vis = c.inst == o
        n = int(vis.sum())
        if n and (n < MIN_VISIBLE_PIXELS or n < MIN_VISIBLE_FRACTION * full):
            c.cls[vis], c.inst[vis] = -1, 0
    c.img += rng.uniform(-8, 8)  # global brightness jitter
    return Scene(np.clip(c.img, 0, 255).astype(np.uint8), c.cls, c.inst, c.crowd, void_kind)
