"""Example training images for the quickstart, drawn by code: a subject "sks toy" and generic toys.

    write_example_dataset(directory)   writes sd-scripts' DreamBooth layout:
        directory/train/5_sks toy/img_N.png + img_N.txt     the subject (a red-and-yellow striped ball with a face)
        directory/reg/1_toy/img_N.png + img_N.txt           regularization images: other toys
        directory/one_image/1_photo/toy.png + toy.txt       one image and its caption, for single-image editing

Captions are .txt files, so train with --caption_extension .txt (sd-scripts' default is .caption).
The same files are kept in para_trainer/example_data/ (python -m para_trainer.example_images rewrites them).
Pixels are computed with integer arithmetic and the PNG is written here with uncompressed deflate blocks, so the
bytes are the same with any Pillow, zlib or platform; Pillow reads them as ordinary palette PNGs.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib

SIZE = 64
Color = tuple[int, int, int]

PACKAGE_COPY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example_data")
SUBJECT_FOLDER = "train/5_sks toy"
CLASS_FOLDER = "reg/1_toy"
CLASS_CAPTION = "a photo of a toy"
ONE_IMAGE_FOLDER = "one_image/1_photo"
ONE_IMAGE_CAPTION = "a photo of a striped ball toy on a wooden table"


class Canvas:
    """A SIZE x SIZE picture; shapes are tested at doubled pixel-centre coordinates (2x+1) so all maths is exact."""

    def __init__(self, color: Color):
        self.pixels = [[color] * SIZE for _ in range(SIZE)]

    def paint(self, inside, color) -> None:
        """Colour every pixel whose doubled centre (X, Y) satisfies inside(X, Y); color may be a function too."""
        for y in range(SIZE):
            for x in range(SIZE):
                X, Y = 2 * x + 1, 2 * y + 1
                if inside(X, Y):
                    self.pixels[y][x] = color(X, Y) if callable(color) else color

    def rect(self, x0, y0, x1, y1, color) -> None:
        self.paint(lambda X, Y: 2 * x0 <= X < 2 * x1 and 2 * y0 <= Y < 2 * y1, color)

    def circle(self, cx, cy, r, color) -> None:
        self.paint(lambda X, Y: (X - 2 * cx) ** 2 + (Y - 2 * cy) ** 2 <= 4 * r * r, color)

    def ellipse(self, cx, cy, rx, ry, color) -> None:
        self.paint(lambda X, Y: (X - 2 * cx) ** 2 * ry * ry + (Y - 2 * cy) ** 2 * rx * rx <= 4 * rx * rx * ry * ry,
                   color)

    def triangle(self, a, b, c, color) -> None:
        def side(p, q, X, Y):
            return (2 * q[0] - 2 * p[0]) * (Y - 2 * p[1]) - (2 * q[1] - 2 * p[1]) * (X - 2 * p[0])

        def inside(X, Y):
            s = (side(a, b, X, Y), side(b, c, X, Y), side(c, a, X, Y))
            return min(s) >= 0 or max(s) <= 0

        self.paint(inside, color)

    def png(self) -> bytes:
        palette = sorted({color for row in self.pixels for color in row})
        index = {color: i for i, color in enumerate(palette)}
        rows = [bytes(index[color] for color in row) for row in self.pixels]
        return palette_png(rows, palette)


def palette_png(rows: list[bytes], palette: list[Color]) -> bytes:
    """An 8-bit palette PNG with stored (uncompressed) deflate blocks: its bytes depend only on the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 on every row
    stream = bytearray(b"\x78\x01")
    for start in range(0, len(raw), 65535):
        block = raw[start:start + 65535]
        stream += bytes([start + 65535 >= len(raw)]) + struct.pack("<HH", len(block), 0xFFFF ^ len(block)) + block
    stream += struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", bytes(c for rgb in palette for c in rgb))
            + chunk(b"IDAT", bytes(stream)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------
# Backgrounds

SKY, GRASS, DARK_GRASS = (150, 200, 240), (70, 160, 60), (50, 130, 45)


def plain(color: Color) -> Canvas:
    return Canvas(color)


def grass() -> Canvas:
    canvas = Canvas(SKY)
    canvas.rect(0, 40, SIZE, SIZE, lambda X, Y: DARK_GRASS if (X // 2 + Y // 6) % 5 == 0 else GRASS)
    return canvas


def table() -> Canvas:
    canvas = Canvas((235, 225, 200))
    canvas.rect(0, 44, SIZE, SIZE, lambda X, Y: (120, 80, 45) if (Y // 2 + X // 24) % 4 == 0 else (150, 100, 60))
    return canvas


def polka(color: Color, dot: Color) -> Canvas:
    canvas = Canvas(color)
    canvas.paint(lambda X, Y: ((X // 2) % 12 - 6) ** 2 + ((Y // 2) % 12 - 6) ** 2 <= 4, dot)
    return canvas


def beach() -> Canvas:
    canvas = Canvas(SKY)
    canvas.rect(0, 30, SIZE, 42, (40, 110, 190))
    canvas.rect(0, 42, SIZE, SIZE, (230, 205, 140))
    canvas.circle(52, 10, 5, (250, 230, 90))
    return canvas


# --------------------------------------------------------------------------------------------------
# The subject: a red-and-yellow striped ball with a face


def striped_ball(canvas: Canvas, cx: int, cy: int, r: int, tilt: int, look: int) -> None:
    """tilt: stripe slant (integer slope numerator); look: face offset to the right in pixels."""
    def stripes(X, Y):
        band = ((Y - 2 * cy) * 4 + (X - 2 * cx) * tilt) // (2 * 4 * max(2, r // 3))
        return (220, 40, 40) if band % 2 == 0 else (250, 210, 40)

    canvas.ellipse(cx, cy + r, r - 2, max(2, r // 5), (60, 60, 60))  # shadow under the ball
    canvas.circle(cx, cy, r, stripes)
    eye_y, eye_dx = cy - r // 4, max(2, r // 3)
    for ex in (cx + look - eye_dx, cx + look + eye_dx):
        canvas.circle(ex, eye_y, max(1, r // 7), (20, 20, 20))
    mx, my, outer, inner = cx + look, cy + r // 8, max(3, r // 2), max(2, r // 2 - 2)
    canvas.paint(lambda X, Y: Y > 2 * my and 4 * inner * inner <= (X - 2 * mx) ** 2 + (Y - 2 * my) ** 2
                 <= 4 * outer * outer, (20, 20, 20))


SUBJECT = [  # (background, ball centre x, y, radius, stripe tilt, face offset, caption detail)
    (lambda: plain((60, 110, 200)), 32, 32, 18, 0, 0, "on a blue background"),
    (grass, 24, 30, 14, 2, 3, "on green grass"),
    (table, 38, 30, 15, -2, -3, "on a wooden table"),
    (lambda: polka((240, 170, 200), (255, 240, 245)), 32, 34, 20, 1, 2, "on a pink polka-dot background"),
    (beach, 28, 38, 12, -1, -2, "at the beach"),
]


# --------------------------------------------------------------------------------------------------
# Class images: other toys


def toy_cube() -> Canvas:
    canvas = plain((190, 190, 195))
    canvas.rect(18, 26, 42, 50, (40, 80, 200))
    canvas.triangle((18, 26), (26, 18), (50, 18), (90, 130, 230))
    canvas.triangle((18, 26), (50, 18), (42, 26), (90, 130, 230))
    canvas.triangle((42, 26), (50, 18), (50, 42), (25, 55, 150))
    canvas.triangle((42, 26), (50, 42), (42, 50), (25, 55, 150))
    return canvas


def toy_cone() -> Canvas:
    canvas = plain((250, 240, 180))
    canvas.ellipse(32, 50, 16, 4, (40, 120, 40))
    canvas.triangle((32, 10), (16, 50), (48, 50), lambda X, Y: (60, 170, 60) if X < 64 else (40, 130, 40))
    return canvas


def toy_teddy() -> Canvas:
    canvas = plain((170, 210, 235))
    brown, light = (140, 90, 50), (200, 150, 100)
    canvas.ellipse(32, 46, 14, 13, brown)
    canvas.circle(20, 12, 6, brown)
    canvas.circle(44, 12, 6, brown)
    canvas.circle(32, 24, 13, brown)
    canvas.ellipse(32, 29, 6, 4, light)
    canvas.circle(32, 27, 2, (30, 20, 10))
    canvas.circle(27, 20, 2, (30, 20, 10))
    canvas.circle(37, 20, 2, (30, 20, 10))
    return canvas


def toy_car() -> Canvas:
    canvas = plain((200, 215, 190))
    canvas.rect(0, 46, SIZE, SIZE, (120, 120, 120))
    canvas.rect(8, 30, 56, 44, (240, 130, 30))
    canvas.rect(18, 20, 44, 31, (240, 130, 30))
    canvas.rect(21, 23, 30, 30, (180, 220, 250))
    canvas.rect(33, 23, 41, 30, (180, 220, 250))
    for x in (18, 46):
        canvas.circle(x, 44, 6, (30, 30, 30))
        canvas.circle(x, 44, 2, (200, 200, 200))
    return canvas


def toy_duck() -> Canvas:
    canvas = plain((120, 210, 210))
    canvas.rect(0, 44, SIZE, SIZE, (70, 160, 200))
    canvas.ellipse(30, 42, 18, 10, (250, 220, 40))
    canvas.circle(40, 24, 9, (250, 220, 40))
    canvas.triangle((47, 22), (47, 28), (56, 25), (240, 130, 30))
    canvas.circle(42, 21, 2, (20, 20, 20))
    return canvas


CLASS_TOYS = [toy_cube, toy_cone, toy_teddy, toy_car, toy_duck]


# --------------------------------------------------------------------------------------------------
# Files


def example_files() -> dict[str, bytes]:
    """{relative path: bytes} of the whole example dataset."""
    files = {}
    for n, (background, cx, cy, r, tilt, look, detail) in enumerate(SUBJECT, 1):
        canvas = background()
        striped_ball(canvas, cx, cy, r, tilt, look)
        files[f"{SUBJECT_FOLDER}/img_{n}.png"] = canvas.png()
        files[f"{SUBJECT_FOLDER}/img_{n}.txt"] = f"a photo of sks toy, {detail}\n".encode()
    for n, draw in enumerate(CLASS_TOYS, 1):
        files[f"{CLASS_FOLDER}/img_{n}.png"] = draw().png()
        files[f"{CLASS_FOLDER}/img_{n}.txt"] = f"{CLASS_CAPTION}\n".encode()
    canvas = table()
    striped_ball(canvas, 30, 30, 16, 1, 2)
    files[f"{ONE_IMAGE_FOLDER}/toy.png"] = canvas.png()
    files[f"{ONE_IMAGE_FOLDER}/toy.txt"] = f"{ONE_IMAGE_CAPTION}\n".encode()
    return files


def write_example_dataset(directory: str) -> list[str]:
    """Write the example dataset under `directory` (train/, reg/, one_image/); returns the paths written."""
    written = []
    for relative, data in example_files().items():
        path = os.path.join(directory, *relative.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
    return written


if __name__ == "__main__":  # regenerate the copy shipped in the package
    target = sys.argv[1] if len(sys.argv) > 1 else PACKAGE_COPY
    print("\n".join(write_example_dataset(target)))
