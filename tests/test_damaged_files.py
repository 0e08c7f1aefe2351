"""Every damaged or foreign file is named, with what to do about it: a damaged safetensors file
(packed checkpoint, model weights, a search's partial block), a disk that fills while an artifact
is written (nothing half-written is left where a later stage would accept it), pickle model
weights (refused by the check stage, before torch.load would suggest ``weights_only=False``) and
a packed checkpoint whose ``quantization_config`` disagrees with its tensors."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose, tiny_overrides, tree_bytes
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_pack import plan_for
from transformers import AutoModelForCausalLM

from ptqflow import artifacts
from ptqflow.artifacts import DiskFullError, atomic_dir, atomic_write_text
from ptqflow.blockwise import BlockStore
from ptqflow.formats import FORMATS
from ptqflow.models import load_model, resolve_model
from ptqflow.pack import PackConfig, load_packed, packed_state_dict, save_packed
from ptqflow.pipeline import check, real_pack
from ptqflow.quant import QuantSpec

W4G32 = QuantSpec(4, 32)
REPACK = "rerun real-pack (`dvc repro real-pack`) if ptqflow wrote it, or download it again"
# What safetensors 0.8 raises when the disk fills under save_file (seen on a 64 KiB tmpfs): a
# SafetensorError, not an OSError, with the system error only in its text.
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"
FREE = 4096  # what free_bytes reports in these tests
ROOM = "Free space there, or point paths.artifacts / paths.reports at a disk with room, and rerun"


@pytest.fixture
def pack(tiny_model_dir, tmp_path):
    """``pack(fmt)``: the tiny Llama's decoder linears packed w4 g32 in format ``fmt`` (lm_head
    left in FP), in ``tmp_path / fmt``."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def make(fmt: str) -> Path:
        save_packed(model, None, plan_for(model, W4G32), PackConfig(format=fmt), tmp_path / fmt)
        return tmp_path / fmt

    return make


def damage_header(path: Path) -> None:
    """Overwrite the 8-byte header length with 2^64 - 1."""
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    "damage,reason",
    [
        (damage_header, "Error while deserializing header: header too large"),
        (
            lambda p: p.write_bytes(p.read_bytes()[:-100]),
            "Error while deserializing header: incomplete metadata, file not fully covered",
        ),
    ],
    ids=["header", "truncated"],
)
def test_a_damaged_packed_checkpoint_is_named(pack, damage, reason):
    ckpt = pack("awq")
    weights = ckpt / "model.safetensors"
    damage(weights)
    with pytest.raises(ValueError) as e:
        load_packed(ckpt)
    assert str(e.value) == (
        f"{weights} is not a readable safetensors file ({reason}); the checkpoint is damaged: "
        f"{REPACK}"
    )


def test_a_damaged_packed_config_is_named(pack):
    ckpt = pack("awq")
    (ckpt / "config.json").write_text("{")
    with pytest.raises(ValueError) as e:
        load_packed(ckpt)
    assert str(e.value) == (
        f"{ckpt / 'config.json'} is not readable JSON (Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1)); {REPACK}"
    )


