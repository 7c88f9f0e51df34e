"""Detection data: COCO-format annotation files (images + instances json) and Pascal VOC XML, read through
pycocotools, with the standard detection transforms (resize of the shorter side, horizontal flip with boxes).

Items are `(image, target, index)`: a float image `[3, H, W]` in [0, 1] (the detector normalises it), and a
target dict with `boxes` `[N, 4]` (xyxy, in the item's pixels), `labels` `[N]` (1..K; 0 is the background),
`image_id` (the annotation file's id) and `scale` `[2]` (x, y resize factor, so that detections map back to
the annotation file's coordinates). Crowd regions and degenerate boxes are left out of the targets; the
evaluator reads the annotation file itself (`DetectionImages.coco`), crowd regions included.
"""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from padkd.data import DATASETS, DataSplits
from padkd.errors import PadkdError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def quiet_coco(dataset: dict[str, Any]) -> Any:
    """A pycocotools COCO object over an annotation dict, without its prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_coco_json(path: Path) -> dict[str, Any]:
    """A COCO instances file, checked for the fields detection needs; one-line errors otherwise."""
    if not path.is_file():
        raise PadkdError(f"data: annotation file '{path}' not found; pass data.root holding the COCO layout "
                         "(annotations/instances_<split>.json and <split>/ image folders) or set data.annotations")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno} column {err.colno}: {err.msg})" if isinstance(err, json.JSONDecodeError) else ""
        raise PadkdError(f"data: '{path}' is not valid JSON{where}; re-download or re-export the annotations") from None
    if not isinstance(data, dict):
        raise PadkdError(f"data: '{path}' is not a COCO instances file (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise PadkdError(f"data: '{path}' is not a COCO instances file: no '{key}' list")
    for kind, fields in (("images", ("id", "file_name")), ("categories", ("id",)),
                         ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for i, entry in enumerate(data[kind]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise PadkdError(f"data: '{path}': {kind}[{i}] has no '{missing[0]}'; every entry of '{kind}' "
                                 f"needs {', '.join(fields)}")
    for i, ann in enumerate(data["annotations"]):
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            raise PadkdError(f"data: '{path}': annotations[{i}].bbox must be [x, y, width, height], got {box!r}")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(box[2] * box[3]))
    return data


def read_voc(root: Path, split: str, classes: tuple[str, ...], keep_difficult: bool) -> tuple[dict[str, Any], Path]:
    """A Pascal VOC split (`ImageSets/Main/<split>.txt`, `Annotations/*.xml`) as a COCO-format dict and its
    image folder. Boxes follow detectron2: VOC's 1-based inclusive pixel indices (xmin..xmax) become the
    continuous box [xmin - 1, xmax]. Difficult objects become crowd regions (ignored by the evaluator and
    left out of training) unless `keep_difficult`."""
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise PadkdError(f"data: '{listing}' not found; data.root must be a VOC year folder (e.g. VOCdevkit/VOC2007) "
                         "with ImageSets/Main, Annotations and JPEGImages")
    names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    index = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, name in enumerate(names, start=1):
        xml_path = root / "Annotations" / f"{name}.xml"
        try:
            tree = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            raise PadkdError(f"data: '{xml_path}' (listed in {listing.name}) not found") from None
        except ET.ParseError as err:
            raise PadkdError(f"data: '{xml_path}' is not valid XML ({err})") from None
        try:
            size = tree.find("size")
            width, height = int(size.findtext("width")), int(size.findtext("height"))  # type: ignore[union-attr,arg-type]
            file_name = tree.findtext("filename") or f"{name}.jpg"
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for obj in tree.iter("object"):
                cls = (obj.findtext("name") or "").strip()
                if cls not in index:
                    raise PadkdError(f"data: '{xml_path}': unknown class '{cls}'; set data.classes to the data "
                                     "set's class names")
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr,arg-type]
                difficult = obj.findtext("difficult", "0").strip() == "1"
                w, h = x2 - x1 + 1, y2 - y1 + 1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": index[cls],
                                    "bbox": [x1 - 1, y1 - 1, w, h], "area": w * h,
                                    "iscrowd": int(difficult and not keep_difficult)})
        except (AttributeError, TypeError, ValueError):
            raise PadkdError(f"data: '{xml_path}' lacks a size (width, height) or an object's bndbox "
                             "(xmin, ymin, xmax, ymax) as numbers") from None
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, root / "JPEGImages"


def resize_to(image: Tensor, boxes: Tensor, min_size: int, max_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Resize so the shorter side is `min_size` unless the longer would exceed `max_size` (torchvision's
    detection rule); returns the image, the scaled boxes and the (x, y) scale."""
    h, w = image.shape[-2:]
    factor = min(min_size / min(h, w), max_size / max(h, w))
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    scale = torch.tensor([size[1] / w, size[0] / h])
    return image, boxes * scale.repeat(2), scale


