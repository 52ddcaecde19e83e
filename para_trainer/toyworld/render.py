"""Pixels of a toy-world scene, computed with integer arithmetic only: the same scene gives the same bytes on every
machine, with any NumPy (no floating-point function whose last bit could differ between libraries or CPUs).

Geometry works on a 4x supersampled grid in units of 1/8 pixel (``UNIT``): subpixel centres sit at odd
coordinates 1, 3, ..., 511, shapes are integer inequalities over them, and each pixel is the rounded mean of its
16 subpixels. Random texture comes from NumPy's PCG64 integer stream, which is fixed across platforms.
"""

from __future__ import annotations

import numpy as np

from .world import COLOURS, Scene

SIZE = 64  # pixels
SUPER = 4  # subpixels per pixel and axis
UNIT = 2 * SUPER  # geometry units per pixel
GRID = SIZE * SUPER
_COORD = np.arange(GRID, dtype=np.int64) * 2 + 1
X = _COORD[None, :]  # subpixel centres, geometry units
Y = _COORD[:, None]

# Object radius (pixels) per size, and the centre (pixels) per position and size.
RADIUS = {"small": 9, "large": 14}
_CORNER = {"small": (17, 47), "large": (20, 44)}
JITTER = 2  # pixels, each axis
DARK_OUTLINE = 45  # outline colour: the surface colour x this / 100


