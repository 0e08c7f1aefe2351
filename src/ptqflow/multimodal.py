"""Model inputs of vision-language models: one small interface per model family.

A :class:`Family` knows three things about its models: how one image becomes pixel tensors
(its image processor, sized from the model config), which token ids stand for one image in the
text (the placeholder expanded to as many image tokens as the vision tower gives features, with
the family's wrapper tokens), and which keyword arguments the model's forward reads
(``pixel_values`` and the family's extras: ``image_grid_thw`` and ``mm_token_type_ids`` for
Qwen2-VL, ``pixel_attention_mask`` for Idefics3). :func:`build_batch` does the rest the same way
for every family, so calibration and evaluation share one layout:

- every sample is exactly ``seqlen`` tokens: ``shots`` image-text units (one is a caption
  sample; more is MBQ's few-shot format), each ``prefix <image> prompt separator caption``,
  then pure text up to ``seqlen``: the captions of the following pairs without their images
  (MBQ's interleaved image-text and pure-text format). No sample is padded, so every position
  is a real token for the activation statistics, the gradients and the searches;
- ``vision`` marks the image-token positions (the modality mask), ``caption`` the caption
  tokens of the image-text units: the tokens the caption loss and the caption perplexity score.

Images are resized to the size the family's config implies (no tiling or dynamic resolution),
so every image of a batch gives the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ptqflow.artifacts import sha256_tensor
from ptqflow.imagetext import Pair
from ptqflow.models.architectures import ARCHITECTURES, get_architecture

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTextBatch:
    """Samples of image-text units (module docstring); ``n`` samples of ``seq`` tokens with
    ``k`` images each.

    Attributes:
        input_ids: int64 ``[n, seq]``.
        vision: bool ``[n, seq]``, True at image-token positions.
        caption: bool ``[n, seq]``, True at the caption tokens of the image-text units.
        pixel_values: float32 ``[n, k, ...]``, each image as its family's processor gives it.
        image_grid_thw: int64 ``[n, k, 3]`` (Qwen2-VL's patch grid per image), else None.
    """

    input_ids: torch.Tensor
    vision: torch.Tensor
    caption: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, rows: slice) -> ImageTextBatch:
        """The samples ``rows``."""
        return ImageTextBatch(
            **{
                f.name: None if (t := getattr(self, f.name)) is None else t[rows]
                for f in fields(self)
            }
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """For safetensors (masks as uint8)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["vision"], out["caption"] = self.vision.to(torch.uint8), self.caption.to(torch.uint8)
        return {k: v.contiguous() for k, v in out.items() if v is not None}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ImageTextBatch:
        return cls(
            t["input_ids"],
            t["vision"].bool(),
            t["caption"].bool(),
            t["pixel_values"],
            t.get("image_grid_thw"),
        )

    def sha256(self) -> str:
        """One hash of every tensor (name, dtype, shape and bytes)."""
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(f"{name}={sha256_tensor(t)};".encode())
        return "sha256:" + h.hexdigest()


class Family:
    """How a vision-language family reads images (module docstring); subclasses fill it in."""

    name = ""  # the registry's ``inputs`` for the architectures that use this family
    mean, std = CLIP_MEAN, CLIP_STD
    user, assistant = "USER: ", " ASSISTANT:"  # the text around <image> prompt

    def __init__(self, config) -> None:
        self.config = config

    @property
    def image_token(self) -> int:
        c = self.config
        return int(getattr(c, "image_token_id", None) or c.image_token_index)

    def image_side(self) -> int:
        """The side in pixels every image is resized to."""
        return int(self.config.vision_config.image_size)

    def n_image_tokens(self) -> int:
        raise NotImplementedError

    def image_span(self, tokenizer) -> list[int]:
        """The token ids that stand for one image."""
        return [self.image_token] * self.n_image_tokens()

    def pixels(self, image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One RGB image as float32 pixels, and its patch grid where the family has one."""
        raise NotImplementedError

    def model_inputs(self, batch: ImageTextBatch) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for ``batch``."""
        raise NotImplementedError


class LlavaFamily(Family):
    """LLaVA 1.5: a CLIP tower on a square crop; one image is ``(side / patch)^2`` tokens
    (one more when the projector keeps the CLS feature)."""

    name = "llava"

    def n_image_tokens(self) -> int:
        v = self.config.vision_config
        full = getattr(self.config, "vision_feature_select_strategy", "default") == "full"
        return (v.image_size // v.patch_size) ** 2 + int(full)

    def pixels(self, image):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        s = self.image_side()
        proc = CLIPImageProcessorPil(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_mean=list(self.mean),
            image_std=list(self.std),
        )
        return proc([image], return_tensors="pt")["pixel_values"][0].float(), None

    def model_inputs(self, batch):
        return {"input_ids": batch.input_ids, "pixel_values": batch.pixel_values.flatten(0, 1)}


class Qwen2VLFamily(Family):
    """Qwen2-VL and Qwen2.5-VL: images at ``8 * patch * merge`` pixels square, cut into
    ``patch``-pixel patches (each repeated over the temporal patch), ``merge^2`` patches per
    token; the image span is wrapped in vision start/end tokens, and M-RoPE reads the patch grid
    and the token types."""

    name = "qwen2_vl"
    user = "<|im_start|>user\n"
    assistant = "<|im_end|>\n<|im_start|>assistant\n"

    def _vision(self):
        v = self.config.vision_config
        return v.patch_size, v.spatial_merge_size, v.temporal_patch_size

    def image_side(self) -> int:
        patch, merge, _ = self._vision()
        return 8 * patch * merge

    def n_image_tokens(self) -> int:
        patch, merge, _ = self._vision()
        return (self.image_side() // patch) ** 2 // merge**2

    def image_span(self, tokenizer):
        c = self.config
        return [c.vision_start_token_id, *super().image_span(tokenizer), c.vision_end_token_id]

    def pixels(self, image):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        patch, merge, temporal = self._vision()
        s = self.image_side()
        proc = Qwen2VLImageProcessorPil(
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=temporal,
            min_pixels=s * s,
            max_pixels=s * s,
            image_mean=list(self.mean),
            image_std=list(self.std),
        )
        out = proc([image.resize((s, s))], return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"][0]

    def model_inputs(self, batch):
        return {
            "input_ids": batch.input_ids,
            "pixel_values": batch.pixel_values.flatten(0, 2),
            "image_grid_thw": batch.image_grid_thw.flatten(0, 1),
            "mm_token_type_ids": batch.vision.int(),
        }


class Idefics3Family(Family):
    """Idefics3 / SmolVLM: one global image (no tiling) at the vision tower's size, pixel-
    shuffled by ``scale_factor``; the span is wrapped in ``<fake_token_around_image>`` and
    starts with ``<global-img>`` when the tokenizer has them."""

    name = "idefics3"
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    user, assistant = "User:", "<end_of_utterance>\nAssistant:"

    def n_image_tokens(self) -> int:
        v = self.config.vision_config
        return (v.image_size // v.patch_size) ** 2 // self.config.scale_factor**2

    def image_span(self, tokenizer):
        vocab = tokenizer.get_vocab()
        around = (
            [vocab["<fake_token_around_image>"]] if "<fake_token_around_image>" in vocab else []
        )
        start = [vocab["<global-img>"]] if "<global-img>" in vocab else []
        return [*around, *start, *super().image_span(tokenizer), *around]

    def pixels(self, image):
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil,
        )

        s = self.image_side()
        proc = Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": s},
            max_image_size={"longest_edge": s},
            image_mean=list(self.mean),
            image_std=list(self.std),
        )
        return proc([[image.resize((s, s))]], return_tensors="pt")["pixel_values"][
            0, 0
        ].float(), None

    def model_inputs(self, batch):
        p = batch.pixel_values
        mask = torch.ones(*p.shape[:2], *p.shape[-2:], dtype=torch.bool)
        return {"input_ids": batch.input_ids, "pixel_values": p, "pixel_attention_mask": mask}


FAMILIES: tuple[type[Family], ...] = (LlavaFamily, Qwen2VLFamily, Idefics3Family)


def family_of(config) -> Family:
    """The input family of a vision-language ``config`` (the registry's ``inputs``); a text
    model's type is refused with the types that have one."""
    inputs = get_architecture(config.model_type).inputs
    for cls in FAMILIES:
        if cls.name == inputs:
            return cls(config)
    known = sorted(t for a in ARCHITECTURES if a.inputs for t in a.model_types)
    raise ValueError(
        f"'{config.model_type}' has no image-text input family; ptqflow builds image-text "
        f"inputs for: {', '.join(known)}"
    )


def model_inputs(config, batch: ImageTextBatch | torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments for token blocks (text) or an image-text batch."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    return family_of(config).model_inputs(batch)


def batches(config, data: ImageTextBatch | torch.Tensor, batch_size: int, device=None):
    """``(kwargs, rows)`` for each run of ``batch_size`` samples of ``data``: the forward's
    keyword arguments (on ``device``) and the rows' data."""
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        part = data[rows] if isinstance(data, torch.Tensor) else data.rows(rows)
        yield {k: v.to(device) for k, v in model_inputs(config, part).items()}, part


def build_batch(
    family: Family, tokenizer, pairs: list[Pair], n_samples: int, seqlen: int, shots: int = 1
) -> ImageTextBatch:
    """``n_samples`` samples of exactly ``seqlen`` tokens from ``pairs`` (module docstring):
    sample ``s`` holds pairs ``s*shots .. s*shots+shots-1`` with their images, then the
    captions of the pairs after them as pure text.

    Raises:
        ValueError: fewer than ``n_samples * shots`` pairs, or the image-text units of a sample
            do not fit in ``seqlen`` tokens.
    """
    need = n_samples * shots
    if len(pairs) < need:
        raise ValueError(
            f"the image-text source holds {len(pairs)} pairs; {n_samples} samples of {shots} "
            f"pairs need {need}: lower n_samples or shots, or give more pairs"
        )
    span = family.image_span(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows_ids, rows_vision, rows_caption, pixels, grids = [], [], [], [], []
    for s in range(n_samples):
        ids, vision, caption = list(bos), [False] * len(bos), [False] * len(bos)
        images = []
        for pair in pairs[s * shots : (s + 1) * shots]:
            head = encode(family.user)
            tail = encode(("\n" + pair.prompt if pair.prompt else "") + family.assistant)
            text = encode(" " + pair.text)
            ids += head + span + tail + text
            vision += [False] * len(head) + [t == family.image_token for t in span]
            vision += [False] * len(tail) + [False] * len(text)
            caption += [False] * (len(head) + len(span) + len(tail)) + [True] * len(text)
            images.append(family.pixels(pair.open()))
        if len(ids) > seqlen:
            raise ValueError(
                f"sample {s}: its {shots} image-text pair(s) take {len(ids)} tokens, more than "
                f"seqlen={seqlen}; raise seqlen (or lower shots)"
            )
        j = (s + 1) * shots
        while len(ids) < seqlen:  # pure text: the next captions, without their images
            text = encode(" " + pairs[j % len(pairs)].text)
            ids += text
            vision += [False] * len(text)
            caption += [False] * len(text)
            j += 1
        rows_ids.append(ids[:seqlen])
        rows_vision.append(vision[:seqlen])
        rows_caption.append(caption[:seqlen])
        pixels.append(torch.stack([p for p, _ in images]))
        if images[0][1] is not None:
            grids.append(torch.stack([g for _, g in images]))
    return ImageTextBatch(
        torch.tensor(rows_ids, dtype=torch.int64),
        torch.tensor(rows_vision),
        torch.tensor(rows_caption),
        torch.stack(pixels),
        torch.stack(grids).long() if grids else None,
    )
