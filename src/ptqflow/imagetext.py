"""Image-text sources for calibrating and evaluating vision-language models.

A source is one string, like a text source (:mod:`ptqflow.text`):

- ``scenes:calib`` / ``scenes:eval``: ptqflow's own offline set, generated on the fly:
  simple rendered scenes (one to three coloured shapes on a background) with a caption that
  says what is where. Scene ``i`` is a pure function of ``i``; the calibration pool takes even
  indices and the evaluation pool odd ones, so the two never overlap. Made here, under this
  project's licence.
- a ``.jsonl`` file: one record per line, ``{"image": <path>, "text": <caption>}`` or a
  conversation ``{"image": <path>, "conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]}`` (LLaVA's format; ``role``/``content`` keys work too).
  Image paths are relative to the file's folder.
- a COCO-style captions ``.json``: ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``; images are looked up beside the file or in its ``images/``
  folder.
- ``hf:<dataset>[:<config>]``: a hub dataset with an image column and a text column (needs a
  network or a local cache).

:func:`load_pairs` reads a source and checks every record (a missing field is named with its
record number); :func:`check_images` opens every image file and names the first that is
missing or unreadable, so both fail before any model loads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SCENES = "scenes:"
SCENE_POOLS = ("calib", "eval")
SCENE_SIZE = 64


@dataclass(frozen=True)
class Pair:
    """One image with its text.

    Attributes:
        image: a file path, or ``scene:<index>`` for a generated scene.
        prompt: the question or instruction before the answer ('' for a plain caption).
        text: the caption or answer: the tokens the caption loss and the evaluation score.
    """

    image: str
    prompt: str
    text: str

    def open(self) -> Image.Image:
        """The image, RGB."""
        if self.image.startswith("scene:"):
            return render_scene(int(self.image.removeprefix("scene:")))[0]
        with Image.open(self.image) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------- scenes

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
}
_BACKGROUNDS = {"white": (250, 250, 250), "grey": (150, 150, 150), "light blue": (190, 220, 245)}
_PLACES = {
    "in the top left corner": (0.25, 0.25),
    "in the top right corner": (0.75, 0.25),
    "in the bottom left corner": (0.25, 0.75),
    "in the bottom right corner": (0.75, 0.75),
    "in the middle": (0.5, 0.5),
}
_SHAPES = ("circle", "square", "triangle")


def render_scene(index: int) -> tuple[Image.Image, str]:
    """Scene ``index``: a ``SCENE_SIZE``-pixel RGB image and its caption (deterministic)."""
    rng = random.Random(f"ptqflow-scene-{index}")
    background = rng.choice(sorted(_BACKGROUNDS))
    image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), _BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    parts = []
    for place in rng.sample(sorted(_PLACES), rng.randint(1, 3)):
        shape, colour = rng.choice(_SHAPES), rng.choice(sorted(_COLOURS))
        size = rng.choice(("small", "large"))
        cx, cy = (v * SCENE_SIZE for v in _PLACES[place])
        r = SCENE_SIZE * (0.08 if size == "small" else 0.15)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLOURS[colour])
        parts.append(f"a {size} {colour} {shape} {place}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption = f"{listed[0].upper()}{listed[1:]}, on a {background} background."
    return image, caption


def scene_pairs(pool: str, n: int) -> list[Pair]:
    """The first ``n`` scenes of ``pool`` (``calib``: even indices, ``eval``: odd)."""
    if pool not in SCENE_POOLS:
        raise ValueError(f"unknown scenes pool '{pool}': use scenes:calib or scenes:eval")
    start = 0 if pool == "calib" else 1
    return [Pair(f"scene:{i}", "", render_scene(i)[1]) for i in range(start, start + 2 * n, 2)]


# ----------------------------------------------------------------------------- files


def _conversation(record: dict, where: str) -> tuple[str, str]:
    """``(prompt, answer)`` of a LLaVA-style conversation: the first human turn (its
    ``<image>`` placeholder removed) and the first reply."""
    turns = record["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: 'conversations' needs a question and an answer turn")
    text = [t.get("value", t.get("content")) for t in turns[:2]]
    if not all(isinstance(t, str) for t in text):
        raise ValueError(f"{where}: each turn needs a 'value' (or 'content') string")
    return text[0].replace("<image>", "").strip(), text[1].strip()


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, record {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ValueError(f"{where} lacks the 'image' field (a path to the image file)")
        if "conversations" in record:
            prompt, text = _conversation(record, where)
        elif isinstance(record.get("text"), str):
            prompt, text = "", record["text"]
        else:
            raise ValueError(f"{where} lacks the 'text' field (the caption), or 'conversations'")
        pairs.append(Pair(str(path.parent / record["image"]), prompt, text))
    return pairs


def _read_coco(path: Path) -> list[Pair]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: a COCO captions file needs 'images' and 'annotations' lists")
    files = {}
    for i, im in enumerate(data["images"], start=1):
        if "id" not in im or "file_name" not in im:
            field = "id" if "id" not in im else "file_name"
            raise ValueError(f"{path}, images record {i} lacks the '{field}' field")
        name = Path(im["file_name"])
        beside = path.parent / name
        files[im["id"]] = beside if beside.exists() else path.parent / "images" / name
    pairs = []
    for i, ann in enumerate(data["annotations"], start=1):
        for field in ("image_id", "caption"):
            if field not in ann:
                raise ValueError(f"{path}, annotations record {i} lacks the '{field}' field")
        if ann["image_id"] not in files:
            raise ValueError(
                f"{path}, annotations record {i}: image_id {ann['image_id']} is not in 'images'"
            )
        pairs.append(Pair(str(files[ann["image_id"]]), "", ann["caption"].strip()))
    return pairs


def is_image_text(source: str) -> bool:
    """Whether a local or generated ``source`` names image-text pairs rather than plain text:
    ``scenes:...``, a JSONL file whose first record has an ``image`` field, or a COCO captions
    file. (A hub dataset shows its columns only once loaded.)"""
    if source.startswith(SCENES):
        return True
    path = Path(source)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            first = next((line for line in f if line.strip()), "")
            try:
                return isinstance(json.loads(first), dict) and "image" in json.loads(first)
            except json.JSONDecodeError:
                return False
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            return False
    return isinstance(data, dict) and "images" in data and "annotations" in data


def load_pairs(source: str, n: int, text_field: str = "text", split: str = "train") -> list[Pair]:
    """At most ``n`` image-text pairs of ``source`` (module docstring), records checked."""
    if source.startswith(SCENES):
        return scene_pairs(source.removeprefix(SCENES), n)
    if source.startswith("hf:"):
        return _hub_pairs(source, n, text_field, split)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image-text source '{source}' does not exist")
    pairs = _read_jsonl(path) if path.suffix == ".jsonl" else _read_coco(path)
    if not pairs:
        raise ValueError(f"image-text source '{source}' holds no records")
    return pairs[:n]


def _hub_pairs(source: str, n: int, text_field: str, split: str) -> list[Pair]:
    """Pairs of a hub dataset, its images written once to the hub cache as PNG files."""
    from datasets import load_dataset

    name, _, config = source.removeprefix("hf:").partition(":")
    ds = load_dataset(name, config or None, split=split)
    image_field = next((c for c in ds.column_names if c in ("image", "img", "picture")), None)
    if image_field is None or text_field not in ds.column_names:
        raise ValueError(
            f"hub dataset '{name}' has columns {ds.column_names}: ptqflow needs an image column "
            f"(image) and calib.text_field={text_field!r}"
        )
    cache = Path(ds.cache_files[0]["filename"]).parent / "ptqflow-images"
    cache.mkdir(exist_ok=True)
    pairs = []
    for i, row in enumerate(ds.select(range(min(n, len(ds))))):
        text = row[text_field]
        text = text[0] if isinstance(text, list) else text
        file = cache / f"{i:06d}.png"
        if not file.exists():
            row[image_field].convert("RGB").save(file)
        pairs.append(Pair(str(file), "", str(text)))
    return pairs


def check_images(pairs: list[Pair]) -> None:
    """Open every image file (not generated scenes); raise naming the first that is missing
    or that PIL cannot read."""
    for i, pair in enumerate(pairs, start=1):
        if pair.image.startswith("scene:"):
            continue
        path = Path(pair.image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (record {i}) does not exist")
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for a damaged file
            raise ValueError(
                f"image {path} (record {i}) is not a readable image ({type(e).__name__}: {e})"
            ) from None
