"""Procedural re-ID data: rendered pedestrians seen by cameras with their own style.

The generator exists so that every method, test and demo runs without downloading a dataset.
It writes the **Market-1501** layout and file naming (``video=False``) or the **MARS** layout
(``video=True``), so the real loaders of :mod:`ureid.data.formats` read it unchanged.

What makes it a re-ID problem rather than a toy:

* an identity keeps its appearance (clothing colours and pattern, skin and hair, build, bag, shoes)
  but is seen from the camera's usual viewpoints (front / back / side: a logo or a backpack is only
  visible from one side), at a camera-specific scale and elevation;
* clothing colour carries identity across cameras, body layout does not (version 2, calibrated
  against real reference points by ``experiments/calibrate_synthetic.py``): each camera has its own
  illumination, colour cast, contrast, saturation, blur, sensor noise and resolution at the strength
  of real surveillance cameras, and a wide scene made of stretches of materials that all cameras
  share (so the background varies within a camera and overlaps between cameras);
* the nuisances of real detections: a camera's images of one identity come from up to
  ``max_tracks_per_camera`` walks (each with its own place in the scene, light, facing and framing);
  posture, stride, arm swing and body width change (``pose_variation``); the detector's box shifts,
  scales and changes aspect, sometimes cutting off the head, the feet or a side (``box_jitter``);
  scene objects or passers-by cover part of the body (``occlusion``); passers-by and objects in the
  background (``clutter``); motion blur and resolution loss (``degradation``);
* images per identity are long-tailed (shifted geometric, ``min_images``..``max_images``), every
  identity appears in at least two cameras;
* the test split follows the Market protocol: one query per (identity, camera) for up to
  ``queries_per_id`` of its cameras, a gallery holding every camera of the identity (same-camera
  images are junk for that query), distractors (pid 0: background crops, partial people) and
  junk (pid -1: tiny, blurred crops).

Output is deterministic: every random draw comes from a generator seeded by ``seed`` and the
item's key (identity, camera, index), files are written in sorted order with a fixed JPEG
quality and no metadata, so the same parameters give byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import numbers
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: realistic nuisances and camera strength (issue 13); folders of another version are regenerated
MANIFEST = "manifest.json"
# Calibrated constants of version 2 (experiments/calibrate_synthetic.py; docs/synthetic_calibration.md says why each):
# they are part of GENERATOR_VERSION, the per-dataset knobs are the parameters of generate().
_SS = 2  # supersampling factor: shapes are drawn at 2x and downsampled for anti-aliasing
_MX, _MY = 0.3, 0.2  # canvas margin around the nominal detector box: fraction of its width / height per side
_PANO = 16  # a camera's scene is this many canvases wide
_OWN_LOOK = 0.1  # share of a camera's background stretches in its own look (the rest: materials all cameras share)
_MUTE = 0.35  # saturation kept by scene colours
_RESPONSE = 0.4  # camera_strength=1 applies this fraction of the looks in _LIGHTS (calibrated: colour must survive)
_BLOTCH = 40.0  # amplitude (0..255 units) of the blotchy variation of each scene, at three scales
_DX = 0.18  # per-image horizontal box jitter (fraction of the box width): colour stripes ignore it, pixel layout does not
_COARSE = 1.0  # relative amplitude of the coarsest blotches (patches about a third of the box wide)
_HORIZON = 0.15  # the wall/floor boundary moves by up to this fraction of the height between stretches of a scene
_CHROMA = 0.4  # tint of the blotches relative to their brightness part
_BOX_WIDTH = 0.8  # detector boxes are tight: the nominal box is this fraction of the canvas' box width
# Folders the generator owns (the only things ``overwrite=True`` ever deletes).
_OWNED = ("bounding_box_train", "bounding_box_test", "query", "bbox_train", "bbox_test", "info", MANIFEST)

# Stream tags for the per-item random generators (part of their seed keys).
_PLAN, _IDENTITY, _CAMERA, _IMAGE, _DISTRACTOR, _JUNK, _BACKGROUND, _CROWD = range(8)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# ============================================================================ appearance
_SKIN = [(250, 222, 196), (238, 196, 166), (222, 172, 138), (196, 138, 102), (160, 106, 74), (118, 78, 54), (88, 58, 42)]
_HAIR = [(28, 24, 24), (52, 36, 28), (88, 60, 38), (126, 88, 52), (196, 166, 110), (150, 146, 142), (120, 56, 32)]
_NEUTRAL = [(24, 24, 28), (236, 236, 232), (128, 128, 130), (36, 44, 80), (196, 178, 146), (58, 84, 130), (96, 66, 44),
            (160, 146, 104), (48, 72, 50), (110, 30, 40), (70, 70, 74)]
_LOWER = [(24, 24, 28), (40, 56, 96), (62, 86, 128), (90, 90, 94), (150, 136, 104), (70, 54, 40), (200, 196, 186), (34, 42, 64)]
_SHOES = [(20, 20, 20), (235, 235, 235), (90, 60, 40), (60, 60, 64), (170, 40, 40)]


def _color(rng: np.random.Generator, vivid_p: float = 0.5) -> tuple[int, int, int]:
    """Clothing colour: half from a palette of common neutral/dark tones, half vivid hues."""
    if rng.random() >= vivid_p:
        base = np.array(_NEUTRAL[rng.integers(len(_NEUTRAL))], float)
        return tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 0, 255))
    h, s, v = rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


@dataclass(frozen=True)
class Appearance:
    """What stays fixed for one person across every camera."""

    skin: tuple
    hair: tuple
    hair_style: str  # short | long | bald | cap
    cap: tuple
    upper: tuple
    upper2: tuple
    upper_pattern: str  # solid | stripes | vstripes | checks | logo
    long_sleeves: bool
    jacket_open: bool  # front view shows ``upper2`` as an inner shirt
    lower: tuple
    lower_style: str  # trousers | shorts | skirt
    shoes: tuple
    bag: str  # none | backpack | shoulder | handbag
    bag_color: tuple
    bag_side: int  # -1 left, +1 right
    height: float  # person height relative to the camera's nominal height
    width: float  # shoulder/hip width factor
    leg_ratio: float  # hip height as a fraction of body height


def random_appearance(rng: np.random.Generator) -> Appearance:
    upper = _color(rng, 0.55)
    upper2 = _color(rng, 0.6)
    while sum(abs(a - b) for a, b in zip(upper, upper2)) < 120:  # patterns need contrast to be visible
        upper2 = _color(rng, 0.8)
    pattern = rng.choice(["solid", "solid", "stripes", "vstripes", "checks", "logo"])
    lower_style = rng.choice(["trousers", "trousers", "trousers", "shorts", "skirt"])
    bag = rng.choice(["none", "none", "backpack", "shoulder", "handbag"])
    return Appearance(
        skin=_SKIN[rng.integers(len(_SKIN))],
        hair=_HAIR[rng.integers(len(_HAIR))],
        hair_style=str(rng.choice(["short", "short", "long", "bald", "cap"], p=[0.35, 0.1, 0.35, 0.05, 0.15])),
        cap=_color(rng, 0.6),
        upper=upper,
        upper2=upper2,
        upper_pattern=str(pattern),
        long_sleeves=bool(rng.random() < 0.55),
        jacket_open=bool(pattern == "solid" and rng.random() < 0.35),
        lower=_LOWER[rng.integers(len(_LOWER))] if rng.random() < 0.75 else _color(rng, 0.7),
        lower_style=str(lower_style),
        shoes=_SHOES[rng.integers(len(_SHOES))],
        bag=str(bag),
        bag_color=_color(rng, 0.4),
        bag_side=int(rng.choice([-1, 1])),
        height=float(rng.uniform(0.92, 1.06)),
        width=float(rng.uniform(0.85, 1.2)),
        leg_ratio=float(rng.uniform(0.50, 0.56)),
    )


# ============================================================================ cameras
@dataclass(frozen=True)
class CameraStyle:
    """What stays fixed for one camera: its scene, optics and usual viewpoint."""

    wall: tuple
    floor: tuple
    horizon: float  # wall/floor boundary, fraction of image height
    wall_texture: str  # bricks | panels | windows | foliage | plain
    floor_texture: str  # tiles | stripes | noise | grass
    gain: float
    cast: tuple  # per-channel multipliers
    contrast: float
    saturation: float
    gamma: float
    blur: float  # Gaussian radius in output pixels
    noise: float  # sensor noise std in 0..255 units
    lowres: float  # 1 = sharp; <1 = rendered at this fraction of the size then upscaled
    scale: float  # nominal person height / image height
    view_p: tuple  # probabilities of facing front, back, side
    light_dir: float  # -1 light from the left .. +1 from the right
    tilt: float = 0.0  # camera elevation: leg-ratio offset of everyone it sees (looking down shortens legs)


# Hand-picked looks so that any two cameras differ visibly; jittered and permuted by the seed.
# Version 2: white balance and exposure at the strength of real surveillance cameras (a few percent
# to ~12% per channel, exposure within about +-20%). The version-1 table (casts up to 0.74..1.22,
# gain 0.62..1.30, saturation 0.60..1.25) moved clothing colours across hue and value bins between
# cameras, so colour stopped carrying identity across cameras.
_LIGHTS = [  # gain, cast, contrast, saturation, gamma
    (1.05, (1.00, 1.00, 1.00), 1.00, 1.00, 1.00),  # daylight
    (0.90, (1.10, 1.00, 0.88), 0.95, 0.95, 1.03),  # warm evening light
    (1.02, (0.92, 0.99, 1.10), 1.00, 0.90, 0.97),  # cold fluorescent
    (1.18, (1.02, 1.02, 0.98), 0.85, 0.85, 0.92),  # washed-out, overexposed
    (0.80, (0.96, 1.02, 1.07), 1.08, 0.90, 1.06),  # dim, bluish shade
    (0.95, (0.95, 1.07, 0.94), 1.05, 1.10, 1.00),  # green-tinted, saturated
    (1.00, (1.06, 0.95, 1.04), 0.95, 0.85, 1.00),  # magenta, desaturated
    (0.88, (1.00, 1.00, 1.00), 1.15, 1.00, 1.05),  # harsh contrast
]
_SCENES = [  # wall, floor, wall texture, floor texture
    ((150, 84, 64), (128, 126, 122), "bricks", "tiles"),
    ((196, 190, 176), (170, 160, 140), "panels", "tiles"),
    ((92, 104, 116), (70, 72, 76), "windows", "stripes"),
    ((70, 110, 60), (84, 132, 64), "foliage", "grass"),
    ((210, 206, 196), (150, 150, 156), "plain", "noise"),
    ((120, 112, 140), (104, 96, 92), "panels", "noise"),
    ((176, 150, 110), (140, 120, 96), "bricks", "stripes"),
    ((60, 66, 74), (96, 96, 100), "windows", "tiles"),
]
_VIEWS = [(0.6, 0.2, 0.2), (0.2, 0.6, 0.2), (0.2, 0.2, 0.6), (0.4, 0.4, 0.2), (0.34, 0.33, 0.33)]


def _muted(col, keep: float | None = None) -> np.ndarray:
    """A scene colour pulled towards its grey: streets and buildings are mostly unsaturated."""
    keep = _MUTE if keep is None else keep
    col = np.asarray(col, np.float32)
    return col.mean() + keep * (col - col.mean())


def camera_styles(seed: int, num_cameras: int, strength: float = 1.0) -> list[CameraStyle]:
    """``strength`` scales each camera's optics and colour response towards neutral (0: only the
    scene, viewpoint and scale differ; 1: the full looks of ``_LIGHTS``)."""
    prng = _rng(seed, _CAMERA, 1_000_000)
    light_perm, scene_perm, view_perm = (prng.permutation(8), prng.permutation(8), prng.permutation(len(_VIEWS)))
    styles = []
    for c in range(num_cameras):
        rng = _rng(seed, _CAMERA, c)
        gain, cast, contrast, sat, gamma = _LIGHTS[light_perm[c % 8]]
        toward = lambda v: 1.0 + strength * (v - 1.0)  # noqa: E731
        response = lambda v: 1.0 + strength * _RESPONSE * (v - 1.0)  # noqa: E731
        gain, contrast, sat, gamma = response(gain), response(contrast), response(sat), response(gamma)
        cast = tuple(response(v) for v in cast)
        wall, floor, wtex, ftex = _SCENES[scene_perm[c % 8]]
        jit = lambda col, s=18: tuple(int(v) for v in np.clip(np.array(col) + rng.normal(0, s, 3), 0, 255))  # noqa: E731
        styles.append(CameraStyle(
            wall=jit(wall), floor=jit(floor), horizon=float(rng.uniform(0.35, 0.65)), wall_texture=wtex, floor_texture=ftex,
            gain=float(gain * rng.uniform(0.96, 1.04)), cast=tuple(float(v * rng.uniform(0.98, 1.02)) for v in cast),
            contrast=float(contrast), saturation=float(sat), gamma=float(gamma),
            blur=strength * float(rng.choice([0.0, 0.3, 0.6, 0.9])), noise=strength * float(rng.uniform(1.0, 6.0)),
            lowres=toward(float(rng.choice([1.0, 1.0, 0.7, 0.55]))), scale=float(rng.uniform(0.9, 0.99)),
            view_p=_VIEWS[view_perm[c % len(_VIEWS)]], light_dir=float(rng.uniform(-1, 1)),
            tilt=float(rng.uniform(-0.03, 0.03)),
        ))
    return styles


# ============================================================================ background
def _canvas_size(H: int, W: int) -> tuple[int, int]:
    """The rendered canvas around the nominal detector box (output units): margins of ``_MY`` x H
    above/below and ``_MX`` x W left/right, so that a jittered box still finds scene and body in it."""
    return int(round(H * (1 + 2 * _MY))), int(round(W * (1 + 2 * _MX)))


def _wall_texture(part: np.ndarray, yy: np.ndarray, xx: np.ndarray, t: str, rng: np.random.Generator) -> None:
    """Texture one wall segment in place (``yy``/``xx``: its pixel coordinates)."""
    hz, w = part.shape[:2]
    if t == "bricks":
        bh, bw = 10 * _SS, 22 * _SS
        row = (yy // bh).astype(int)
        col = ((xx + (row % 2) * bw / 2) // bw).astype(int)
        mortar = ((yy % bh) < _SS) | (((xx + (row % 2) * bw / 2) % bw) < _SS)
        noise = rng.standard_normal((int(row.max()) + 1, int(col.max()) + 1))
        part *= (1 + 0.12 * noise[row, col - int(col.min())])[..., None]
        part[mortar] = part[mortar] * 0.55 + 90
    elif t == "panels":
        pw = int(rng.integers(18, 30)) * _SS
        part *= (1 - 0.18 * ((xx % pw) < 2 * _SS))[..., None]
        part *= (0.9 + 0.2 * (yy / max(hz, 1)))[..., None]
    elif t == "windows":
        ww, wh = 20 * _SS, 16 * _SS
        win = ((xx % (ww + 8 * _SS)) < ww) & ((yy % (wh + 10 * _SS)) < wh)
        glass = np.array([150, 175, 195], np.float32) * rng.uniform(0.6, 1.1)
        part[win] = glass + 20 * np.sin(xx[win] / 7.0)[..., None]
    elif t == "foliage":
        blobs = Image.new("L", (w, hz), 0)
        d = ImageDraw.Draw(blobs)
        for _ in range(int(w * hz / 180)):
            x, y, r = rng.integers(0, w), rng.integers(0, hz), rng.integers(3, 10) * _SS // 2
            d.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(0, 255)))
        part *= (0.65 + 0.6 * np.asarray(blobs, np.float32) / 255)[..., None]


def _floor_texture(part: np.ndarray, fy: np.ndarray, fx: np.ndarray, depth: np.ndarray, t: str, rng: np.random.Generator) -> None:
    if t == "tiles":
        u, v = fx / (depth * 30 * _SS), np.log1p(fy) * 3.0
        part *= (1 - 0.25 * (((u % 1) < 0.06) | ((v % 1) < 0.08)))[..., None]
    elif t == "stripes":
        part[((fx / (depth * 18 * _SS)) % 2) < 1] *= 0.82
    elif t == "grass":
        part *= (0.8 + 0.35 * rng.random(part.shape[:2]))[..., None]


def _background(style: CameraStyle, seed: int, cam: int, H: int, W: int) -> np.ndarray:
    """The camera's fixed scene at 2x: a panorama ``_PANO`` canvases wide and taller than one; each
    track crops the canvas at its own place in it (people walk through different parts of the view).

    The view is made of stretches of different materials (shop fronts, glass, hedges, plain walls;
    paving, tiles, grass): about half of them the camera's own look (``style.wall``/``floor``), the
    others drawn from the materials every camera shares, as on one campus. So the background varies
    within a camera and overlaps between cameras instead of being one camera-wide signature."""
    rng = _rng(seed, _BACKGROUND, cam)
    Hc, Wc = _canvas_size(H, W)
    h, w = Hc * _SS + 2 * int(H * _SS * _MY), Wc * _SS * _PANO
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    # stretches of 0.5..1.5 canvas widths, each with its own wall/floor boundary (steps, kerbs, low walls)
    edges = [0]
    while edges[-1] < w:
        edges.append(min(w, edges[-1] + int(Wc * _SS * rng.uniform(0.5, 1.5))))
    hzs = []
    for a, b in zip(edges[:-1], edges[1:]):
        hz = int(np.clip(style.horizon + rng.uniform(-_HORIZON, _HORIZON), 0.15, 0.85) * h)
        hzs.append(hz)
        if rng.random() < _OWN_LOOK:
            wall, wtex = style.wall, style.wall_texture
        else:
            wall, _, wtex, _ = _SCENES[rng.integers(len(_SCENES))]
        if rng.random() < _OWN_LOOK:
            floor, ftex = style.floor, style.floor_texture
        else:
            _, floor, _, ftex = _SCENES[rng.integers(len(_SCENES))]
        fy, fx = yy[hz:, a:b] - hz, xx[hz:, a:b] - w / 2
        depth = (fy + 4.0) / (h - hz + 4.0)
        img[:hz, a:b] = np.clip(_muted(np.array(wall, np.float32) + rng.normal(0, 14, 3)), 0, 255)
        img[hz:, a:b] = np.clip(_muted(np.array(floor, np.float32) + rng.normal(0, 10, 3)), 0, 255)
        _wall_texture(img[:hz, a:b], yy[:hz, a:b], xx[:hz, a:b], wtex, rng)
        _floor_texture(img[hz:, a:b], fy, fx, depth, ftex, rng)
        img[:hz, a:b] += rng.normal(0, 4, img[:hz, a:b].shape)
        img[hz:, a:b] *= (0.85 + 0.25 * depth)[..., None]  # nearer floor catches more light
        img[hz:, a:b] += rng.normal(0, 6, img[hz:, a:b].shape)
    hz = int(np.mean(hzs))
    # shade and sunlit stretches change tint and brightness along the view
    knots = np.linspace(0, w, 3 * _PANO + 1)
    tint = np.stack([np.interp(xx[0], knots, 1 + rng.normal(0, 0.08, len(knots))) for _ in range(3)], axis=-1)
    tint *= np.interp(xx[0], knots, np.exp(rng.normal(0, 0.15, len(knots))))[:, None]
    img *= tint[None]
    # dirt, stains, shadows, reflections: blotches at three scales, mostly in brightness with a weaker
    # tint (real backgrounds spread over many shades; a flat wall would put a camera's whole background
    # into a few colour bins)
    for cell, amp in ((6, _BLOTCH), (24, _BLOTCH), (64, _BLOTCH * _COARSE)):
        small = rng.normal(0, 1, (h // (cell * _SS) + 2, w // (cell * _SS) + 2, 3))
        small[..., :] = small[..., :1] + _CHROMA * small  # a shared brightness part plus a per-channel tint
        small = np.clip(128 + 40 * small / math.sqrt(1 + _CHROMA**2), 0, 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128
        img += field * (amp / 40)
    # a few fixed objects (poles, bins, benches) that belong to this camera's scene
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 4)) * _PANO):
        col = tuple(int(v) for v in _muted(rng.integers(30, 220, 3)))
        x = int(rng.integers(0, w))
        if rng.random() < 0.5:  # pole
            d.rectangle([x, 0, x + int(rng.integers(2, 5)) * _SS, int(hz + rng.uniform(0.1, 0.3) * h)], fill=col)
        else:  # box-like object standing on the floor
            bw, bh = int(rng.integers(10, 30)) * _SS, int(rng.integers(10, 30)) * _SS
            yb = int(hz + rng.uniform(0.0, 0.25) * h)
            d.rectangle([x, yb - bh, x + bw, yb], fill=col)
    return np.asarray(out)


# ============================================================================ the pedestrian
@dataclass(frozen=True)
class Pose:
    """Where and how a person appears in one image (all in output-image units)."""

    cx: float  # body centre x, fraction of width
    feet: float  # feet y, fraction of height
    height: float  # body height, fraction of image height
    facing: str  # front | back | side
    phase: float  # walking phase (radians): leg stride and arm swing
    flip: bool
    width: float = 1.0  # body width factor of this view (posture, loose clothes, a turned torso)
    stride: float = 1.0  # stride length factor (slow walk .. long steps)
    legs: float = 0.0  # offset of the leg ratio (camera elevation foreshortens the legs)
    arms: float = 1.0  # arm-swing amplitude factor


def _poly(d: ImageDraw.ImageDraw, pts, fill) -> None:
    d.polygon([(float(x), float(y)) for x, y in pts], fill=fill)


def _limb(d, p0, p1, w0, w1, fill) -> None:
    """A tapered segment with rounded ends (arm, leg)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / n, dx / n
    _poly(d, [(x0 + nx * w0 / 2, y0 + ny * w0 / 2), (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
              (x1 - nx * w1 / 2, y1 - ny * w1 / 2), (x0 - nx * w0 / 2, y0 - ny * w0 / 2)], fill)
    d.ellipse([x0 - w0 / 2, y0 - w0 / 2, x0 + w0 / 2, y0 + w0 / 2], fill=fill)
    d.ellipse([x1 - w1 / 2, y1 - w1 / 2, x1 + w1 / 2, y1 + w1 / 2], fill=fill)


def _pattern(app: Appearance, shape: tuple[int, int], top: float, h: float, x0: float) -> Image.Image:
    """The upper-garment texture in body coordinates, so stripes scale and move with the person."""
    H, W = shape
    p = app.upper_pattern
    if p not in ("stripes", "vstripes", "checks"):
        return Image.new("RGB", (W, H), app.upper)
    v = ((np.arange(H, dtype=np.float32) - top) / h)[:, None]
    u = ((np.arange(W, dtype=np.float32) - x0) / h)[None, :]
    if p == "stripes":
        m = np.broadcast_to(((v / 0.045) % 2) < 1, (H, W))
    elif p == "vstripes":
        m = np.broadcast_to(((u / 0.035) % 2) < 1, (H, W))
    else:
        m = (((v / 0.05) % 2) < 1) ^ (((u / 0.05) % 2) < 1)
    out = np.where(m[..., None], np.array(app.upper2, np.uint8), np.array(app.upper, np.uint8))
    return Image.fromarray(out)


def render_person(app: Appearance, pose: Pose, H: int, W: int, light_dir: float = 0.0) -> Image.Image:
    """Draw one pedestrian on a transparent ``(H*2, W*2)`` RGBA layer (2x supersampled).

    The figure is built from body proportions in units of its height ``h``: head 0..0.13,
    shoulders at 0.18, hips at ``1 - leg_ratio``, feet at 1.0.
    """
    win, x, y = _person_window(app, pose, H, W, light_dir)
    layer = Image.new("RGBA", (W * _SS, H * _SS), (0, 0, 0, 0))
    layer.paste(win, (x, y))
    return layer


def _person_window(app: Appearance, pose: Pose, H: int, W: int, light_dir: float = 0.0) -> tuple[Image.Image, int, int]:
    """:func:`render_person` drawn only in the window around the body: (RGBA window, x, y) in the 2x layer."""
    S = _SS
    HH, WW = H * S, W * S
    h = pose.height * app.height * HH
    feet = pose.feet * HH
    top = feet - h
    cx = pose.cx * WW
    # the window holds everything drawn below (arms, bags and strides reach < 0.42 h sideways)
    x0, x1 = int(np.clip(math.floor(cx - 0.42 * h), 0, WW)), int(np.clip(math.ceil(cx + 0.42 * h), 0, WW))
    y0, y1 = int(np.clip(math.floor(top - 0.03 * h), 0, HH)), int(np.clip(math.ceil(feet + 0.06 * h), 0, HH))
    if x1 <= x0 or y1 <= y0:
        return Image.new("RGBA", (1, 1), (0, 0, 0, 0)), 0, 0
    HH, WW, cx, feet, top = y1 - y0, x1 - x0, cx - x0, feet - y0, top - y0
    side = pose.facing == "side"
    wf = app.width * pose.width * (0.62 if side else 1.0)
    Y = lambda f: top + f * h  # noqa: E731
    sh_w, hip_w = 0.125 * h * wf, 0.095 * h * wf  # half widths
    hip_y = Y(1 - min(0.6, max(0.44, app.leg_ratio + pose.legs)))
    layer = Image.new("RGBA", (WW, HH), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    A = lambda c: tuple(int(v) for v in c) + (255,)  # noqa: E731
    skin, hair = A(app.skin), A(app.hair)
    stride = math.sin(pose.phase) * pose.stride
    bag_x = app.bag_side  # the bag hangs on this side in the front view (mirrored from the back)
    if pose.facing == "back":
        bag_x = -bag_x

    # --- things behind the body
    if app.hair_style == "long" and pose.facing != "front":
        d.rounded_rectangle([cx - 0.06 * h, Y(0.03), cx + 0.06 * h, Y(0.26)], radius=0.03 * h, fill=hair)
    if app.bag == "backpack" and side:
        d.rounded_rectangle([cx - sh_w - 0.08 * h, Y(0.19), cx - sh_w + 0.02 * h, Y(0.42)], radius=0.02 * h, fill=A(app.bag_color))

    # --- legs and shoes
    leg_w = 0.075 * h * app.width * pose.width
    knee_y = hip_y + (feet - hip_y) * 0.5
    for s in (-1, 1):
        if side:  # stride seen from the side: legs swing forward/back
            fx_, fy_ = cx + s * stride * 0.16 * h, feet - 0.02 * h * (1 - abs(stride))
            hx = cx
        else:  # seen from front/back: a foot forward appears lower and the legs part a little
            hx = cx + s * hip_w * 0.5
            fx_, fy_ = hx + s * 0.01 * h, feet + s * stride * 0.02 * h
        kx, ky = (hx + fx_) / 2, knee_y
        trouser = A(app.lower)
        lower_col = skin if app.lower_style in ("shorts", "skirt") else trouser
        _limb(d, (kx, ky), (fx_, fy_ - 0.03 * h), leg_w * 0.85, leg_w * 0.7, lower_col)
        _limb(d, (hx, hip_y), (kx, ky), leg_w, leg_w * 0.85, trouser if app.lower_style != "skirt" else skin)
        sx = fx_ + (0.03 * h if side else 0)
        d.ellipse([sx - 0.045 * h, fy_ - 0.04 * h, sx + 0.045 * h, fy_ + 0.005 * h], fill=A(app.shoes))
    if app.lower_style == "skirt":
        _poly(d, [(cx - hip_w, hip_y - 0.02 * h), (cx + hip_w, hip_y - 0.02 * h),
                  (cx + hip_w * 1.5, Y(0.72)), (cx - hip_w * 1.5, Y(0.72))], A(app.lower))
    else:  # seat of the trousers joining the legs
        _poly(d, [(cx - hip_w, hip_y - 0.03 * h), (cx + hip_w, hip_y - 0.03 * h), (cx + hip_w * 0.7, hip_y + 0.07 * h),
                  (cx - hip_w * 0.7, hip_y + 0.07 * h)], A(app.lower))

    # --- torso (patterned garment pasted through its mask)
    torso = [(cx - sh_w, Y(0.17)), (cx + sh_w, Y(0.17)), (cx + hip_w * 1.05, hip_y + 0.01 * h), (cx - hip_w * 1.05, hip_y + 0.01 * h)]
    mask = Image.new("L", (WW, HH), 0)
    md = ImageDraw.Draw(mask)
    _poly(md, torso, 255)
    md.ellipse([cx - sh_w, Y(0.155), cx + sh_w, Y(0.215)], fill=255)  # rounded shoulders
    layer.paste(_pattern(app, (HH, WW), top, h, cx), (0, 0), mask)
    if app.jacket_open and pose.facing == "front":
        _poly(d, [(cx - 0.035 * h, Y(0.18)), (cx + 0.035 * h, Y(0.18)), (cx + 0.03 * h, hip_y), (cx - 0.03 * h, hip_y)], A(app.upper2))
    if app.upper_pattern == "logo" and pose.facing == "front":
        r = 0.04 * h
        ly = Y(0.29)
        d.ellipse([cx - r, ly - r, cx + r, ly + r], fill=A(app.upper2))

    # --- bags worn on the front / back
    bag = A(app.bag_color)
    if app.bag == "backpack" and pose.facing == "back":
        d.rounded_rectangle([cx - sh_w * 0.8, Y(0.19), cx + sh_w * 0.8, Y(0.43)], radius=0.03 * h, fill=bag)
    elif app.bag == "backpack" and pose.facing == "front":
        for s in (-1, 1):
            _limb(d, (cx + s * sh_w * 0.55, Y(0.17)), (cx + s * sh_w * 0.6, Y(0.36)), 0.02 * h, 0.02 * h, bag)
    if app.bag == "shoulder" and not side:
        _limb(d, (cx - bag_x * sh_w * 0.7, Y(0.17)), (cx + bag_x * hip_w, hip_y - 0.04 * h), 0.018 * h, 0.018 * h, bag)

    # --- arms: the far arm is hidden from the side
    arm_w = 0.055 * h * app.width * pose.width
    arms = (1,) if side else (-1, 1)
    for s in arms:
        swing = (-s * stride if not side else stride) * pose.arms
        shx = cx + s * (sh_w - arm_w * 0.4) if not side else cx
        elbow = (shx + (swing * 0.05 * h if side else s * 0.012 * h), Y(0.33))
        hand = (shx + (swing * 0.12 * h if side else s * 0.02 * h + swing * 0.015 * h), Y(0.47))
        sleeve = A(app.upper)
        _limb(d, (shx, Y(0.19)), elbow, arm_w, arm_w * 0.9, sleeve)
        _limb(d, elbow, hand, arm_w * 0.9, arm_w * 0.75, sleeve if app.long_sleeves else skin)
        d.ellipse([hand[0] - arm_w * 0.45, hand[1] - arm_w * 0.3, hand[0] + arm_w * 0.45, hand[1] + arm_w * 0.6], fill=skin)
        if app.bag == "handbag" and (s == bag_x or side):
            d.rounded_rectangle([hand[0] - 0.05 * h, hand[1] + 0.01 * h, hand[0] + 0.05 * h, hand[1] + 0.11 * h], radius=0.01 * h, fill=bag)
    if app.bag == "shoulder" and not side:
        bx = cx + bag_x * (hip_w + 0.03 * h)
        d.rounded_rectangle([bx - 0.05 * h, hip_y - 0.07 * h, bx + 0.05 * h, hip_y + 0.03 * h], radius=0.01 * h, fill=bag)

    # --- neck and head
    _limb(d, (cx, Y(0.11)), (cx, Y(0.17)), 0.045 * h, 0.05 * h, skin)
    hw, hcx = 0.052 * h, cx + (0.012 * h if side else 0)
    d.ellipse([hcx - hw, Y(0.0), hcx + hw, Y(0.13)], fill=skin)
    if app.hair_style == "cap":
        d.chord([hcx - hw * 1.05, Y(-0.005), hcx + hw * 1.05, Y(0.1)], 180, 360, fill=A(app.cap))
        d.rectangle([hcx - hw * 1.05, Y(0.045), hcx + hw * (1.6 if side else 1.05), Y(0.055)], fill=A(app.cap))
    elif app.hair_style != "bald":
        if pose.facing == "back":
            d.ellipse([hcx - hw * 1.03, Y(-0.005), hcx + hw * 1.03, Y(0.12)], fill=hair)
        elif side:
            d.chord([hcx - hw * 1.05, Y(-0.008), hcx + hw * 1.02, Y(0.11)], 150, 360, fill=hair)
            d.pieslice([hcx - hw * 1.05, Y(-0.008), hcx + hw * 0.4, Y(0.12)], 90, 270, fill=hair)
        else:
            d.chord([hcx - hw * 1.05, Y(-0.008), hcx + hw * 1.05, Y(0.09)], 180, 360, fill=hair)
        if app.hair_style == "long" and pose.facing == "front":
            for s in (-1, 1):
                d.rectangle([hcx + s * hw * 0.75 - 0.018 * h, Y(0.04), hcx + s * hw * 0.75 + 0.018 * h, Y(0.2)], fill=hair)

    # --- shading: the body is roughly a cylinder lit from ``light_dir``
    arr = np.asarray(layer, np.float32)
    xs = (np.arange(WW, dtype=np.float32) - cx) / max(sh_w * 1.3, 1.0)
    shade = 1.0 - 0.28 * np.clip(xs, -1, 1) ** 2 + 0.12 * light_dir * np.clip(xs, -1, 1)
    ys = (np.arange(HH, dtype=np.float32) - top) / max(h, 1.0)
    shade = shade[None, :] * (1.0 - 0.12 * np.clip(ys, 0, 1))[:, None]
    arr[..., :3] *= shade[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")
    if pose.flip:  # mirrored about the layer's centre line
        return out.transpose(Image.FLIP_LEFT_RIGHT), W * S - x1, y0
    return out, x0, y0


# ============================================================================ camera effects
def _apply_camera(pil: Image.Image, style: CameraStyle, rng: np.random.Generator, light: tuple = (1.0, (1.0, 1.0, 1.0)),
                  extra_blur: float = 0.0, lowres: float = 1.0, motion: int = 0) -> Image.Image:
    """The camera's optics and colour response on an output-size image.

    ``light`` is the (gain, per-channel cast) of the moment on top of the camera's own response
    (the light changes between tracks); ``lowres`` a further resolution loss (a person far away, a
    compressed stream); ``motion`` a horizontal motion blur over that many pixels."""
    W, H = pil.size
    res = style.lowres * lowres
    if res < 1:
        small = (max(8, int(W * res)), max(16, int(H * res)))
        pil = pil.resize(small, Image.BILINEAR).resize((W, H), Image.BILINEAR)
    if style.blur + extra_blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(style.blur + extra_blur))
    x = np.asarray(pil, np.float32) / 255.0
    if motion > 1:  # the person (or the camera) moves during the exposure
        pad = np.pad(x, ((0, 0), (motion // 2, motion - 1 - motion // 2), (0, 0)), mode="edge")
        x = sum(pad[:, i : i + W] for i in range(motion)) / motion
    gray = x.mean(axis=2, keepdims=True)
    x = gray + style.saturation * (x - gray)
    x = 0.5 + style.contrast * (x - 0.5)
    gain, cast = light
    x = np.clip(x * (np.array(style.cast, np.float32) * np.array(cast, np.float32)) * (style.gain * gain), 0, 1) ** style.gamma
    x = x * 255 + rng.normal(0, style.noise, x.shape)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


def _shadow(img: Image.Image, cx: float, fy: float, r: float) -> None:
    """A soft contact shadow under the feet (2x canvas pixels)."""
    box = (int(cx - r) - 4, int(fy - r * 0.18) - 4, int(cx + r) + 5, int(fy + r * 0.18) + 5)
    sh = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    ImageDraw.Draw(sh).ellipse([cx - r - box[0], fy - r * 0.18 - box[1], cx + r - box[0], fy + r * 0.18 - box[1]], fill=110)
    img.paste((0, 0, 0), box, sh.filter(ImageFilter.GaussianBlur(3)))


# ============================================================================ the plan
@dataclass(frozen=True)
class Params:
    seed: int = 0
    num_train_ids: int = 80
    num_test_ids: int = 80
    num_cameras: int = 6
    num_distractors: int = 250  # images (image mode) or tracklets (video mode)
    num_junk: int = 100
    height: int = 128
    width: int = 64
    video: bool = False
    min_images: int = 4  # per identity (image mode) or tracklets per identity (video mode: at least 2)
    max_images: int = 20
    mean_images: float = 8.0
    queries_per_id: int = 2
    min_frames: int = 4
    max_frames: int = 24
    mean_frames: float = 8.0
    jpeg_quality: int = 90
    camera_strength: float = 1.0
    # --- version 2: the nuisances of real detections (0 turns each off)
    max_tracks_per_camera: int = 3  # image mode: a camera's images of one identity come from up to this many walks
    box_jitter: float = 1.0  # detector-box shift / scale / aspect jitter and partial crops (1 = the default strength)
    pose_variation: float = 1.0  # posture, stride, arm swing and body-width change between tracks and images
    occlusion: float = 0.2  # probability that a scene object or another person covers part of the body
    clutter: float = 1.0  # background pedestrians and objects (1: about half the images have some)
    degradation: float = 1.0  # motion blur and resolution loss per image (1: the default rates)

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(0.0 <= self.camera_strength <= 1.0, f"camera_strength must be in [0, 1], got {self.camera_strength}")
        need(self.num_train_ids >= 1, f"num_train_ids must be >= 1, got {self.num_train_ids}")
        need(self.num_test_ids >= 1, f"num_test_ids must be >= 1, got {self.num_test_ids}")
        need(2 <= self.num_cameras <= 9, f"num_cameras must be in 2..9 (every identity needs two cameras; file names hold one digit), got {self.num_cameras}")
        need(self.num_distractors >= 0, f"num_distractors must be >= 0, got {self.num_distractors}")
        need(self.num_junk >= 0, f"num_junk must be >= 0, got {self.num_junk}")
        need(self.height >= 32, f"height must be >= 32, got {self.height}")
        need(self.width >= 16, f"width must be >= 16, got {self.width}")
        need(2 <= self.min_images <= self.max_images, f"need 2 <= min_images <= max_images, got {self.min_images}, {self.max_images}")
        need(self.min_images <= self.mean_images <= self.max_images, f"mean_images must lie in [min_images, max_images], got {self.mean_images}")
        need(self.queries_per_id >= 1, f"queries_per_id must be >= 1, got {self.queries_per_id}")
        need(1 <= self.min_frames <= self.max_frames <= 999, f"need 1 <= min_frames <= max_frames <= 999, got {self.min_frames}, {self.max_frames}")
        need(self.min_frames <= self.mean_frames <= self.max_frames, f"mean_frames must lie in [min_frames, max_frames], got {self.mean_frames}")
        need(1 <= self.jpeg_quality <= 95, f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        need(1 <= self.max_tracks_per_camera <= 20, f"max_tracks_per_camera must be in 1..20, got {self.max_tracks_per_camera}")
        for name in ("box_jitter", "pose_variation", "clutter", "degradation"):
            v = getattr(self, name)
            need(0.0 <= v <= 2.0, f"{name} must be in [0, 2], got {v}")
        need(0.0 <= self.occlusion <= 1.0, f"occlusion must be in [0, 1], got {self.occlusion}")


def _long_tail(rng, lo: int, hi: int, mean: float) -> int:
    """Shifted geometric count in lo..hi: most identities have few images, a few have many."""
    p = 1.0 / (mean - lo + 1.0)
    return int(min(hi, lo + rng.geometric(p) - 1))


@dataclass(frozen=True)
class Track:
    """One identity walking through one camera: ``n`` consecutive detections/frames."""

    pid: int
    cam: int  # 0-based
    index: int  # track number within (pid, cam), 0-based
    n: int
    split: str  # train | test
    query: bool  # one detection of this track is a query (image mode) / the track is a query (video)


def _plan(p: Params) -> list[Track]:
    """Which identity appears in which cameras, how often; identities 1.. (0 is for distractors)."""
    rng = _rng(p.seed, _PLAN)
    tracks = []
    for pid in range(1, p.num_train_ids + p.num_test_ids + 1):
        split = "train" if pid <= p.num_train_ids else "test"
        n = _long_tail(rng, p.min_images, p.max_images, p.mean_images)
        # cameras per identity: at least 2, usually 2-4 (Market: 2-6), never more images than cameras
        k = int(min(p.num_cameras, n, 2 + rng.binomial(p.num_cameras - 2, 0.3)))
        cams = np.sort(rng.choice(p.num_cameras, size=k, replace=False))
        share = 1 + rng.multinomial(n - k, rng.dirichlet(np.ones(k)))  # every camera gets >= 1
        qcams = set(rng.choice(cams, size=min(p.queries_per_id, k), replace=False).tolist()) if split == "test" else set()
        for cam, m in zip(cams.tolist(), share.tolist()):
            if p.video:  # m = tracklets in this camera; a query tracklet comes on top of the gallery ones
                for t in range(m + (cam in qcams)):
                    tracks.append(Track(pid, cam, t, _long_tail(rng, p.min_frames, p.max_frames, p.mean_frames), split, cam in qcams and t == m))
            else:  # the camera's m images come from 1..max_tracks_per_camera walks past it (the query from the first)
                nt = 1 + int(rng.binomial(min(p.max_tracks_per_camera, m) - 1, 0.5)) if m > 1 else 1
                sizes = 1 + rng.multinomial(m - nt, np.ones(nt) / nt)
                for t, mt in enumerate(sizes.tolist()):
                    q = cam in qcams and t == 0
                    tracks.append(Track(pid, cam, t, mt + q, split, q))
    return tracks


def _track_poses(style: CameraStyle, rng: np.random.Generator, n: int, video: bool, variation: float = 1.0) -> list[Pose]:
    """Consecutive poses of one walk: facing, scale and posture fixed per walk, moving phase and drift."""
    facing = str(rng.choice(["front", "back", "side"], p=style.view_p))
    flip = bool(rng.random() < 0.5)
    scale = style.scale * rng.uniform(0.94, 1.06)
    cx, feet = 0.5 + rng.normal(0, 0.04), 0.5 + 0.5 * scale + rng.normal(0, 0.015)
    phase, step = rng.uniform(0, 2 * math.pi), (0.7 if video else rng.uniform(1.0, 2.5))
    v = variation
    width = math.exp(rng.normal(0, 0.07 * v))
    stride = float(np.clip(1 + rng.normal(0, 0.3 * v), 0.3, 1.6))
    arms = float(np.clip(1 + rng.normal(0, 0.4 * v), 0.2, 2.0))
    legs = style.tilt + rng.normal(0, 0.012 * v)
    poses = []
    for i in range(n):
        j = 0.3 if video else 1.0  # video frames are consecutive: much less jitter
        poses.append(Pose(cx=float(cx + rng.normal(0, 0.035 * j)), feet=float(min(1.02, feet + rng.normal(0, 0.012 * j))),
                          height=float(scale * (1 + rng.normal(0, 0.03 * j))), facing=facing, phase=float(phase + i * step), flip=flip,
                          width=float(width * math.exp(rng.normal(0, 0.03 * v * j))), stride=stride, legs=float(legs), arms=arms))
    return poses


# ============================================================================ rendering items
@dataclass(frozen=True)
class _Shot:
    """What stays fixed during one track: where in the scene, the light, the detector's framing."""

    sx: int  # scene crop offset in the camera's panorama (2x pixels)
    sy: int
    light: tuple  # (gain, cast) of the moment
    box: tuple  # (dx, dy, log-scale, log-aspect) framing bias of this track's boxes
    lowres: float  # resolution of this track (distance, stream quality); 1 = the camera's own
    occluder: tuple | None  # video: one occluder for the whole tracklet (image mode: drawn per image)


class _Renderer:
    def __init__(self, p: Params):
        self.p = p
        self.styles = camera_styles(p.seed, p.num_cameras, p.camera_strength)
        self.bgs = [_background(s, p.seed, c, p.height, p.width) for c, s in enumerate(self.styles)]  # uint8
        self.apps: dict[int, Appearance] = {}
        self.Hc, self.Wc = _canvas_size(p.height, p.width)
        self._crowds: dict[int, list] = {}

    def appearance(self, pid: int) -> Appearance:
        if pid not in self.apps:
            self.apps[pid] = random_appearance(_rng(self.p.seed, _IDENTITY, pid))
        return self.apps[pid]

    # ---------------------------------------------------------------- pieces
    def crowd(self, cam: int) -> list[Image.Image]:
        """Passers-by of one camera, rendered once (built on first use): RGBA sprites cropped to the body, 2x pixels."""
        if cam not in self._crowds:
            rng, st = _rng(self.p.seed, _CROWD, cam), self.styles[cam]
            out = []
            for _ in range(12):
                app = random_appearance(rng)
                pose = _track_poses(st, rng, 1, False)[0]
                pose = Pose(0.5, 0.97, pose.height * self.p.height / self.Hc, pose.facing, pose.phase, pose.flip,
                            pose.width, pose.stride, pose.legs, pose.arms)
                win, x, y = _person_window(app, pose, self.Hc, self.Wc, st.light_dir)
                bb = win.getbbox() or (0, 0, 1, 1)
                out.append(win.crop(bb))
            self._crowds[cam] = out
        return self._crowds[cam]

    def _paste_sprite(self, img: Image.Image, cam: int, k: int, x: float, feet: float, f: float) -> None:
        sprite = self.crowd(cam)[k]  # pasted with its bottom (the feet) at ``feet``, centred on ``x``, scaled by ``f``
        if f != 1.0:
            sprite = sprite.resize((max(1, int(sprite.width * f)), max(1, int(sprite.height * f))), Image.BILINEAR)
        img.paste(sprite, (int(x - sprite.width / 2), int(feet - sprite.height)), sprite)

    def shot(self, cam: int, rng: np.random.Generator) -> _Shot:
        p, bg = self.p, self.bgs[cam]
        sx = int(rng.integers(0, bg.shape[1] - self.Wc * _SS + 1))
        sy = int(rng.integers(0, bg.shape[0] - self.Hc * _SS + 1))
        light = (float(rng.uniform(0.9, 1.1)), tuple(float(v) for v in rng.uniform(0.97, 1.03, 3)))
        j = p.box_jitter
        box = (float(rng.normal(0, 0.08 * j)), float(rng.normal(0, 0.03 * j)), float(rng.normal(0, 0.07 * j)), float(rng.normal(0, 0.08 * j)))
        lowres = float(rng.uniform(0.45, 0.8)) if rng.random() < 0.25 * p.degradation else 1.0
        occ = self.occluder(cam, rng) if p.video else None
        return _Shot(sx, sy, light, box, lowres, occ)

    def occluder(self, cam: int, rng: np.random.Generator) -> tuple | None:
        """None, ("object", shape, x, y, w, h, colour) in box units, or ("person", sprite, dx, scale)."""
        if rng.random() >= self.p.occlusion:
            return None
        if rng.random() < 0.5:
            shape = str(rng.choice(["low", "low", "pole", "side"]))
            col = tuple(int(v) for v in rng.integers(20, 230, 3))
            if shape == "low":  # bin, railing, bench, car bonnet: hides the legs
                hgt = float(rng.uniform(0.15, 0.45))
                return ("object", shape, float(rng.uniform(-0.4, 0.4)), 1.0 - hgt + float(rng.uniform(0, 0.05)), float(rng.uniform(0.6, 1.4)), hgt, col)
            if shape == "pole":  # a pole or tree trunk in front
                return ("object", shape, float(rng.uniform(-0.35, 0.35)), -0.2, float(rng.uniform(0.08, 0.2)), 1.4, col)
            return ("object", shape, float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.5)), float(rng.uniform(-0.1, 0.3)), 0.5, 1.2, col)
        return ("person", int(rng.integers(12)), float(rng.choice([-1, 1]) * rng.uniform(0.35, 0.75)), float(rng.uniform(0.95, 1.15)))

    # ---------------------------------------------------------------- one image
    def image(self, app: Appearance | None, pose: Pose | None, cam: int, rng: np.random.Generator, shot: _Shot,
              extra_blur: float = 0.0) -> Image.Image:
        """Scene, passers-by behind, the person, an occluder in front, then the detector's box and the camera."""
        p, st, S = self.p, self.styles[cam], _SS
        H, W, Hc, Wc = p.height, p.width, self.Hc, self.Wc
        mx, my = (Wc - W) / 2, (Hc - H) / 2  # nominal box offset in the canvas (output units)
        bg = self.bgs[cam]
        drift = int(rng.normal(0, (0.02 if p.video else 0.12) * W * S))
        sx = int(np.clip(shot.sx + drift, 0, bg.shape[1] - Wc * S))
        sy = int(np.clip(shot.sy + rng.integers(-2, 3), 0, bg.shape[0] - Hc * S))
        img = Image.fromarray(np.ascontiguousarray(bg[sy : sy + Hc * S, sx : sx + Wc * S]))
        feet_y = ((my + (pose.feet if pose else 0.95) * H) * S)
        # passers-by further away: smaller, feet higher up
        if rng.random() < 0.5 * p.clutter:
            for _ in range(int(rng.integers(1, 3))):
                f = float(rng.uniform(0.45, 0.8))
                self._paste_sprite(img, cam, int(rng.integers(12)), float(rng.uniform(0, Wc * S)), feet_y - (1 - f) * 0.35 * H * S, f)
        if rng.random() < 0.7 * p.clutter:  # things in the scene: grey, dark or light (bins, doors, signs, shadows)
            d = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 5))):
                v = int(rng.choice([rng.integers(15, 70), rng.integers(170, 245)]))
                col = tuple(int(c) for c in np.clip(v + rng.normal(0, 10, 3), 0, 255))
                x0, y0 = float(rng.uniform(0, Wc * S)), float(rng.uniform(0, Hc * S))
                d.rectangle([x0, y0, x0 + rng.uniform(0.1, 0.5) * W * S, y0 + rng.uniform(0.1, 0.6) * H * S], fill=col)
        if app is not None:
            pc = Pose(cx=(mx + pose.cx * W) / Wc, feet=(my + pose.feet * H) / Hc, height=pose.height * H / Hc, facing=pose.facing,
                      phase=pose.phase, flip=pose.flip, width=pose.width, stride=pose.stride, legs=pose.legs, arms=pose.arms)
            _shadow(img, pc.cx * Wc * S, pc.feet * Hc * S, pc.height * Hc * S * 0.16)
            win, x, y = _person_window(app, pc, Hc, Wc, st.light_dir)
            img.paste(win, (x, y), win)
        occ = shot.occluder if p.video else self.occluder(cam, rng)
        if occ is not None:
            if occ[0] == "person":  # someone walking past in front, a little nearer
                _, k, dx, f = occ
                self._paste_sprite(img, cam, k, (mx + (0.5 + dx) * W) * S, feet_y + 0.03 * H * S, f)
            else:
                _, shape, ox, oy, ow, oh, col = occ
                x0, y0 = (mx + (0.5 + ox - ow / 2) * W) * S, (my + oy * H) * S
                d = ImageDraw.Draw(img)
                d.rectangle([x0, y0, x0 + ow * W * S, y0 + oh * H * S], fill=col)
                if shape == "low":  # a darker top edge (railing, bench back)
                    d.rectangle([x0, y0, x0 + ow * W * S, y0 + 0.03 * H * S], fill=tuple(int(c * 0.6) for c in col))
        # the detector's box: the track's framing bias plus per-image jitter; sometimes a partial crop
        j = p.box_jitter * (0.3 if p.video else 1.0)
        dx, dy = shot.box[0] + rng.normal(0, _DX * j), shot.box[1] + rng.normal(0, 0.035 * j)
        s, a = math.exp(shot.box[2] + rng.normal(0, 0.06 * j)), math.exp(shot.box[3] + rng.normal(0, 0.09 * j))
        if rng.random() < 0.08 * p.box_jitter:
            kind = rng.integers(3)
            if kind == 0:  # head cut off
                dy += float(rng.uniform(0.08, 0.16))
            elif kind == 1:  # feet / lower legs cut off: a shorter box
                cut = float(rng.uniform(0.12, 0.25))
                s *= 1 - cut
                dy -= cut / 2
            else:  # the box caught the person off-centre
                dx += float(rng.choice([-1, 1]) * rng.uniform(0.18, 0.28))
        bw, bh = min(Wc, _BOX_WIDTH * W * s * a), min(Hc, H * s)
        bx = float(np.clip(Wc / 2 + dx * W - bw / 2, 0, Wc - bw))
        by = float(np.clip(Hc / 2 + dy * H - bh / 2, 0, Hc - bh))
        out = img.resize((W, H), Image.LANCZOS, box=(bx * S, by * S, (bx + bw) * S, (by + bh) * S))
        lowres = shot.lowres
        if not p.video and rng.random() < 0.15 * p.degradation:
            lowres *= float(rng.uniform(0.45, 0.8))
        motion = 0
        if rng.random() < 0.15 * p.degradation:
            motion = int(rng.integers(2, 5)) * max(1, W // 64)
        light = (shot.light[0] * float(rng.uniform(0.96, 1.04)), shot.light[1])
        return _apply_camera(out, st, rng, light, extra_blur, lowres, motion)

    # ---------------------------------------------------------------- items
    def track(self, t: Track) -> list[Image.Image]:
        rng = _rng(self.p.seed, _IMAGE, t.pid, t.cam, t.index)
        shot = self.shot(t.cam, rng)
        poses = _track_poses(self.styles[t.cam], rng, t.n, self.p.video, self.p.pose_variation)
        return [self.image(self.appearance(t.pid), pose, t.cam, rng, shot) for pose in poses]

    def distractor(self, i: int, n: int = 1) -> tuple[int, list[Image.Image]]:
        """pid 0: an empty scene with clutter, or a stranger cut by the box (partial person)."""
        p, rng = self.p, _rng(self.p.seed, _DISTRACTOR, i)
        cam = int(rng.integers(p.num_cameras))
        kind = rng.choice(["background", "partial", "offside"])
        shot = self.shot(cam, rng)
        if kind == "background":
            out = []
            for _ in range(n):
                img = self.image(None, None, cam, rng, shot)
                d = ImageDraw.Draw(img)
                for _ in range(int(rng.integers(0, 3))):
                    x0, y0 = rng.integers(0, img.width), rng.integers(0, img.height)
                    d.rectangle([x0, y0, x0 + rng.integers(8, 60), y0 + rng.integers(8, 80)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
                out.append(img)
            return cam, out
        app = random_appearance(rng)  # a stranger: not one of the identities
        base = _track_poses(self.styles[cam], rng, n, p.video, p.pose_variation)
        if kind == "partial":  # zoomed in: only the upper or the lower body is in the box
            big, up = rng.uniform(1.6, 2.4), rng.random() < 0.5
            poses = [replace(q, feet=(1.0 + big * 0.45) if up else 0.98, height=big * q.height) for q in base]
        else:  # the box caught only one side of a person
            dx = rng.choice([-1, 1]) * rng.uniform(0.45, 0.6)
            poses = [replace(q, cx=q.cx + dx) for q in base]
        return cam, [self.image(app, q, cam, rng, shot) for q in poses]

    def junk(self, i: int, n: int = 1) -> tuple[int, list[Image.Image]]:
        """pid -1: a tiny, heavily blurred fragment of some test identity (useless for matching)."""
        p, rng = self.p, _rng(self.p.seed, _JUNK, i)
        cam = int(rng.integers(p.num_cameras))
        pid = int(rng.integers(p.num_train_ids + 1, p.num_train_ids + p.num_test_ids + 1))
        shot = self.shot(cam, rng)
        out = []
        for q in _track_poses(self.styles[cam], rng, n, p.video, p.pose_variation):
            img = self.image(self.appearance(pid), q, cam, rng, shot, extra_blur=float(rng.uniform(1.5, 3.0)))
            fw, fh = int(p.width * rng.uniform(0.3, 0.5)), int(p.height * rng.uniform(0.25, 0.45))
            x0, y0 = int(rng.integers(0, p.width - fw + 1)), int(rng.integers(0, p.height - fh + 1))
            out.append(img.crop((x0, y0, x0 + fw, y0 + fh)).resize((p.width, p.height), Image.BILINEAR))
        return cam, out


# ============================================================================ writers
def _save(img: Image.Image, path: Path, quality: int) -> None:
    # fixed quality and no metadata: same pixels -> same bytes
    img.save(path, format="JPEG", quality=quality)


def _write_market(out: Path, p: Params, r: _Renderer) -> dict:
    """Market-1501 layout: ``{pid:04d}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg``."""
    for d in ("bounding_box_train", "bounding_box_test", "query"):
        (out / d).mkdir(parents=True)
    frame_counter = [1000 * (c + 1) for c in range(p.num_cameras)]  # unique frame numbers per camera
    counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0}

    def name(pid: int, cam: int, box: int = 1) -> str:
        frame_counter[cam] += int(1 + (frame_counter[cam] * 7919 + pid) % 5)  # irregular, increasing
        return f"{pid:04d}_c{cam + 1}s{cam % 6 + 1}_{frame_counter[cam]:06d}_{box:02d}.jpg" if pid >= 0 else f"-1_c{cam + 1}s{cam % 6 + 1}_{frame_counter[cam]:06d}_{box:02d}.jpg"

    for t in _plan(p):
        imgs = r.track(t)
        qi = int(_rng(p.seed, _PLAN, t.pid, t.cam).integers(t.n)) if t.query else -1  # which detection is the query
        for i, img in enumerate(imgs):
            if t.split == "train":
                folder, key = "bounding_box_train", "train"
            else:
                folder, key = ("query", "query") if i == qi else ("bounding_box_test", "gallery")
            _save(img, out / folder / name(t.pid, t.cam), p.jpeg_quality)
            counts[key] += 1
    for i in range(p.num_distractors):
        cam, (img,) = r.distractor(i)
        _save(img, out / "bounding_box_test" / name(0, cam, 2), p.jpeg_quality)
        counts["distractors"] += 1
    for i in range(p.num_junk):
        cam, (img,) = r.junk(i)
        _save(img, out / "bounding_box_test" / name(-1, cam, 3), p.jpeg_quality)
        counts["junk"] += 1
    counts["gallery"] += counts["distractors"] + counts["junk"]
    return counts


def _write_mars(out: Path, p: Params, r: _Renderer) -> dict:
    """MARS layout: ``bbox_{train,test}/{pid}/{pid}C{cam}T{track:04d}F{frame:03d}.jpg`` + info tables."""
    from scipy.io import savemat

    def pidstr(pid: int) -> str:
        return "00-1" if pid == -1 else f"{pid:04d}"

    # (home, pid, cam, tracklet number, frames, is_query)
    items: list[tuple[str, int, int, int, list[Image.Image], bool]] = []
    tcount: dict[tuple[int, int], int] = {}

    def add(home: str, pid: int, cam: int, frames: list[Image.Image], query: bool = False) -> None:
        tcount[pid, cam] = tcount.get((pid, cam), 0) + 1
        items.append((home, pid, cam, tcount[pid, cam], frames, query))

    for t in _plan(p):
        add("bbox_train" if t.split == "train" else "bbox_test", t.pid, t.cam, r.track(t), t.query)
    frames_of = lambda rng: _long_tail(rng, p.min_frames, p.max_frames, p.mean_frames)  # noqa: E731
    for i in range(p.num_distractors):
        cam, frames = r.distractor(i, frames_of(_rng(p.seed, _DISTRACTOR, i, 1)))
        add("bbox_test", 0, cam, frames)
    for i in range(p.num_junk):
        cam, frames = r.junk(i, frames_of(_rng(p.seed, _JUNK, i, 1)))
        add("bbox_test", -1, cam, frames)

    info = out / "info"
    info.mkdir(parents=True)
    counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0, "frames": 0}
    for home in ("bbox_train", "bbox_test"):
        (out / home).mkdir()
        # The name list is sorted like the official one, and each tracklet is a contiguous range of it.
        entries = sorted(
            (f"{pidstr(pid)}C{cam + 1}T{tn:04d}F{f + 1:03d}.jpg", pid, cam, tn, f, q, frames[f])
            for (h, pid, cam, tn, frames, q) in items if h == home for f in range(len(frames))
        )
        names, rows, qrows = [], [], []
        for j, (nm, pid, cam, tn, f, q, img) in enumerate(entries):
            folder = out / home / pidstr(pid)
            folder.mkdir(exist_ok=True)
            _save(img, folder / nm, p.jpeg_quality)
            names.append(nm)
            if f == 0:
                rows.append([j + 1, j + 1, pid, cam + 1])
                if q:
                    qrows.append(len(rows))
            else:
                rows[-1][1] = j + 1
        split = "train" if home == "bbox_train" else "test"
        (info / f"{split}_name.txt").write_text("".join(n + "\n" for n in names))
        savemat(str(info / f"tracks_{split}_info.mat"), {f"track_{split}_info": np.array(rows, dtype=np.float64).reshape(-1, 4)})
        if split == "test":
            savemat(str(info / "query_IDX.mat"), {"query_IDX": np.array(qrows, dtype=np.float64).reshape(1, -1)})
        counts["frames"] += len(names)
        for row in rows:
            if split == "train":
                counts["train"] += 1
            elif row[2] == 0:
                counts["distractors"] += 1
            elif row[2] == -1:
                counts["junk"] += 1
        if split == "test":
            counts["query"] = len(qrows)
            counts["gallery"] = len(rows) - len(qrows)
    return counts


# ============================================================================ public API
def _same(manifest: dict | None, wanted: dict) -> bool:
    """A manifest from before a parameter existed matches when the parameter has its default value."""
    if manifest is None:
        return False
    have = dict(manifest, params={**asdict(Params()), **manifest.get("params", {})})
    return {k: have.get(k) for k in wanted} == wanted


def _same_params(manifest: dict, wanted: dict) -> bool:
    """The parameters agree, those missing from an older manifest taken at their default."""
    have = {**asdict(Params()), **manifest.get("params", {})}
    return {k: have.get(k) for k in wanted["params"]} == wanted["params"]


def read_manifest(out_dir) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# Parameters whose default depends on the mode (images or tracklets): None picks it.
_MODE_DEFAULTS = {"num_distractors": (250, 30), "num_junk": (100, 12), "min_images": (4, 2), "max_images": (20, 6),
                  "mean_images": (8.0, 3.5)}


def make_params(**kw) -> Params:
    """The checked :class:`Params` of ``generate``'s keyword arguments (a None takes the mode's default).

    Raises ValueError naming an unknown parameter (with the known ones) or a value of the wrong type or range,
    so that a config's ``data.synthetic`` block is refused when it is read, before any run starts."""
    names = [f.name for f in fields(Params)]
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ValueError(f"unknown synthetic parameter(s) {unknown}; known: {', '.join(names)}")
    video = kw.get("video", False)
    if not isinstance(video, bool):
        raise ValueError(f"video must be true or false, got {video!r}")
    values = {}
    for f in fields(Params):
        v = kw.get(f.name)
        if v is None:
            v = _MODE_DEFAULTS[f.name][video] if f.name in _MODE_DEFAULTS else f.default
        kind = {"int": int, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
        if kind is bool:
            ok, wanted = isinstance(v, bool), "true or false"
        else:  # YAML's true is no count
            number = numbers.Integral if kind is int else numbers.Real
            ok, wanted = isinstance(v, number) and not isinstance(v, bool), "an integer" if kind is int else "a number"
        if not ok:
            raise ValueError(f"{f.name} must be {wanted}, got {v!r}")
        values[f.name] = kind(v)
    p = Params(**values)
    p.check()
    return p


class NotSynthetic(FileExistsError):
    """A folder that is not empty holds no synthetic dataset (no manifest): the generator will not write into it."""

    def __init__(self, out: Path):
        self.out = out
        super().__init__(f"{out} is not empty and holds no {MANIFEST}: refusing to write a synthetic dataset into it")


class OtherParameters(FileExistsError):
    """A folder holds a synthetic dataset generated with other parameters; ``diff``: name -> (old, new)."""

    def __init__(self, out: Path, diff: dict):
        self.out, self.diff = out, diff
        super().__init__(f"{out} holds a synthetic dataset with other parameters {diff or '(generator version)'} "
                         f"(old, new); pass overwrite=True to replace it")


def generate(
    out_dir,
    *,
    seed: int = 0,
    num_train_ids: int = 80,
    num_test_ids: int = 80,
    num_cameras: int = 6,
    num_distractors: int | None = None,
    num_junk: int | None = None,
    height: int = 128,
    width: int = 64,
    video: bool = False,
    min_images: int | None = None,
    max_images: int | None = None,
    mean_images: float | None = None,
    queries_per_id: int = 2,
    min_frames: int = 4,
    max_frames: int = 24,
    mean_frames: float = 8.0,
    jpeg_quality: int = 90,
    camera_strength: float = 1.0,
    max_tracks_per_camera: int = 3,
    box_jitter: float = 1.0,
    pose_variation: float = 1.0,
    occlusion: float = 0.2,
    clutter: float = 1.0,
    degradation: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic re-ID dataset to ``out_dir`` (Market-1501 layout, or MARS with ``video``).

    In image mode ``min/max/mean_images`` bound the images per identity (defaults 4/20/8) and
    ``num_distractors``/``num_junk`` count images (defaults 250/100). In video mode they count
    tracklets: per identity (defaults 2/6/3.5, each ``min/max/mean_frames`` frames) and
    distractor/junk tracklets (defaults 30/12).

    ``max_tracks_per_camera``, ``box_jitter``, ``pose_variation``, ``occlusion``, ``clutter`` and
    ``degradation`` set the nuisances of real detections (several walks per camera, detector-box
    jitter and partial crops, posture change, occluders, passers-by, motion blur and resolution
    loss); 0 turns each off. The defaults are calibrated (``experiments/calibrate_synthetic.py``).

    A folder whose ``manifest.json`` records the same parameters is returned as is (the data is
    generated on first use); a different one raises unless ``overwrite=True``. A folder written by
    another version of this generator with the same parameters is regenerated: its images are stale. The dataset is
    built in a sibling temporary folder and moved into place at the end, so an interrupted run
    never leaves a half-written dataset behind.
    """
    p = make_params(seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_cameras=num_cameras,
                    num_distractors=num_distractors, num_junk=num_junk, height=height, width=width, video=video,
                    min_images=min_images, max_images=max_images, mean_images=mean_images,
                    queries_per_id=queries_per_id, min_frames=min_frames, max_frames=max_frames,
                    mean_frames=mean_frames, jpeg_quality=jpeg_quality, camera_strength=camera_strength,
                    max_tracks_per_camera=max_tracks_per_camera, box_jitter=box_jitter,
                    pose_variation=pose_variation, occlusion=occlusion, clutter=clutter, degradation=degradation)
    out = Path(out_dir).expanduser()
    wanted = {"generator": "ureid.data.synthetic", "version": GENERATOR_VERSION, "params": asdict(p)}
    existing = read_manifest(out)
    if _same(existing, wanted):
        return out
    if out.exists() and any(out.iterdir()):
        if existing is None:
            raise NotSynthetic(out)
        stale = existing.get("generator") == wanted["generator"] and existing.get("version") != GENERATOR_VERSION and _same_params(existing, wanted)
        if stale:
            log.warning("%s was written by synthetic generator version %s; regenerating it with version %s", out, existing.get("version"), GENERATOR_VERSION)
        if not overwrite and not stale:
            have = {**asdict(Params()), **existing.get("params", {})}
            diff = {k: (have.get(k), v) for k, v in wanted["params"].items() if have.get(k) != v}
            raise OtherParameters(out, diff)
        foreign = sorted(x.name for x in out.iterdir() if x.name not in _OWNED)
        if foreign:
            why = f" (it was written by generator version {existing.get('version')}, this is version {GENERATOR_VERSION}: remove them or the folder)" if stale else ""
            raise FileExistsError(f"{out} holds files the generator did not write ({foreign[:5]}): refusing to overwrite it{why}")

    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        r = _Renderer(p)
        counts = (_write_mars if video else _write_market)(tmp, p, r)
        manifest = dict(wanted, layout="mars" if video else "market1501", counts=counts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        done = read_manifest(out)
        if _same(done, wanted):
            shutil.rmtree(tmp)  # a concurrent call (e.g. another worker) finished the same dataset first
            return out
        if out.exists():
            for name in _OWNED:  # only what a previous generate() wrote; anything else makes rmdir fail loudly
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote synthetic %s to %s in %.1f s: %s", "MARS" if video else "Market-1501", out, time.perf_counter() - t0, counts)
    return out