class DetectionImages(Dataset):
    """The images of one COCO-format annotation set with their boxes and labels.

    `coco` is the pycocotools object of the annotation file (the evaluator scores detections against it);
    `label_to_category` maps model labels to the file's category ids. `resize` (shorter side, longest
    side) rescales images and boxes; `flip` is the probability of a horizontal flip (training only)."""

    def __init__(self, coco: Any, image_dir: Path, label_of: dict[int, int], *, resize: tuple[int, int] | None,
                 flip: float, skip_empty: bool, source: str) -> None:
        self.coco = coco
        self.image_dir = image_dir
        self.label_of = label_of
        self.label_to_category = {label: cat for cat, label in label_of.items()}
        self.resize = resize
        self.flip = flip
        self.source = source
        ids = sorted(coco.imgs)
        if skip_empty:  # as torchvision's reference: training images need at least one usable box
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
                                         for a in coco.imgToAnns.get(i, []))]
        self.ids = ids
        missing = [coco.imgs[i]["file_name"] for i in ids if not (image_dir / coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise PadkdError(f"data: image '{image_dir / missing[0]}' listed in '{source}' not found "
                             f"({len(missing)} of {len(ids)} missing); check data.root and the image folder")

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, image_id: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as image:
                return pil_to_tensor(image.convert("RGB")).float().div_(255)
        except (UnidentifiedImageError, OSError) as err:
            raise PadkdError(f"data: cannot decode image '{path}' ({str(err).splitlines()[0][:120]})") from None

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor], int]:
        image_id = self.ids[i]
        image = self._read(image_id)
        h, w = image.shape[-2:]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) or ann["category_id"] not in self.label_of:
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x2 > x1 and y2 > y1:
                boxes.append([x1, y1, x2, y2])
                labels.append(self.label_of[ann["category_id"]])
        box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        scale = torch.ones(2)
        if self.resize is not None:
            image, box_t, scale = resize_to(image, box_t, *self.resize)
        if self.flip > 0 and float(torch.rand(())) < self.flip:
            image = image.flip(-1)
            box_t = torch.stack([image.shape[-1] - box_t[:, 2], box_t[:, 1], image.shape[-1] - box_t[:, 0],
                                 box_t[:, 3]], dim=1)
        target = {"boxes": box_t, "labels": torch.tensor(labels, dtype=torch.long),
                  "image_id": torch.tensor(image_id, dtype=torch.long), "scale": scale}
        return image, target, i


def _label_map(categories: list[dict[str, Any]], contiguous: bool) -> tuple[dict[int, int], int]:
    """Category id → model label, and the model's `num_classes` (background included)."""
    ids = sorted(int(c["id"]) for c in categories)
    if not ids:
        raise PadkdError("data: the annotation file lists no categories")
    if contiguous:
        return {cat: k + 1 for k, cat in enumerate(ids)}, len(ids) + 1
    if min(ids) < 1:
        raise PadkdError("data: category ids must be >= 1 with contiguous_labels false (0 is the background)")
    return {cat: cat for cat in ids}, max(ids) + 1