def centre(position: str, size: str) -> tuple[int, int]:
    lo, hi = _CORNER[size]
    x = {"left": lo, "right": hi}.get(position.split()[-1], SIZE // 2)
    y = {"top": lo, "bottom": hi}.get(position.split()[0], SIZE // 2)
    return x, y


# --------------------------------------------------------------------------------------------------
# Canvas


class Canvas:
    """A supersampled RGB picture (int32, GRID x GRID x 3) that shapes are painted on."""

    def __init__(self, background: np.ndarray):
        self.rgb = np.repeat(np.repeat(background.astype(np.int32), SUPER, axis=0), SUPER, axis=1)

    def paint(self, mask: np.ndarray, colour) -> None:
        """Colour the subpixels of ``mask``; ``colour`` is an (r, g, b) or a GRID x GRID x 3 array."""
        colour = np.asarray(colour, dtype=np.int32)
        if colour.ndim == 1:
            self.rgb[mask] = colour
        else:
            self.rgb[mask] = colour[mask]

    def darken(self, mask: np.ndarray, percent: int) -> None:
        self.rgb[mask] = self.rgb[mask] * percent // 100

    def pixels(self) -> np.ndarray:
        """The SIZE x SIZE x 3 uint8 image: each pixel the rounded mean of its subpixels."""
        blocks = self.rgb.reshape(SIZE, SUPER, SIZE, SUPER, 3).sum(axis=(1, 3))
        return ((blocks + SUPER * SUPER // 2) // (SUPER * SUPER)).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Shapes: boolean masks over the grid for a centre (cx, cy) and radius r, all in geometry units


def disc(cx, cy, r) -> np.ndarray:
    return (X - cx) ** 2 + (Y - cy) ** 2 <= r * r


def ellipse(cx, cy, rx, ry) -> np.ndarray:
    return (X - cx) ** 2 * (ry * ry) + (Y - cy) ** 2 * (rx * rx) <= rx * rx * ry * ry


def rect(x0, y0, x1, y1) -> np.ndarray:
    return (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)


def polygon(points) -> np.ndarray:
    """Even-odd fill of a polygon with integer vertices (the crossing test, without division)."""
    inside = np.zeros((GRID, GRID), dtype=bool)
    n = len(points)
    for i in range(n):
        (x1, y1), (x2, y2) = points[i], points[(i + 1) % n]
        if y1 == y2:
            continue
        spans = (y1 > Y) != (y2 > Y)  # (GRID, 1)
        left = (X - x1) * (y2 - y1)
        right = (Y - y1) * (x2 - x1)
        crossing = (left < right) if y2 > y1 else (left > right)
        inside ^= spans & crossing
    return inside


# cos and sin of -90 + 36k degrees, x 10000 (a five-pointed star's outer and inner vertices)
_STAR_DIRECTIONS = ((0, -10000), (5878, -8090), (9511, -3090), (9511, 3090), (5878, 8090), (0, 10000),
                    (-5878, 8090), (-9511, 3090), (-9511, -3090), (-5878, -8090))


def star_points(cx, cy, r, inner_percent: int = 46):
    points = []
    for k, (c, s) in enumerate(_STAR_DIRECTIONS):
        radius = r if k % 2 == 0 else r * inner_percent // 100
        points.append((cx + radius * c // 10000, cy + radius * s // 10000))
    return points


def heart(cx, cy, r) -> np.ndarray:
    """(x² + y² − s²)³ ≤ x²·y³·s with y pointing up: the classic heart curve, about 2.3 s wide."""
    s = r * 100 // 116
    x = X - cx
    y = cy + s // 8 - Y
    return (x * x + y * y - s * s) ** 3 <= x * x * y ** 3 * s


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Subpixels of ``mask`` whose neighbours ``steps`` subpixels away in the four directions are in it too."""
    out = mask.copy()
    out[steps:, :] &= mask[:-steps, :]
    out[:-steps, :] &= mask[steps:, :]
    out[:, steps:] &= mask[:, :-steps]
    out[:, :-steps] &= mask[:, steps:]
    return out


# --------------------------------------------------------------------------------------------------
# Colour helpers


def tint(colour, percent: int):
    """Mix with white: percent 0 keeps the colour, 100 is white."""
    return tuple(c + (255 - c) * percent // 100 for c in colour)


def shade(colour, percent: int):
    return tuple(min(255, c * percent // 100) for c in colour)


def pattern_colour(colour) -> tuple[int, int, int]:
    """Stripes and dots: a darker shade on light surfaces, a pale tint on the others."""
    light = sum(colour) > 480 or (colour[0] > 200 and colour[1] > 120)
    return shade(colour, 55) if light else tint(colour, 62)


def lit(colour, cy, r) -> np.ndarray:
    """A surface colour lit from above: 110% at the top of the object to 85% at its bottom (GRID x GRID x 3)."""
    percent = (1100 - 250 * np.clip(Y - (cy - r), 0, 2 * r) // (2 * r)).astype(np.int32)  # per mille, (GRID, 1)
    base = np.asarray(colour, dtype=np.int32)[None, None, :]
    return np.broadcast_to((base * percent[:, :, None] // 1000).clip(0, 255), (GRID, GRID, 3))


def patterned(colour, pattern: str, cx, cy, r) -> np.ndarray:
    """The object's surface colour at every subpixel: its colour with stripes or dots, lit from above."""
    surface = np.array(lit(colour, cy, r))
    if pattern == "striped":
        band = (np.clip(Y - (cy - r), 0, 2 * r) * 5 // (2 * r)) % 2 == 1
        mark = np.broadcast_to(band, (GRID, GRID))
    elif pattern == "dotted":
        period = 2 * r // 3
        u = (X - cx + period // 2) % period - period // 2
        v = (Y - cy + period // 2) % period - period // 2
        dot = period * 3 // 10
        mark = u * u + v * v <= dot * dot
    else:
        return surface
    surface[mark] = lit(pattern_colour(colour), cy, r)[mark]
    return surface


def paint_object(canvas: Canvas, mask: np.ndarray, surface: np.ndarray, colour, outline: bool = True) -> None:
    """Surface inside ``mask``, a one-pixel dark outline along its edge."""
    canvas.paint(mask, surface)
    if outline:
        canvas.paint(mask & ~erode(mask, SUPER), shade(colour, DARK_OUTLINE))


def ground_shadow(canvas: Canvas, cx, cy, r) -> None:
    canvas.darken(ellipse(cx, cy + r * 92 // 100, r * 85 // 100, r * 22 // 100), 62)


# --------------------------------------------------------------------------------------------------
# The world's shapes


def draw_shape(canvas: Canvas, shape: str, colour_name: str, pattern: str, cx, cy, r) -> None:
    colour = COLOURS[colour_name]
    surface = patterned(colour, pattern, cx, cy, r)
    if shape == "ball":
        mask = disc(cx, cy, r)
        paint_object(canvas, mask, surface, colour)
        canvas.paint(disc(cx - r * 38 // 100, cy - r * 38 // 100, r * 20 // 100), tint(colour, 55))
    elif shape == "box":
        a, o = r * 82 // 100, r * 30 // 100
        front = polygon([(cx - a, cy - a + o), (cx + a - o, cy - a + o), (cx + a - o, cy + a), (cx - a, cy + a)])
        top = polygon([(cx - a, cy - a + o), (cx - a + o, cy - a), (cx + a, cy - a), (cx + a - o, cy - a + o)])
        side = polygon([(cx + a - o, cy - a + o), (cx + a, cy - a), (cx + a, cy + a - o), (cx + a - o, cy + a)])
        whole = front | top | side
        canvas.paint(whole, surface)
        canvas.paint(top, (np.asarray(surface) * 118 // 100).clip(0, 255))
        canvas.paint(side, np.asarray(surface) * 72 // 100)
        paint_edges(canvas, whole, [top, side], colour)
    elif shape == "star":
        mask = polygon(star_points(cx, cy + r // 10, r))
        paint_object(canvas, mask, surface, colour)
    elif shape == "heart":
        paint_object(canvas, heart(cx, cy, r), surface, colour)
    elif shape == "moon":
        mask = disc(cx, cy, r) & ~disc(cx + r * 45 // 100, cy - r * 28 // 100, r * 80 // 100)
        paint_object(canvas, mask, surface, colour)
    elif shape == "pyramid":
        apex, left, right = (cx - r // 8, cy - r), (cx - r, cy + r * 8 // 10), (cx + r, cy + r * 8 // 10)
        ridge = (cx + r // 4, cy + r * 8 // 10)
        whole = polygon([apex, left, right])
        side = polygon([apex, ridge, right])
        canvas.paint(whole, surface)
        canvas.paint(side, np.asarray(surface) * 72 // 100)
        paint_edges(canvas, whole, [side], colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def paint_edges(canvas: Canvas, whole: np.ndarray, parts: list[np.ndarray], colour) -> None:
    """A dark outline around ``whole`` and along the edges between its faces."""
    edge = whole & ~erode(whole, SUPER)
    for part in parts:
        edge |= part & ~erode(part, SUPER // 2)
    canvas.paint(edge, shade(colour, DARK_OUTLINE))


# --------------------------------------------------------------------------------------------------
# Backgrounds (SIZE x SIZE x 3 int32, drawn per pixel)


def _gradient(top, bottom, rows: int) -> np.ndarray:
    t = np.arange(rows, dtype=np.int32)[:, None]
    top, bottom = np.asarray(top, np.int32), np.asarray(bottom, np.int32)
    return top + (bottom - top) * t // max(1, rows - 1)  # (rows, 3)


def _noise(rng: np.random.Generator, low: int, high: int, shape=(SIZE, SIZE, 1)) -> np.ndarray:
    return rng.integers(low, high + 1, size=shape, dtype=np.int32)


def background(name: str, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), dtype=np.int32)
    if name == "grass":
        horizon = 30 + int(rng.integers(0, 7))
        img[:] = _gradient((105, 165, 235), (185, 220, 245), SIZE)[:, None, :]
        ground = np.broadcast_to(np.array([70, 160, 60], np.int32), (SIZE - horizon, SIZE, 3)).copy()
        ground += _noise(rng, -14, 14, (SIZE - horizon, SIZE, 1)) * np.array([1, 2, 1], np.int32)
        blades = rng.integers(0, 100, size=(SIZE - horizon, SIZE)) < 18
        ground[blades] = (35, 115, 35)
        img[horizon:] = ground
    elif name == "beach":
        sea, sand = 22 + int(rng.integers(0, 5)), 34 + int(rng.integers(0, 5))
        img[:] = _gradient((100, 170, 235), (175, 215, 245), SIZE)[:, None, :]
        img[sea:sand] = _gradient((40, 105, 185), (70, 150, 210), sand - sea)[:, None, :]
        waves = (np.arange(sea, sand)[:, None] + np.arange(SIZE)[None, :] // 6 + int(rng.integers(0, 4))) % 4 == 0
        img[sea:sand][waves] += np.array([40, 40, 30], np.int32)
        img[sand:] = np.array([232, 205, 145], np.int32) + _noise(rng, -12, 12, (SIZE - sand, SIZE, 1))
    elif name == "snow":
        horizon = 26 + int(rng.integers(0, 7))
        img[:] = _gradient((185, 200, 225), (220, 228, 240), SIZE)[:, None, :]
        img[horizon:] = np.array([244, 247, 252], np.int32) - _noise(rng, 0, 14, (SIZE - horizon, SIZE, 1)) * \
            np.array([2, 1, 0], np.int32)
        flakes = rng.integers(0, 100, size=(SIZE, SIZE)) < 5
        flakes[horizon:] = False
        img[flakes] = (252, 252, 255)
    elif name == "night":
        horizon = 46 + int(rng.integers(0, 6))
        img[:] = _gradient((8, 12, 40), (30, 40, 95), SIZE)[:, None, :]
        stars = rng.integers(0, 1000, size=(SIZE, SIZE)) < 30
        stars[horizon:] = False
        img[stars] = (235, 230, 190)
        img[horizon:] = np.array([18, 32, 40], np.int32) + _noise(rng, -4, 4, (SIZE - horizon, SIZE, 1))
    elif name == "wooden floor":
        floor = 16 + int(rng.integers(0, 7))
        img[:floor] = np.array([215, 200, 175], np.int32) + _noise(rng, -3, 3, (floor, SIZE, 1))
        plank_height = 6
        tones = np.array([[150, 100, 60], [170, 115, 70], [135, 88, 52], [160, 108, 64]], np.int32)
        for top in range(floor, SIZE, plank_height):
            rows = slice(top, min(SIZE, top + plank_height))
            img[rows] = tones[int(rng.integers(0, len(tones)))]
            img[rows] += _noise(rng, -8, 8, (img[rows].shape[0], SIZE, 1))
            img[top] = (95, 60, 35)  # the seam between planks
            seam = int(rng.integers(4, SIZE - 4))
            img[rows, seam] = (95, 60, 35)
    elif name == "wall":
        img[:] = np.array([208, 202, 190], np.int32) + _noise(rng, -4, 4, (SIZE, SIZE, 1))
        board = 56 + int(rng.integers(0, 4))
        img[board:] = (150, 138, 122)
        img[board] = (120, 108, 95)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img.clip(0, 255)


# --------------------------------------------------------------------------------------------------
# Scenes


def placement(scene: Scene, rng: np.random.Generator) -> tuple[int, int, int]:
    """(cx, cy, r) in geometry units: the position's centre and the size's radius with a little jitter."""
    x, y = centre(scene.position, scene.size)
    cx = x * UNIT + int(rng.integers(-JITTER * UNIT, JITTER * UNIT + 1))
    cy = y * UNIT + int(rng.integers(-JITTER * UNIT, JITTER * UNIT + 1))
    r = RADIUS[scene.size] * UNIT * int(rng.integers(94, 107)) // 100
    return cx, cy, r


def render(scene: Scene) -> np.ndarray:
    """The scene as a SIZE x SIZE x 3 uint8 array; the same scene always gives the same bytes."""
    from .concepts import CONCEPTS

    rng = np.random.Generator(np.random.PCG64(scene.variant))
    canvas = Canvas(background(scene.background, rng))
    cx, cy, r = placement(scene, rng)
    ground_shadow(canvas, cx, cy, r)
    if scene.obj in CONCEPTS:
        CONCEPTS[scene.obj].draw(canvas, scene.colour, cx, cy, r, rng)
    else:
        draw_shape(canvas, scene.obj, scene.colour, scene.pattern, cx, cy, r)
    return canvas.pixels()
