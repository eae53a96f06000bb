"""The toyworld's objects and colours, and its captions.

Every object is a union of parts; a part is a signed distance function (SDF) of points ``[N, 3] -> [N]``
(torch only, negative inside) and a colour: ``None`` for the caption's colour, or a fixed RGB that stays
the same whatever the caption says (the snowman's carrot is always orange, the house's door always brown).
Objects follow :mod:`text3d.cameras`: +Y up, the front faces +Z, centred on the origin and scaled to fit a
sphere of radius about 0.6 (the NeRF's initial blob has radius 0.5 inside ``[-1, 1]^3``).

Captions are ``"a {colour} {object}"``, with the article "a" for every caption, even where English would
say "an" ("a orange cube"): one fixed template keeps prompts, captions and :func:`parse_caption` simple.
A training caption may end with a view suffix of :mod:`text3d.prompts` (``"a red cube, front view"``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from text3d.cameras import VIEW_LABELS
from text3d.prompts import VIEW_SUFFIXES, split_view_suffix

SDF = Callable[[torch.Tensor], torch.Tensor]
RGB = tuple[float, float, float]

# ---------------------------------------------------------------------------------------------------------
# SDF building blocks. Each returns a function of points p [N, 3] (possibly a non-contiguous view).
# All are 1-Lipschitz: exact distances, or minima (unions) and maxima (cuts, convex polytopes) of them, which
# is what the renderer's conservative empty-space culling relies on.


def _local(p: torch.Tensor, centre: Sequence[float], axes: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinates of ``p`` in a frame at ``centre`` whose local x, y, z are the world axes named in ``axes``
    (a signed permutation such as ``"xzy"`` or ``"x-zy"``): a rotation, so distances are preserved."""
    world = {"x": p[:, 0] - centre[0], "y": p[:, 1] - centre[1], "z": p[:, 2] - centre[2]}
    out, sign = [], 1.0
    for ch in axes:
        if ch == "-":
            sign = -1.0
            continue
        out.append(world[ch] * sign if sign < 0 else world[ch])
        sign = 1.0
    return out[0], out[1], out[2]


def _length2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def sphere(radius: float, centre: Sequence[float] = (0, 0, 0)) -> SDF:
    def f(p):
        x, y, z = _local(p, centre, "xyz")
        return torch.sqrt(x * x + y * y + z * z) - radius
    return f


def box(half: Sequence[float], centre: Sequence[float] = (0, 0, 0), rounding: float = 0.0) -> SDF:
    """Axis-aligned box of half sizes ``half`` (the rounded box keeps the same outer size)."""
    hx, hy, hz = (h - rounding for h in half)

    def f(p):
        x, y, z = _local(p, centre, "xyz")
        qx, qy, qz = x.abs() - hx, y.abs() - hy, z.abs() - hz
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2 + qz.clamp_min(0) ** 2)
        inside = torch.maximum(qx, torch.maximum(qy, qz)).clamp_max(0)
        return outside + inside - rounding
    return f


def cylinder(radius: float, half_height: float, centre: Sequence[float] = (0, 0, 0), axes: str = "xyz") -> SDF:
    """Capped cylinder around the local y axis (``axes`` picks which world axis that is)."""
    def f(p):
        x, y, z = _local(p, centre, axes)
        dx, dy = _length2(x, z) - radius, y.abs() - half_height
        return torch.maximum(dx, dy).clamp_max(0) + _length2(dx.clamp_min(0), dy.clamp_min(0))
    return f


