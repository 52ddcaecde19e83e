"""Writing renders as files: PNGs whose bytes depend only on the pixels, and sd-scripts' DreamBooth folders.

PNGs are written here with stored (uncompressed) deflate blocks, so the bytes are the same with any Pillow, zlib
or platform; every PNG reader reads them.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np

from .concepts import IDENTIFIER, get_concept, training_scenes
from .render import render
from .world import GENERIC_NOUN, random_scene


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (H x W x 3 uint8) with filter 0 and stored deflate blocks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    stream = bytearray(b"\x78\x01")
    for start in range(0, len(raw), 65535):
        block = raw[start:start + 65535]
        stream += bytes([start + 65535 >= len(raw)]) + struct.pack("<HH", len(block), 0xFFFF ^ len(block)) + block
    stream += struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(stream)) + chunk(b"IEND", b""))


def concept_files(name: str, images: int = 5, class_images: int = 5, repeats: int = 5,
                  seed: int = 0, identifier: str = IDENTIFIER) -> dict[str, bytes]:
    """{relative path: bytes}: the concept's training photos under ``train/{repeats}_sks toy/`` captioned
    "a photo of sks toy" (another `identifier` in place of sks), and class images of the world under
    ``reg/1_toy/`` captioned "a photo of a toy"."""
    concept = get_concept(name)
    subject = f"train/{repeats}_{identifier} {concept.class_noun}"
    files = {}
    for n, scene in enumerate(training_scenes(name, images, seed), 1):
        files[f"{subject}/img_{n}.png"] = png_bytes(render(scene))
        files[f"{subject}/img_{n}.txt"] = f"a photo of {identifier} {concept.class_noun}\n".encode()
    rng = random.Random(f"class-images/{seed}")
    for n in range(1, class_images + 1):
        files[f"reg/1_{GENERIC_NOUN}/img_{n}.png"] = png_bytes(render(random_scene(rng)))
        files[f"reg/1_{GENERIC_NOUN}/img_{n}.txt"] = f"a photo of a {GENERIC_NOUN}\n".encode()
    return files


def write_files(files: dict[str, bytes], directory) -> list[str]:
    """Write ``files`` under ``directory`` (each under a temporary name, then renamed); return the paths."""
    written = []
    for relative, data in files.items():
        path = Path(directory, *relative.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written.append(str(path))
    return written


def write_concept_dataset(name: str, directory, images: int = 5, class_images: int = 5, seed: int = 0) -> list[str]:
    return write_files(concept_files(name, images, class_images, seed=seed), directory)
