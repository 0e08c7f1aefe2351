"""Perplexity on a fixed, documented protocol.

Protocol (the default evaluation, so figures compare across tools): the evaluation documents are
joined with ``"\\n\\n"`` in their given order (title order for the embedded wiki pool) and
tokenized once without special tokens; the first ``n_windows`` non-overlapping windows of
``seqlen`` tokens are scored; each window predicts its tokens 2..seqlen from the ones before it
(no context carried across windows); perplexity is ``exp`` of the mean next-token negative
log-likelihood over all windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ptqflow.multimodal import ImageTextBatch, batches


def eval_windows(docs: list[str], tokenizer, seqlen: int, n_windows: int) -> torch.Tensor:
    """Token windows ``int64 [n_windows, seqlen]`` per the protocol.

    Raises:
        ValueError: the text holds fewer than ``n_windows * seqlen`` tokens.
    """
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    need = n_windows * seqlen
    if len(ids) < need:
        raise ValueError(
            f"evaluation text has {len(ids)} tokens, fewer than n_windows={n_windows} x "
            f"seqlen={seqlen} = {need}; lower eval.n_windows or eval.seqlen, or give more text"
        )
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(n_windows, seqlen)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor | ImageTextBatch,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Score ``windows`` with a causal LM, every next token; or image-text samples with a
    vision-language model, their caption tokens (caption perplexity). Log-probabilities in
    float32."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n_batches = -(-len(windows) // batch_size)
    runs = batches(model.config, windows, batch_size, device)
    for kwargs, part in tqdm(runs, desc="perplexity", total=n_batches, disable=not progress):
        logits = model(**kwargs).logits[:, :-1].float()
        targets = kwargs["input_ids"][:, 1:]
        if isinstance(part, ImageTextBatch):
            scored = part.caption[:, 1:].to(device)
            logits, targets = logits[scored], targets[scored]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += targets.numel()
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(
            f"perplexity is not finite (mean NLL {mean}): the model outputs NaN/inf"
        )
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count)