def capped_cone(half_height: float, r_bottom: float, r_top: float, centre: Sequence[float] = (0, 0, 0),
                axes: str = "xyz") -> SDF:
    """Exact capped cone (Inigo Quilez): radius ``r_bottom`` at local y = -h, ``r_top`` at y = +h."""
    h = half_height
    k2x, k2y = r_top - r_bottom, 2.0 * h
    k2_sq = k2x * k2x + k2y * k2y

    def f(p):
        x, y, z = _local(p, centre, axes)
        qx, qy = _length2(x, z), y
        cap_r = torch.where(qy < 0, torch.full_like(qx, r_bottom), torch.full_like(qx, r_top))
        cax, cay = qx - torch.minimum(qx, cap_r), qy.abs() - h
        t = (((r_top - qx) * k2x + (h - qy) * k2y) / k2_sq).clamp(0.0, 1.0)
        cbx, cby = qx - r_top + k2x * t, qy - h + k2y * t
        sign = torch.where((cbx < 0) & (cay < 0), -torch.ones_like(qx), torch.ones_like(qx))
        return sign * torch.sqrt(torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))
    return f


def torus(major: float, minor: float, centre: Sequence[float] = (0, 0, 0), axes: str = "xyz") -> SDF:
    """Torus around the local y axis (a ring lying in the local xz plane)."""
    def f(p):
        x, y, z = _local(p, centre, axes)
        return _length2(_length2(x, z) - major, y) - minor
    return f


def capsule(half_length: float, radius: float, centre: Sequence[float] = (0, 0, 0), axes: str = "xyz") -> SDF:
    """Segment from local y = -half_length to +half_length, thickened by ``radius``."""
    def f(p):
        x, y, z = _local(p, centre, axes)
        y = y - y.clamp(-half_length, half_length)
        return torch.sqrt(x * x + y * y + z * z) - radius
    return f


def planes(normals_offsets: Sequence[tuple[Sequence[float], float]], centre: Sequence[float] = (0, 0, 0)) -> SDF:
    """Convex polytope ``{p : n_i . (p - centre) <= d_i}`` as ``max_i (n_i . p - d_i)`` with unit ``n_i``: exact
    over the faces, a lower bound near edges and corners (slightly rounded there by the renderer)."""
    rows = []
    for n, d in normals_offsets:
        norm = math.sqrt(sum(c * c for c in n))
        rows.append(([c / norm for c in n], d / norm))

    def f(p):
        x, y, z = _local(p, centre, "xyz")
        out = None
        for (nx, ny, nz), d in rows:
            v = x * nx + y * ny + z * nz - d
            out = v if out is None else torch.maximum(out, v)
        return out
    return f


