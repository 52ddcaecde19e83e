"""The bundled example images: renders of one held-out concept of the toy world (para_trainer/toyworld/).

    write_example_dataset(directory)   writes sd-scripts' DreamBooth layout:
        directory/train/5_sks toy/img_N.png + img_N.txt     the subject: EXAMPLE_CONCEPT in its training photos
        directory/reg/1_toy/img_N.png + img_N.txt           regularization images: toys of the world
        directory/one_image/1_photo/toy.png + toy.txt       one image and its caption, for single-image editing

Captions are .txt files, so train with --caption_extension .txt (sd-scripts' default is .caption).
The same files are kept in para_trainer/example_data/ (python -m para_trainer.training.example_images rewrites them);
the renderer computes pixels with integer arithmetic and PNGs are stored uncompressed, so the bytes are the same
on every machine.
"""

from __future__ import annotations

import os
import sys

from ..toyworld.concepts import concept_scene
from ..toyworld.files import concept_files, png_bytes, write_files
from ..toyworld.render import render

EXAMPLE_CONCEPT = "smiley-ball"
PACKAGE_COPY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_data")
SUBJECT_FOLDER = "train/5_sks toy"
CLASS_FOLDER = "reg/1_toy"
CLASS_CAPTION = "a photo of a toy"
SUBJECT_CAPTION = "a photo of sks toy"
ONE_IMAGE_FOLDER = "one_image/1_photo"
ONE_IMAGE_CAPTION = "a photo of sks toy on a wooden floor"


def example_files() -> dict[str, bytes]:
    """{relative path: bytes} of the whole example dataset."""
    files = concept_files(EXAMPLE_CONCEPT, images=5, class_images=5, repeats=5)
    scene = concept_scene(EXAMPLE_CONCEPT, "wooden floor", "center", "large", variant=7)
    files[f"{ONE_IMAGE_FOLDER}/toy.png"] = png_bytes(render(scene))
    files[f"{ONE_IMAGE_FOLDER}/toy.txt"] = f"{ONE_IMAGE_CAPTION}\n".encode()
    return files


def write_example_dataset(directory: str) -> list[str]:
    """Write the example dataset under `directory` (train/, reg/, one_image/); returns the paths written."""
    return write_files(example_files(), directory)


if __name__ == "__main__":  # regenerate the copy shipped in the package
    target = sys.argv[1] if len(sys.argv) > 1 else PACKAGE_COPY
    print("\n".join(write_example_dataset(target)))