def _splits(load: Any, train: str, val: str | None, test: str, *, resize: tuple[int, int] | None, flip: float,
            contiguous_labels: bool, skip_empty: bool) -> DataSplits:
    """Build the splits from `load(split) → (annotation dict, image folder, source name)`; a split named twice
    is read once."""
    if not 0 <= flip <= 1:
        raise ValueError(f"flip is a probability in [0, 1], got {flip}")
    if resize is not None and not 1 <= resize[0] <= resize[1]:
        raise ValueError(f"resize must be [shorter side, longest side] with 1 <= shorter <= longest, "
                         f"got {list(resize)}")
    loaded: dict[str, tuple[Any, Path, str]] = {}

    def coco_of(split: str) -> tuple[Any, Path, str]:
        if split not in loaded:
            data, image_dir, source = load(split)
            loaded[split] = (quiet_coco(data), image_dir, source)
        return loaded[split]

    coco, _, _ = coco_of(train)
    label_of, num_classes = _label_map(list(coco.cats.values()), contiguous_labels)
    made: dict[tuple[str, bool], DetectionImages] = {}

    def dataset(split: str, augment: bool) -> DetectionImages:
        if (split, augment) not in made:
            c, image_dir, source = coco_of(split)
            if sorted(c.cats) != sorted(coco.cats):
                raise PadkdError(f"data: the categories of '{source}' differ from those of the training split")
            made[split, augment] = DetectionImages(c, image_dir, label_of, resize=resize, flip=flip if augment else 0.0,
                                                   skip_empty=skip_empty and augment, source=source)
        return made[split, augment]

    return DataSplits(train=dataset(train, True), val=dataset(val, False) if val is not None else None,
                      test=dataset(test, False), in_channels=3, num_classes=num_classes,
                      eval_train=dataset(train, False))


@DATASETS.register("coco")
def coco(root: str, train: str = "train2017", val: str | None = "val2017", test: str = "val2017",
         annotations: str = "annotations/instances_{split}.json", images: str = "{split}",
         resize: tuple[int, int] | None = None, flip: float = 0.5, contiguous_labels: bool = True,
         skip_empty: bool = True) -> DataSplits:
    """COCO-format detection data: ROOT/annotations/instances_<split>.json and ROOT/<split>/ images.

    `train`/`val`/`test` name the splits (`val: null` for none; COCO's protocol evaluates on val2017, its test
    annotations being private). `resize: [shorter, longest]` rescales in the loader (the detector's
    `min_size`/`max_size` resize again); `flip` is the horizontal-flip probability in training.
    `contiguous_labels: false` keeps category ids as labels (91 classes on COCO, as torchvision's
    COCO weights expect). `skip_empty` leaves training images without boxes out (torchvision's reference)."""
    base = Path(root)

    def load(split: str) -> tuple[dict[str, Any], Path, str]:
        path = base / annotations.format(split=split)
        return read_coco_json(path), base / images.format(split=split), str(path)

    return _splits(load, train, val, test, resize=resize, flip=flip, contiguous_labels=contiguous_labels,
                   skip_empty=skip_empty)


@DATASETS.register("voc")
def voc(root: str, train: str = "trainval", val: str | None = None, test: str = "test",
        classes: tuple[str, ...] = VOC_CLASSES, keep_difficult: bool = False, resize: tuple[int, int] | None = None,
        flip: float = 0.5) -> DataSplits:
    """Pascal VOC XML (ROOT = a VOC year folder: ImageSets/Main/<split>.txt, Annotations/, JPEGImages/).

    Evaluated with COCO's metrics on the converted annotations (AP50 is close to, not equal to, VOC's own
    AP: COCO interpolates precision at 101 recall points). Difficult objects are ignored in evaluation and
    left out of training unless `keep_difficult`."""
    base = Path(root)
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError("classes must be a non-empty list of distinct names")

    def load(split: str) -> tuple[dict[str, Any], Path, str]:
        data, image_dir = read_voc(base, split, tuple(classes), keep_difficult)
        return data, image_dir, str(base / "ImageSets" / "Main" / f"{split}.txt")

    return _splits(load, train, val, test, resize=resize, flip=flip, contiguous_labels=True, skip_empty=True)
