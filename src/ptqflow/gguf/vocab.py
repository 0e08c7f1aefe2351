"""The tokenizer inside a GGUF file (``tokenizer.*`` keys): copied from a GGUF source as it is
(with the keys that describe the model: licence, origin), or written from a transformers
byte-level BPE tokenizer.

llama.cpp splits text before BPE with a regex it picks by the name in ``tokenizer.ggml.pre``;
no tokenizer file says which name fits, so a transformers source needs it given
(``gguf.pre_tokenizer``), where a GGUF source already carries it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import GGUFValueType, TokenType

Value = tuple[object, GGUFValueType, GGUFValueType | None]  # value, type, array element type


# general.* keys that describe the model (licence, origin, languages), copied from a GGUF
# source; the rest (architecture, name, file type, quantization version) are the export's own.
OWN_KEYS = (
    "general.architecture",
    "general.name",
    "general.file_type",
    "general.alignment",
    "general.quantization_version",
)


def copied(source: Path) -> dict[str, Value]:
    """Every ``tokenizer.*`` key of the GGUF file ``source``, and the ``general.*`` keys that
    describe the model (its licence among them), with their types."""
    reader = gguf.GGUFReader(source)
    out: dict[str, Value] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key.startswith("general.") and key not in OWN_KEYS:
            kind = GGUFValueType(field.types[0])
            sub = GGUFValueType(field.types[-1]) if kind == GGUFValueType.ARRAY else None
            out[key] = (field.contents(), kind, sub)
    if "tokenizer.ggml.model" not in out:
        raise ValueError(f"GGUF source '{source}' holds no tokenizer (tokenizer.ggml.model)")
    return out


def from_transformers(tokenizer, vocab_size: int, pre_tokenizer: str | None) -> dict[str, Value]:
    """The ``tokenizer.*`` keys of a transformers fast tokenizer whose model is byte-level BPE
    (llama.cpp's ``gpt2`` tokenizer model), padded with unused tokens up to the embedding's
    ``vocab_size`` rows; other tokenizer models are refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec):
        kind = model.get("type", type(tokenizer).__name__)
        raise ValueError(
            f"tokenizer model '{kind}' is not written to GGUF by ptqflow; it writes byte-level BPE "
            "tokenizers (llama.cpp's gpt2 model) or copies a GGUF source's tokenizer"
        )
    if not pre_tokenizer:
        raise ValueError(
            "gguf.pre_tokenizer is not set: llama.cpp picks its pre-tokenizer regex by name "
            "(e.g. llama-bpe, qwen2, smollm, gpt-2: the name llama.cpp's converter gives this "
            "tokenizer); set gguf.pre_tokenizer=<name>"
        )
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens, more than the model's {vocab_size} rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    # added tokens marked special are control tokens (as llama.cpp's converter marks them)
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    types = [
        TokenType.CONTROL
        if i in special
        else TokenType.USER_DEFINED
        if i in added
        else TokenType.NORMAL
        for i in range(n)
    ]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [TokenType.UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    s, i32, arr = GGUFValueType.STRING, GGUFValueType.INT32, GGUFValueType.ARRAY
    out: dict[str, Value] = {
        "tokenizer.ggml.model": ("gpt2", s, None),
        "tokenizer.ggml.pre": (pre_tokenizer, s, None),
        "tokenizer.ggml.tokens": (tokens, arr, s),
        "tokenizer.ggml.token_type": ([int(t) for t in types], arr, i32),
        "tokenizer.ggml.merges": (merges, arr, s),
    }
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        key = {"unk": "unknown", "pad": "padding"}.get(role, role)
        if token_id is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = (int(token_id), GGUFValueType.UINT32, None)
    adds_bos = tokenizer.bos_token_id is not None and (
        tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    )
    out["tokenizer.ggml.add_bos_token"] = (adds_bos, GGUFValueType.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out["tokenizer.chat_template"] = (template, s, None)
    return out


def _byte_level(spec: dict) -> bool:
    """Whether the tokenizer's pre-tokenizer maps bytes to printable characters (GPT-2's
    byte-level scheme, which llama.cpp's gpt2 model assumes)."""
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "ByteLevel" in text
