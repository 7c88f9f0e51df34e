"""A synthetic detection data set in the real COCO format: coloured shapes on textured backgrounds.

`write_shapes_coco(root, ...)` writes `root/<split>/*.png` and `root/annotations/instances_<split>.json`
(images, annotations with xywh boxes, areas and `iscrowd`, categories), read back by the `coco` data set
like any COCO-format data. The images are SYNTHETIC: numbers measured on them say nothing about real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CATEGORIES = ("circle", "square", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background `[H, W, 3]` in [0, 1]: smooth colour noise, stripes and pixel noise."""
    coarse = rng.random((3, 5, 5))
    grid = np.linspace(0, 4, size)
    i0 = np.clip(grid.astype(int), 0, 3)
    t = grid - i0
    rows = coarse[:, i0] * (1 - t)[None, :, None] + coarse[:, i0 + 1] * t[None, :, None]
    smooth = rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image = 0.55 * smooth + 0.25 * stripes[None] * rng.random((3, 1, 1)) + 0.1 * rng.random((3, size, size))
    return np.clip(image, 0, 1).transpose(1, 2, 0)


def _shape_mask(kind: str, size: int, x: float, y: float, extent: float) -> np.ndarray:
    """Boolean mask of one shape whose bounding square has top-left (x, y) and side `extent`."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u, v = (xx - x) / extent, (yy - y) / extent  # unit square coordinates
    if kind == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if kind == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return (v <= 1) & (v >= 2 * np.abs(u - 0.5))  # triangle, apex up


def _overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    ax, ay, ae = a
    bx, by, be = b
    w = max(0.0, min(ax + ae, bx + be) - max(ax, bx))
    h = max(0.0, min(ay + ae, by + be) - max(ay, by))
    return w * h / min(ae * ae, be * be)


Objects = list[tuple[int, list[float], float]]


def draw_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, Objects]:
    """One image `[H, W, 3]` uint8 and its objects `(category id, [x, y, w, h], area)`."""
    image = _background(rng, size)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            extent = rng.uniform(size / 6, size / 2.5)
            spot = (rng.uniform(0, size - extent), rng.uniform(0, size - extent), extent)
            if all(_overlap(spot, other) < 0.2 for other in placed):
                break
        else:
            continue
        kind = int(rng.integers(len(CATEGORIES)))
        mask = _shape_mask(CATEGORIES[kind], size, *spot)
        if mask.sum() < 4:
            continue
        colour = rng.random(3)
        image[mask] = 0.8 * colour + 0.2 * image[mask]
        for previous in objects:  # a later shape may hide part of an earlier one
            previous[3][mask] = False
        placed.append(spot)
        objects.append([kind + 1, None, None, mask])
    out = []
    for kind, _, _, mask in objects:
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        out.append((kind, box, float(mask.sum())))
    return (image * 255).round().astype(np.uint8), out


def write_shapes_coco(root: Path, splits: dict[str, int], size: int = 64, max_objects: int = 3, seed: int = 0) -> Path:
    """Write the synthetic shapes data set (`splits`: name → number of images) in the COCO layout under `root`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CATEGORIES)]
    for split, count in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            pixels, objects = draw_image(rng, size, max_objects)
            name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for kind, box, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": kind,
                                    "bbox": box, "area": area, "iscrowd": 0})
        info = {"description": "padkd synthetic shapes (SYNTHETIC data, not a benchmark)"}
        data = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
