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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ptqflow.blockwise import block_inputs, fed_top, first_output
from ptqflow.models.blockload import BlockWeights
from ptqflow.multimodal import ImageTextBatch, batches


def _encode(tokenizer, docs: list[str]) -> list[int]:
    return tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]


def eval_windows(docs: Iterable[str], tokenizer, seqlen: int, n_windows: int) -> torch.Tensor:
    """Token windows ``int64 [n_windows, seqlen]`` per the protocol: the first
    ``need = n_windows * seqlen`` tokens of all of ``docs`` joined, taking from ``docs`` (a
    list, or an iterator such as :func:`ptqflow.text.stream_documents`) only what they need.

    The rule that keeps these the tokens of the whole text: documents are joined in order
    until the tokens of the joined prefix exceed ``need`` (it is tokenized each time its
    characters double, so the work stays linear), then one more whole document is added, and
    that text is tokenized and cut to ``need``. A tokenizer forms each token from a stretch of
    text around it (a pre-tokenized word, punctuation run or whitespace run), so text past
    the end changes only the tokens at the end: where the joined prefix stops, its last token
    could merge with the ``"\\n\\n"`` or the document that follow in the whole text (and the
    windows may end on that token, as the prefix has only more than ``need``); the one more
    document moves the end, and whatever changes there, past the windows. With no document
    left, the text is all of ``docs``, tokenized exactly as a whole.

    Raises:
        ValueError: the text holds fewer than ``need`` tokens.
    """
    need = n_windows * seqlen
    rest = iter(docs)
    taken: list[str] = []
    chars, probe = 0, need  # tokenize the prefix once it holds `probe` characters
    ids, encoded = [], 0  # the tokens of the first `encoded` documents joined
    for doc in rest:
        taken.append(doc)
        chars += len(doc) + 2
        if chars < probe:
            continue
        ids, encoded = _encode(tokenizer, taken), len(taken)
        if len(ids) > need:
            one_more = next(rest, None)
            if one_more is not None:
                taken.append(one_more)
            break
        probe = 2 * chars
    if encoded < len(taken):
        ids = _encode(tokenizer, taken)
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
    n_batches = -(-len(windows) // batch_size)
    runs = batches(model.config, windows, batch_size, device)
    scored = [
        _nll(model(**kwargs).logits, kwargs, part)
        for kwargs, part in tqdm(runs, desc="perplexity", total=n_batches, disable=not progress)
    ]
    return _result(scored)


@torch.no_grad()
def perplexity_blockwise(
    model: nn.Module,
    weights: BlockWeights,
    windows: torch.Tensor | ImageTextBatch,
    batch_size: int = 4,
    prepare: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """:func:`perplexity` with one decoder block's weights in memory at a time: ``model`` from
    :func:`~ptqflow.models.blockload.open_blockwise` with its head, its blocks read from
    ``weights``. Every batch's hidden states go through block ``i`` (read, then
    ``prepare(i, block)``: quantized, say; then released) before block ``i + 1``; the head
    scores the last block's output. The same batches and the same operations on each as
    :func:`perplexity`. Holds the hidden states of all windows (``n_windows x seqlen x
    hidden`` in the model's dtype) besides one block."""
    device = next(p for p in model.parameters() if not p.is_meta).device
    arch = weights.arch
    blocks = arch.blocks(model)
    runs = list(batches(model.config, windows, batch_size, device))
    states = [block_inputs(model, arch, kwargs) for kwargs, _ in runs]
    hidden, given = [x for x, _ in states], [kw for _, kw in states]
    for i, block in enumerate(tqdm(blocks, desc="perplexity", unit="block", disable=not progress)):
        weights.load(i, block, device)
        if prepare is not None:
            prepare(i, block)
        hidden = [first_output(block(x, **kw[i])) for x, kw in zip(hidden, given, strict=True)]
        weights.release(block)
    scored = []
    for (kwargs, part), h in zip(runs, hidden, strict=True):
        with fed_top(blocks, h):
            scored.append(_nll(model(**kwargs).logits, kwargs, part))
    return _result(scored)


def _nll(logits: torch.Tensor, kwargs: dict, part) -> tuple[float, int]:
    """The summed next-token NLL (float32 log-probabilities) of one batch and its count."""
    logits, targets = logits[:, :-1].float(), kwargs["input_ids"][:, 1:]
    if isinstance(part, ImageTextBatch):
        scored = part.caption[:, 1:].to(logits.device)
        logits, targets = logits[scored], targets[scored]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


def _result(scored: list[tuple[float, int]]) -> PerplexityResult:
    total, count = 0.0, 0
    for nll, n in scored:  # summed in batch order
        total += nll
        count += n
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(
            f"perplexity is not finite (mean NLL {mean}): the model outputs NaN/inf"
        )
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count)
