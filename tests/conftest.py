"""Shared fixtures: a tiny random Llama with a locally built tokenizer, small seeded texts, and
the real Hydra config composed with overrides that point at them. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in its interpreter on the CPU. The setting must exist before
# the first @triton.jit function is defined; ptqflow.kernels imports its kernels lazily.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

WORDS = (
    "the of and a to in is was for on as with by at from his her an were are which this that "
    "city river music war king film team school house light water stone north south early "
    "later first second year century people world state army church"
).split()


def make_text(seed: int, n_docs: int, min_words: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(min_words, max_words)
        docs.append(" ".join(rng.choice(WORDS) for _ in range(n)) + ".")
    return docs


def build_tokenizer(out_dir: Path, special: tuple[str, ...] = ()):
    """A word-level tokenizer over ``WORDS``; ``special`` tokens go at the end of the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", ".", *WORDS, *special])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.save_pretrained(out_dir)
    return fast


def bpe_tokenizer(out_dir):
    """A byte-level BPE tokenizer (llama.cpp's gpt2 model) trained on the test words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_text(3, 200, 5, 30) + [" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    fast.save_pretrained(out_dir)
    return fast


# The decoder of every tiny test model: 2 blocks, hidden 64.
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def tiny_llama(vocab_size: int, **overrides):
    """A 2-layer random Llama (hidden 64), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        **TINY_DECODER,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


VLM_KINDS = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3")


def tiny_vlm_config(kind: str, vocab_size: int, image_token: int, **extra):
    """A tiny vision-language config (2 decoder blocks, hidden 64; a 2-layer vision tower):
    ``llava`` (CLIP + Llama; 32-pixel images, 16 tokens), ``qwen2_vl`` and ``qwen2_5_vl`` (128
    pixels, 64 tokens) or ``idefics3`` (SmolVLM; 64 pixels, 16 tokens)."""
    from transformers import Idefics3Config, LlavaConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=vocab_size, **TINY_DECODER, max_position_embeddings=512)
    text.update(bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llava":
        return LlavaConfig(
            text_config={"model_type": "llama", **text},
            vision_config={
                "model_type": "clip_vision_model",
                **vision,
                "image_size": 32,
                "patch_size": 8,
            },
            image_token_index=image_token,
            vision_feature_layer=-1,
        )
    if kind in ("qwen2_vl", "qwen2_5_vl"):  # the same patch grid; the towers differ
        grid = dict(depth=2, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        if kind == "qwen2_vl":
            cls, tower = Qwen2VLConfig, dict(embed_dim=32, hidden_size=64, mlp_ratio=2)
        else:
            cls, tower = (
                Qwen2_5_VLConfig,
                dict(
                    hidden_size=32,
                    intermediate_size=64,
                    out_hidden_size=64,
                    window_size=32,
                    fullatt_block_indexes=[1],
                ),
            )
        return cls(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
            vision_config={**grid, **tower},
            image_token_id=image_token,
            **extra,
        )
    if kind == "idefics3":
        return Idefics3Config(
            text_config={"model_type": "llama", **text},
            vision_config={**vision, "image_size": 64, "patch_size": 8},
            scale_factor=2,
            image_token_id=image_token,
        )
    raise ValueError(kind)


VLM_SPECIAL = ("<image>", "<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>")


def build_tiny_vlm(out_dir: Path, kind: str) -> Path:
    """A tiny random VLM of ``kind`` with its tokenizer (``VLM_SPECIAL`` tokens added), seeded,
    saved like a hub checkpoint; its decoder norms amplify a few channels as in
    ``outlier_model_dir``, and its projector a few others, so the scale search has outliers to
    work on and the vision tokens' differ from the text tokens' (as in real VLMs)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ptqflow.models import get_architecture

    tok = build_tokenizer(out_dir, VLM_SPECIAL)
    ids = tok.convert_tokens_to_ids(list(VLM_SPECIAL))
    extra = {"vision_start_token_id": ids[1], "vision_end_token_id": ids[2]}
    config = tiny_vlm_config(kind, len(tok), ids[0], **(extra if "qwen" in kind else {}))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for layer in get_architecture(config.model_type).blocks(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 51]] *= 30
        model.get_submodule(VLM_PROJECTOR[kind]).weight[[5, 22, 33]] *= 30
    model.save_pretrained(out_dir)
    return out_dir


# The last linear of each tiny VLM's projector (vision features -> decoder width).
VLM_PROJECTOR = {
    "llava": "model.multi_modal_projector.linear_2",
    "qwen2_vl": "model.visual.merger.mlp.2",
    "qwen2_5_vl": "model.visual.merger.mlp.2",
    "idefics3": "model.connector.modality_projection.proj",
}


def build_tiny_llama(out_dir: Path, vocab_size: int, **overrides) -> None:
    tiny_llama(vocab_size, **overrides).save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) with its tokenizer, saved like a hub checkpoint."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out)
    build_tiny_llama(out, vocab_size=len(tok))
    return out


@pytest.fixture(scope="session")
def outlier_model_dir(tmp_path_factory):
    """The tiny Llama with a few input channels of every linear amplified 30x by the norms:
    the activation outliers of real LLMs, which AWQ's scales exist for (a plain random model
    has none, and there AWQ has nothing to gain over RTN)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("outlier-llama")
    build_tiny_llama(out, vocab_size=len(build_tokenizer(out)))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 51]] *= 30
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """A calibration JSONL (60 short documents) and an evaluation .txt."""
    out = tmp_path_factory.mktemp("texts")
    calib = out / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": d}) for d in make_text(1, 60, 5, 40)) + "\n")
    ev = out / "eval.txt"
    ev.write_text("\n\n".join(make_text(2, 40, 20, 60)) + "\n")
    return {"calib": calib, "eval": ev}


