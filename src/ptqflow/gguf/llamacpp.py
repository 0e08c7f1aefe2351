"""llama.cpp itself, for what only it can say about a GGUF file: its own quantizer (the peer
for Q4_K_M, with and without an importance matrix), its perplexity on ptqflow's evaluation
windows, and its decode speed.

llama.cpp is not part of the default install: ``make llama-cpp`` builds it from the
llama-cpp-python source distribution on PyPI, which vendors llama.cpp: the tools
``llama-quantize``, ``llama-imatrix`` and ``llama-bench`` and the shared libraries, all in
``.venv/llama.cpp/build/bin``, and the ``llama_cpp`` Python bindings, which load those
libraries. ``PTQFLOW_LLAMA_CPP`` names another build's directory of tools and libraries.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

ENV = "PTQFLOW_LLAMA_CPP"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench")


def home(root: Path | None = None) -> Path:
    """The directory of llama.cpp's tools and libraries: ``$PTQFLOW_LLAMA_CPP`` or
    ``<root>/.venv/llama.cpp/build/bin``, refused unless it holds them."""
    root = root or Path(__file__).resolve().parents[3]
    where = Path(os.environ.get(ENV) or root / ".venv" / "llama.cpp" / "build" / "bin")
    missing = [t for t in TOOLS if not (where / t).is_file()]
    missing += [] if any(where.glob("libllama.*")) else ["libllama"]
    if missing:
        raise FileNotFoundError(
            f"llama.cpp is not built in {where} (missing {', '.join(missing)}): run "
            f"`make llama-cpp`, or point {ENV} at a directory holding its tools and libraries"
        )
    return where


def _run(args: list[str], what: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp {what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def quantize(
    where: Path, src: Path, dst: Path, kind: str, imatrix: Path | None = None, threads: int = 2
) -> Path:
    """llama.cpp's own quantization of the GGUF file ``src`` to type ``kind`` (``Q4_K_M``,
    ``Q4_1``, ...), with an importance matrix when given."""
    args = [str(where / "llama-quantize")]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    _run([*args, str(src), str(dst), kind, str(threads)], f"quantize to {kind}")
    return dst


def importance_matrix(
    where: Path, model: Path, text: Path, out: Path, ctx: int, threads: int = 2
) -> Path:
    """llama.cpp's importance matrix of ``model`` over the text file ``text`` (chunks of
    ``ctx`` tokens), written to ``out``."""
    args = [str(where / "llama-imatrix"), "-m", str(model), "-f", str(text)]
    args += ["-o", str(out), "-c", str(ctx), "-t", str(threads), "--no-ppl"]
    _run(args, "imatrix")
    return out


def bindings(where: Path):
    """The ``llama_cpp.Llama`` class, loading the libraries of the build ``where``."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(where)
    from llama_cpp import Llama

    return Llama


def perplexity(where: Path, model: Path, windows: torch.Tensor, threads: int = 2) -> float:
    """Perplexity of ``model`` as llama.cpp computes its logits, on ptqflow's windows
    (``int64 [n, seqlen]``): every next token of each window, the protocol of
    :func:`ptqflow.evaluate.perplexity`, with log-probabilities in float64."""
    Llama = bindings(where)  # noqa: N806 (a class)
    seqlen = windows.shape[1]
    llm = Llama(
        model_path=str(model),
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((logz - logits[np.arange(seqlen - 1), row[1:]]).sum())
        count += seqlen - 1
    llm.close()
    return math.exp(total / count)


def decode_speed(where: Path, model: Path, tokens: int = 64, threads: int = 2) -> float:
    """llama.cpp's decode tokens/s for ``model`` (``llama-bench``, no prompt, ``tokens``
    generated, mean of its repetitions)."""
    args = [str(where / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens)]
    out = _run([*args, "-t", str(threads), "-o", "json"], "bench")
    return float(json.loads(out)[0]["avg_ts"])