def pyramid(half_base: float, y_bottom: float, y_top: float, centre: Sequence[float] = (0, 0, 0)) -> SDF:
    """Square pyramid: base ``[-half_base, half_base]^2`` at ``y_bottom``, apex above the centre at ``y_top``."""
    h = y_top - y_bottom
    # side plane through the base edge x = half_base (at y_bottom) and the apex (0, y_top):
    # h x + b y = h b + b y_bottom with b = half_base
    sides = [((h * sx, half_base, h * sz), h * half_base + half_base * y_bottom)
             for sx, sz in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    return planes([((0, -1, 0), -y_bottom), *sides], centre)


def gable_roof(half_x: float, half_z: float, y_bottom: float, y_ridge: float,
               centre: Sequence[float] = (0, 0, 0)) -> SDF:
    """Triangular prism: a roof whose ridge runs along x at ``y_ridge`` over the rectangle at ``y_bottom``."""
    h = y_ridge - y_bottom
    slopes = [((0, half_z, h * sz), half_z * y_ridge) for sz in (1, -1)]  # h |z| + half_z y <= half_z y_ridge
    return planes([((0, -1, 0), -y_bottom), ((1, 0, 0), half_x), ((-1, 0, 0), half_x), *slopes], centre)


def octahedron(size: float, centre: Sequence[float] = (0, 0, 0)) -> SDF:
    """Regular octahedron with vertices at distance ``size`` along each axis."""
    s3 = 1.0 / math.sqrt(3.0)

    def f(p):
        x, y, z = _local(p, centre, "xyz")
        return (x.abs() + y.abs() + z.abs() - size) * s3
    return f


def union(*fs: SDF) -> SDF:
    def f(p):
        out = fs[0](p)
        for g in fs[1:]:
            out = torch.minimum(out, g(p))
        return out
    return f


def intersect(*fs: SDF) -> SDF:
    def f(p):
        out = fs[0](p)
        for g in fs[1:]:
            out = torch.maximum(out, g(p))
        return out
    return f


def subtract(a: SDF, b: SDF) -> SDF:
    """``a`` with ``b`` carved out."""
    return lambda p: torch.maximum(a(p), -b(p))


# ---------------------------------------------------------------------------------------------------------
# objects


@dataclass(frozen=True)
class Part:
    name: str
    sdf: SDF
    colour: RGB | None = None  # None: the caption's colour


@dataclass(frozen=True)
class ToyObject:
    name: str
    parts: tuple[Part, ...]
    front_back: bool = False  # front (+Z) and back look different
    description: str = ""

    def part_sdfs(self, p: torch.Tensor) -> torch.Tensor:
        """Signed distances [P, N] of points [N, 3] to each part."""
        return torch.stack([part.sdf(p) for part in self.parts])

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] to the whole object (the union of its parts)."""
        out = self.parts[0].sdf(p)
        for part in self.parts[1:]:
            out = torch.minimum(out, part.sdf(p))
        return out

    def main_parts(self) -> list[int]:
        return [i for i, part in enumerate(self.parts) if part.colour is None]


ORANGE_CARROT: RGB = (1.0, 0.42, 0.0)
COAL: RGB = (0.05, 0.05, 0.05)
DOOR_BROWN: RGB = (0.36, 0.18, 0.06)
WINDOW_GLASS: RGB = (0.12, 0.16, 0.28)
CHIMNEY_GREY: RGB = (0.32, 0.3, 0.3)
LABEL_WHITE: RGB = (0.96, 0.96, 0.96)
TYRE_BLACK: RGB = (0.07, 0.07, 0.07)
HEADLIGHT: RGB = (1.0, 0.93, 0.45)
TAILLIGHT: RGB = (0.75, 0.0, 0.0)


def _single(name: str, sdf: SDF, description: str) -> ToyObject:
    return ToyObject(name, (Part("body", sdf),), False, description)


def _snowman() -> ToyObject:
    head_c = (0.0, 0.33, 0.0)
    return ToyObject("snowman", (
        Part("bottom", sphere(0.27, (0.0, -0.33, 0.0))),
        Part("middle", sphere(0.2, (0.0, 0.04, 0.0))),
        Part("head", sphere(0.15, head_c)),
        # carrot: a cone from inside the head to a tip in front of it, pointing +Z
        Part("nose", capped_cone(0.11, 0.055, 0.008, (0.0, 0.33, 0.23), axes="xzy"), ORANGE_CARROT),
        Part("left_eye", sphere(0.035, (-0.065, 0.39, 0.12)), COAL),
        Part("right_eye", sphere(0.035, (0.065, 0.39, 0.12)), COAL),
        Part("button_1", sphere(0.03, (0.0, 0.10, 0.19)), COAL),
        Part("button_2", sphere(0.03, (0.0, 0.0, 0.2)), COAL),
        Part("hat_brim", cylinder(0.16, 0.012, (0.0, 0.465, 0.0)), COAL),
        Part("hat_crown", cylinder(0.105, 0.065, (0.0, 0.53, 0.0)), COAL),
    ), True, "three stacked spheres, an orange carrot nose, black eyes and buttons on the front (+Z), a black hat")


def _house() -> ToyObject:
    wall_half = (0.34, 0.22, 0.28)
    wall_c = (0.0, -0.2, 0.0)
    front_z, side_x = wall_half[2], wall_half[0]
    return ToyObject("house", (
        Part("walls", box(wall_half, wall_c)),
        Part("roof", gable_roof(0.39, 0.34, 0.02, 0.4)),
        Part("door", box((0.075, 0.14, 0.02), (0.0, -0.28, front_z)), DOOR_BROWN),
        Part("window_front_left", box((0.065, 0.06, 0.015), (-0.2, -0.17, front_z)), WINDOW_GLASS),
        Part("window_front_right", box((0.065, 0.06, 0.015), (0.2, -0.17, front_z)), WINDOW_GLASS),
        Part("window_left", box((0.015, 0.06, 0.08), (-side_x, -0.17, 0.0)), WINDOW_GLASS),
        Part("window_right", box((0.015, 0.06, 0.08), (side_x, -0.17, 0.0)), WINDOW_GLASS),
        Part("chimney", box((0.05, 0.12, 0.05), (0.2, 0.3, -0.12)), CHIMNEY_GREY),
    ), True, "a box with a gable roof, a brown door and two windows on the front (+Z), a chimney at the back")


def _mug() -> ToyObject:
    radius, half_h = 0.3, 0.34
    cx = -0.1  # body axis at x = cx so that body + handle are centred
    body = subtract(cylinder(radius, half_h, (cx, 0.0, 0.0)), cylinder(radius - 0.05, half_h, (cx, 0.08, 0.0)))

    def axis_distance(p):
        return _length2(p[:, 0] - cx, p[:, 2])

    # handle on the +X side: the part of an upright ring (axis along z) outside the body
    handle = intersect(torus(0.17, 0.05, (cx + radius, 0.0, 0.0), axes="xzy"),
                       lambda p: (radius - 0.02) - axis_distance(p))
    # label on the front (+Z): a thin patch of the outer wall
    label = intersect(lambda p: (axis_distance(p) - radius).abs() - 0.012,
                      box((0.13, 0.13, 1.0), (cx, 0.0, 0.0)),
                      lambda p: -p[:, 2])
    return ToyObject("mug", (
        Part("body", body),
        Part("handle", handle),
        Part("label", label, LABEL_WHITE),
    ), True, "a hollow cylinder with a handle on the +X side and a white label on the front (+Z)")


def _car() -> ToyObject:
    dy = 0.08  # lift so the car (wheels included) is centred vertically
    wheels = [Part(f"wheel_{i}", cylinder(0.11, 0.045, (sx * 0.235, -0.21 + dy, sz * 0.3), axes="yxz"), TYRE_BLACK)
              for i, (sx, sz) in enumerate(((1, 1), (-1, 1), (1, -1), (-1, -1)))]
    return ToyObject("car", (
        Part("body", box((0.24, 0.1, 0.5), (0.0, -0.12 + dy, 0.0), rounding=0.05)),
        Part("cabin", box((0.2, 0.1, 0.24), (0.0, 0.06 + dy, -0.07), rounding=0.05)),
        Part("windows", box((0.205, 0.055, 0.245), (0.0, 0.08 + dy, -0.07), rounding=0.04), WINDOW_GLASS),
        *wheels,
        Part("headlight_left", box((0.055, 0.035, 0.02), (-0.15, -0.1 + dy, 0.49)), HEADLIGHT),
        Part("headlight_right", box((0.055, 0.035, 0.02), (0.15, -0.1 + dy, 0.49)), HEADLIGHT),
        Part("taillight_left", box((0.05, 0.03, 0.02), (-0.16, -0.08 + dy, -0.49)), TAILLIGHT),
        Part("taillight_right", box((0.05, 0.03, 0.02), (0.16, -0.08 + dy, -0.49)), TAILLIGHT),
    ), True, "a car driving towards +Z: yellow headlights at the front, red tail lights at the back, cabin set back")


def _build_objects() -> dict[str, ToyObject]:
    objs = [
        _single("sphere", sphere(0.5), "a ball"),
        _single("cube", box((0.34, 0.34, 0.34)), "an axis-aligned cube"),
        _single("cylinder", cylinder(0.33, 0.4), "an upright cylinder"),
        _single("cone", capped_cone(0.42, 0.42, 0.0), "an upright cone, tip up"),
        _single("torus", torus(0.38, 0.17), "a ring lying flat (axis +Y)"),
        _single("pyramid", pyramid(0.38, -0.33, 0.37), "a square pyramid, apex up"),
        _single("capsule", capsule(0.3, 0.26), "an upright capsule"),
        _single("octahedron", octahedron(0.58), "a regular octahedron, one vertex up"),
        _snowman(),
        _house(),
        _mug(),
        _car(),
    ]
    return {o.name: o for o in objs}


OBJECTS: dict[str, ToyObject] = _build_objects()
FRONT_BACK_OBJECTS: list[str] = [name for name, obj in OBJECTS.items() if obj.front_back]

# albedo RGB in [0, 1]; no white/black, which would vanish on the white background or under shading
COLOURS: dict[str, RGB] = {
    "red": (0.86, 0.08, 0.08),
    "orange": (1.0, 0.5, 0.05),
    "yellow": (0.98, 0.86, 0.1),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.1, 0.28, 0.92),
    "purple": (0.55, 0.18, 0.8),
    "pink": (1.0, 0.5, 0.72),
    "cyan": (0.08, 0.8, 0.86),
    "grey": (0.5, 0.5, 0.5),
}


def caption(object_name: str, colour: str) -> str:
    """``"a {colour} {object}"`` (always the article "a"; see the module docstring)."""
    if object_name not in OBJECTS:
        raise KeyError(f"unknown toyworld object {object_name!r}")
    if colour not in COLOURS:
        raise KeyError(f"unknown toyworld colour {colour!r}")
    return f"a {colour} {object_name}"


def all_captions() -> list[str]:
    """Every plain caption, objects outer, colours inner (catalog order)."""
    return [caption(o, c) for o in OBJECTS for c in COLOURS]


def eval_prompts(view_labels: Sequence[str] | None = None) -> list[str]:
    """The evaluation prompt set (``text3d/assets/eval/prompts_216.txt``): every (object, colour) pair in catalog
    order, once plain and once with a view suffix, the suffixes taken in turn from ``view_labels``
    (default: the labels the training cameras can get, :func:`text3d.cameras.reachable_view_labels`, so no
    prompt asks for a view that no training image shows)."""
    from text3d.cameras import reachable_view_labels

    labels = list(view_labels) if view_labels is not None else reachable_view_labels()
    prompts = []
    for i, text in enumerate(all_captions()):
        prompts += [text, text + VIEW_SUFFIXES[labels[i % len(labels)]]]
    return prompts


# the 3D table's two colours of each object: the first is the 12-prompt table's (docs/guidance.md), the second
# adds known failures (grey torus, cyan pyramid, purple snowman, green car) and uses every colour at least twice
TABLE_COLOURS: dict[str, tuple[str, str]] = {
    "sphere": ("green", "pink"), "cube": ("red", "grey"), "cylinder": ("purple", "orange"),
    "cone": ("yellow", "blue"), "torus": ("blue", "grey"), "pyramid": ("orange", "cyan"),
    "capsule": ("pink", "green"), "octahedron": ("cyan", "red"), "snowman": ("purple", "yellow"),
    "house": ("yellow", "red"), "mug": ("blue", "pink"), "car": ("red", "green"),
}


def table_prompts() -> list[str]:
    """The 24-prompt set of the 3D table (``assets/eval/prompts_3d_24.txt``): every object twice in two
    different colours (:data:`TABLE_COLOURS`), the 12-prompt table's first, so the front/back objects twice
    each like the others, every colour at least twice."""
    return [caption(o, c) for o in OBJECTS for c in TABLE_COLOURS[o]]


def view_eval_prompts(view_labels: Sequence[str] | None = None) -> list[str]:
    """The view evaluation prompt set (``text3d/assets/eval/prompts_views_108.txt``): every object with a distinct
    front and back (:data:`FRONT_BACK_OBJECTS`) in every colour, asked for each view of ``view_labels``
    (default: :func:`text3d.cameras.reachable_view_labels`). The view of a sphere or a cube cannot be told
    from its image, by the judge or anyone, so a view suffix is scored only where the view can be seen."""
    from text3d.cameras import reachable_view_labels

    labels = list(view_labels) if view_labels is not None else reachable_view_labels()
    return [caption(o, c) + VIEW_SUFFIXES[label] for o in FRONT_BACK_OBJECTS for c in COLOURS for label in labels]


def vocabulary() -> list[str]:
    """Every word a caption can contain, view suffixes included, in first-use order; "," (the view suffix's
    separator) is listed too, as the CLIP pre-tokenizer makes it a token of its own."""
    words: list[str] = ["a", *COLOURS, *OBJECTS]
    for label in VIEW_LABELS:
        for word in VIEW_SUFFIXES[label].replace(",", " , ").split():
            if word not in words:
                words.append(word)
    return words


# Everyday words for the world's objects and colours, each with the world's own word: what a spelling match
# cannot find ("ball" looks nothing like "sphere"). Used to suggest a known word for one the teacher never saw.
SYNONYMS: dict[str, str] = {
    "ball": "sphere", "globe": "sphere", "orb": "sphere", "marble": "sphere",
    "box": "cube", "block": "cube", "dice": "cube", "die": "cube", "crate": "cube",
    "tube": "cylinder", "can": "cylinder", "pipe": "cylinder", "pillar": "cylinder", "column": "cylinder",
    "funnel": "cone",
    "donut": "torus", "doughnut": "torus", "ring": "torus", "bagel": "torus", "hoop": "torus",
    "tetrahedron": "pyramid", "triangle": "pyramid",
    "pill": "capsule", "tablet": "capsule",
    "diamond": "octahedron", "gem": "octahedron", "crystal": "octahedron",
    "snowmen": "snowman",
    "home": "house", "hut": "house", "cottage": "house", "cabin": "house", "building": "house",
    "cup": "mug", "teacup": "mug", "tankard": "mug",
    "automobile": "car", "vehicle": "car", "truck": "car", "taxi": "car",
    "crimson": "red", "scarlet": "red", "amber": "orange", "gold": "yellow", "golden": "yellow",
    "lime": "green", "navy": "blue", "violet": "purple", "lilac": "purple", "magenta": "pink",
    "turquoise": "cyan", "aqua": "cyan", "teal": "cyan", "gray": "grey", "silver": "grey",
}


def nearest_word(word: str, known: Sequence[str]) -> str | None:
    """The word among ``known`` (the words a teacher knows) that ``word`` most likely means: its synonym
    (:data:`SYNONYMS`, plurals included), else the closest spelling ("cubee" -> "cube"), else None."""
    word = word.lower()
    for form in (word, word[:-1] if word.endswith("s") else word):
        if SYNONYMS.get(form) in known:
            return SYNONYMS[form]
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return match[0] if match else None


def parse_caption(text: str) -> tuple[str, str] | None:
    """``(object, colour)`` of a caption, with or without a view suffix ("a red cube, front view"), or None.

    Case, extra spaces and a final "." are ignored; "an" is accepted for "a"."""
    t = " ".join(str(text).lower().split()).rstrip(". ")
    for suffix in VIEW_SUFFIXES.values():
        s = " ".join(suffix.split())
        if t.endswith(s):
            t = t[: -len(s)].rstrip()
            break
    words = t.split()
    if len(words) != 3 or words[0] not in ("a", "an"):
        return None
    colour, obj = words[1], words[2]
    if colour not in COLOURS or obj not in OBJECTS:
        return None
    return obj, colour


def view_suffix_label(text: str) -> str | None:
    """The view label whose suffix ends ``text``, or None for a plain caption."""
    return split_view_suffix(" ".join(str(text).lower().split()))[1]