def test_a_damaged_model_file_says_what_to_do(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    damage_header(weights)
    with pytest.raises(ValueError) as e:
        resolve_model(str(model))
    assert str(e.value) == (
        f"{weights} is not a readable safetensors file (its header claims "
        f"18,446,744,073,709,551,615 bytes, the file has {weights.stat().st_size:,}); copy or "
        "download it again"
    )


def test_a_damaged_partial_block_is_named(tmp_path):
    store = BlockStore(tmp_path / "scales", {"run": 1})
    store.save(0, {"alpha": torch.ones(4)}, {"groups": "[]"})
    block = tmp_path / ".scales.partial" / "block_000.safetensors"
    damage_header(block)
    with pytest.raises(ValueError) as e:
        store.load(0)
    assert str(e.value) == (
        f"{block} is not a readable safetensors file (Error while deserializing header: header "
        "too large); delete it to search block 0 again (the other blocks' results are kept)"
    )


# ----------------------------------------------------------------------------- full disks


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk()``: from now on ``safetensors.torch.save_file`` writes half its file and
    fails as on a full disk. Returns what it saw: ``tensor_bytes``, ``need`` (those plus the
    files already beside it: what the output needed when the disk filled) and ``file``."""
    seen = {}

    def save_file(tensors, filename, metadata=None):
        path = Path(filename)
        tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        beside = sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file())
        seen.update(tensor_bytes=tensor_bytes, need=tensor_bytes + beside, file=path)
        path.write_bytes(b"\0" * (tensor_bytes // 2))
        raise SafetensorError(ENOSPC_TEXT)

    def arm() -> dict:
        monkeypatch.setattr("safetensors.torch.save_file", save_file)
        monkeypatch.setattr(artifacts, "free_bytes", lambda path: FREE)
        return seen

    return arm


def test_a_full_disk_while_packing_leaves_no_weights(tiny_model_dir, tmp_path, full_disk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = plan_for(model, W4G32)
    state = packed_state_dict(model, plan, FORMATS["awq"], torch.float16)
    need = sum(t.numel() * t.element_size() for t in state.values())
    out = tmp_path / "packed"
    seen = full_disk()
    with pytest.raises(DiskFullError) as e:
        save_packed(model, None, plan, PackConfig(format="awq"), out)
    assert e.value.errno == errno.ENOSPC and seen["tensor_bytes"] == need
    assert str(e.value) == (
        f"No space left on device writing {out / 'model.safetensors'}: it needs about "
        f"{need:,} bytes and {out} has {FREE:,} free; nothing half-written was kept. {ROOM}"
    )
    # the half-written temporary file is gone, and without weights nothing loads the directory
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json"]
    with pytest.raises(FileNotFoundError, match="is not a packed checkpoint"):
        load_packed(out)


def test_a_full_disk_during_real_pack_keeps_the_previous_output(tiny_cfg, tmp_path, full_disk):
    cfg = tiny_cfg("pack.method=rtn")
    real_pack.run(cfg)
    packed = tmp_path / "artifacts" / "packed"
    before = tree_bytes(packed)
    seen = full_disk()
    with pytest.raises(DiskFullError) as e:
        real_pack.run(cfg)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (
        f"No space left on device writing {packed}: it needs about {seen['need']:,} bytes and "
        f"{packed.parent} has {FREE:,} free; nothing half-written was kept. {ROOM}"
    )
    assert seen["file"].parent.name.startswith(".packed.tmp-")  # it wrote into a temporary dir
    assert tree_bytes(packed) == before
    assert sorted(p.name for p in packed.parent.iterdir()) == ["packed"]


class OverQuota:
    """A file opened for writing whose first write stores 3 bytes, then hits the quota."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        self.f.write(data[:3])
        raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_a_quota_hit_while_writing_a_report_keeps_the_old_one(tmp_path, monkeypatch):
    report = tmp_path / "reports" / "eval.json"
    atomic_write_text(report, '{"old": true}\n')
    real_open = Path.open

    def open_over_quota(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return OverQuota(f) if "w" in mode else f

    monkeypatch.setattr(Path, "open", open_over_quota)
    monkeypatch.setattr(artifacts, "free_bytes", lambda path: FREE)
    text = '{"new": true}\n'
    with pytest.raises(DiskFullError) as e:
        atomic_write_text(report, text)
    monkeypatch.undo()
    assert e.value.errno == errno.EDQUOT
    assert str(e.value) == (
        f"Disk quota exceeded writing {report}: it needs about {len(text):,} bytes and "
        f"{report.parent} has {FREE:,} free; nothing half-written was kept. {ROOM}"
    )
    assert report.read_text() == '{"old": true}\n'
    assert [p.name for p in report.parent.iterdir()] == ["eval.json"]


def test_a_full_disk_in_an_output_directory_names_it(tmp_path, monkeypatch):
    """A plain write (not safetensors) that fills the disk: what was written is a lower bound."""
    monkeypatch.setattr(artifacts, "free_bytes", lambda path: FREE)
    target = tmp_path / "artifacts" / "calib"
    with pytest.raises(DiskFullError) as e, atomic_dir(target) as tmp:
        (tmp / "tokens.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == (
        f"No space left on device writing {target}: it needs at least 1,000 bytes and "
        f"{target.parent} has {FREE:,} free; nothing half-written was kept. {ROOM}"
    )
    assert list(target.parent.iterdir()) == []


# ----------------------------------------------------------------------------- pickle weights


PICKLE_FIX = (
    "convert to safetensors (e.g. load it yourself in a trusted environment and "
    "save_pretrained(..., safe_serialization=True))"
)


@pytest.mark.parametrize(
    "files",
    [("pytorch_model.bin",), ("training_args.bin", "pytorch_model-00001-of-00002.bin"), ("w.pt",)],
    ids=["bin", "shards", "pt"],
)
def test_pickle_weights_are_refused_by_the_check_stage(tiny_model_dir, texts, tmp_path, files):
    model = shutil.copytree(
        tiny_model_dir, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors")
    )
    state = load_file(tiny_model_dir / "model.safetensors")
    for name in files:
        torch.save(state, model / name)
    with pytest.raises(ValueError) as e:
        check.run(compose(tiny_overrides(model, texts, tmp_path)))
    named = model / files[-1]  # the weights, not training_args.bin
    assert str(e.value) == f"pickle checkpoints are refused: {named}; {PICKLE_FIX}"
    assert not (tmp_path / "reports" / "check.json").exists()


def test_safetensors_beside_pickle_weights_are_what_loads(tiny_model_dir, tmp_path):
    """transformers loads model.safetensors in preference to pytorch_model.bin, which it never
    opens: a garbage .bin beside it changes nothing."""
    both = shutil.copytree(tiny_model_dir, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"not a pickle")
    model = load_model(resolve_model(str(both)))
    embed = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, embed)


# ----------------------------------------------------------------------------- config vs tensors


def _set(*keys_and_value):
    """An edit of ``quantization_config``: set the value at the key path."""
    *keys, last, value = keys_and_value

    def edit(qc: dict) -> None:
        for key in keys:
            qc = qc[key]
        qc[last] = value

    return edit


AWQ_DOWN = "qweight [128, 8], qzeros [4, 8], scales [4, 64]"
PTQ_O = "qweight [64, 8], qzeros [2, 8], scales [2, 64]"
CT_DOWN = "weight_packed [64, 16], weight_scale [64, 4], weight_zero_point [8, 4], weight_shape [2]"
DOWN, O_PROJ = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"


@pytest.mark.parametrize(
    "fmt,edit,layer,said,shapes",
    [
        ("awq", _set("group_size", 64), DOWN, "4-bit, group size 64", AWQ_DOWN),
        (
            "ptqflow",
            _set("modules", O_PROJ, "group_size", 64),
            O_PROJ,
            "4-bit, group size 64",
            PTQ_O,
        ),
        ("ptqflow", _set("modules", O_PROJ, "bits", 3), O_PROJ, "3-bit, group size 32", PTQ_O),
        (
            "compressed-tensors",
            _set("config_groups", "group_0", "weights", "group_size", 64),
            DOWN,
            "4-bit, group size 64",
            CT_DOWN,
        ),
        (
            "compressed-tensors",
            _set("config_groups", "group_0", "weights", "num_bits", 8),
            DOWN,
            "8-bit, group size 32",
            CT_DOWN,
        ),
    ],
    ids=["awq-group", "ptqflow-group", "ptqflow-bits", "ct-group", "ct-bits"],
)
def test_a_config_that_disagrees_with_the_tensors_is_refused(pack, fmt, edit, layer, said, shapes):
    ckpt = pack(fmt)
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        load_packed(ckpt)
    assert str(e.value) == (
        f"checkpoint '{ckpt}': its config.json says '{layer}' is {said}, but its tensors imply "
        f"4-bit, group size 32 ({shapes}); loaders that trust the config would misread it: "
        f"{REPACK}"
    )