def compose(overrides: list[str]) -> dict:
    """The real config from conf/, with overrides, as plain types (what stages receive)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_overrides(model_dir: Path, texts: dict[str, Path], work: Path) -> list[str]:
    return [
        "model=local",
        f"model.source={model_dir}",
        f"calib.source={texts['calib']}",
        "calib.n_samples=40",
        "calib.seqlen=32",
        f"eval.source={texts['eval']}",
        "eval.seqlen=32",
        "eval.n_windows=6",
        "eval.batch_size=2",
        "quant.group_size=32",
        # its word-level tokenizer is not one llama.cpp reads (tests/test_gguf.py exports)
        "gguf.enabled=false",
        f"paths.artifacts={work / 'artifacts'}",
        f"paths.reports={work / 'reports'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]


def run_sweep(script: str, args: list[str], model_dir: Path, texts, work: Path) -> None:
    """Run ``stages/<script> --multirun <args>`` on the tiny model from the command line, in
    ``work`` (sweep directory ``work/multirun``); ``args`` replace the tiny overrides of the
    same keys."""
    import subprocess
    import sys

    keys = {a.split("=", 1)[0] for a in args}
    base = [o for o in tiny_overrides(model_dir, texts, work) if o.split("=", 1)[0] not in keys]
    cmd = [
        sys.executable,
        str(ROOT / "stages" / script),
        "--multirun",
        *args,
        f"hydra.sweep.dir={work / 'multirun'}",
        *base,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def tiny_cfg(tiny_model_dir, texts, tmp_path):
    """Compose the real config pointed at the tiny model, texts and a scratch work dir."""

    def make(*extra: str) -> dict:
        return compose(tiny_overrides(tiny_model_dir, texts, tmp_path) + list(extra))

    return make


def as_stored(model, plan):
    """``model`` fake-quantized by ``plan`` with every value rounded as a checkpoint stores it
    (fp16 scales, fp16 unquantized tensors): the function a packed checkpoint must compute."""
    import torch

    from ptqflow.formats import IntWeight

    with torch.no_grad():
        for name, spec in plan.items():
            if spec is not None:
                layer = model.get_submodule(name)
                iw = IntWeight.from_weight(layer.weight, spec)
                iw.scales = iw.scales.half().float()
                layer.weight = torch.nn.Parameter(iw.dequantize().t().contiguous())
        for name, p in model.named_parameters():
            if plan.get(name.removesuffix(".weight")) is None:
                p.copy_(p.half().float())
    return model


def max_logit_diff(a, b, ids) -> float:
    """Max |logit difference| of two causal LMs on ``ids``."""
    import torch

    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def tree_bytes(path) -> dict:
    """Every file under ``path`` with its bytes, by relative path."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in files}
