"""A tiny generated Omniglot look-alike, for fast tests of reading, caching and errors (ours and plugin authors').

The tree has the real layout (``images_background/<Alphabet>/characterNN/NNNN_MM.png``, 105x105 1-bit PNGs,
black ink on white), so it exercises exactly the code paths the real data does.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from benchmark.harness.data.omniglot import DRAWINGS
from benchmark.harness.data.sources import SETS


def make_fake_omniglot(
    root: str | Path,
    *,
    alphabets: int = 2,
    characters: int = 3,
    drawings: int = DRAWINGS,
    zips: bool = False,
    seed: int = 0,
) -> Path:
    """Write a fake tree (or the two zips) under ``root`` and return ``root``.

    Each drawing is a few random black rectangles on white, different per character and drawing.

    Args:
        alphabets, characters: per image set (background and evaluation each get this many).
        drawings: drawings per character (20 in the real data; fewer makes an invalid tree on purpose).
        zips: write ``images_background.zip``/``images_evaluation.zip`` instead of folders.
    """
    from PIL import Image

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    char_id = 0
    for set_name in SETS:
        files: dict[str, bytes] = {}
        for a in range(alphabets):
            for c in range(characters):
                char_id += 1
                for d in range(drawings):
                    canvas = torch.ones(105, 105, dtype=torch.uint8)
                    for _ in range(3):
                        y, x = torch.randint(0, 90, (2,), generator=g).tolist()
                        h, w = torch.randint(5, 15, (2,), generator=g).tolist()
                        canvas[y : y + h, x : x + w] = 0
                    image = Image.fromarray((canvas * 255).numpy()).convert("1")
                    rel = f"{set_name}/Alphabet_{a:02d}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"
                    path = root / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    files[rel] = path.read_bytes()
        if zips:
            with zipfile.ZipFile(root / f"{set_name}.zip", "w", zipfile.ZIP_STORED) as zf:
                for rel in sorted(files):
                    zf.writestr(rel, files[rel])
            _remove_tree(root / set_name)
    return root


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
