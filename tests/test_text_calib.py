import json

import pytest
import torch
from conftest import build_tokenizer, make_text

from ptqflow.calib import build_blocks, load_blocks, save_blocks
from ptqflow.text import check_source, load_documents, wiki_pool


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_blocks_are_deterministic_to_the_byte(tokenizer, tmp_path):
    docs = make_text(0, 50, 3, 30)
    files = []
    for i in range(2):
        blocks, _ = build_blocks(docs, tokenizer, n_samples=30, seqlen=16, seed=7)
        (tmp_path / str(i)).mkdir()
        files.append(save_blocks(blocks, tmp_path / str(i)).read_bytes())
    assert files[0] == files[1]
    other, _ = build_blocks(docs, tokenizer, n_samples=30, seqlen=16, seed=8)
    assert not torch.equal(other, load_blocks(tmp_path / "0"))


def test_llm_awq_recipe_skips_long_documents_and_recuts(tokenizer):
    docs = ["city " * 40, "river king", "war film team", "north south"]
    blocks, stats = build_blocks(docs, tokenizer, n_samples=10, seqlen=4, seed=0)
    assert stats.documents_too_long == 1
    assert stats.documents_kept == 3
    assert stats.tokens == 7 and stats.blocks == 1
    assert blocks.shape == (1, 4) and blocks.dtype == torch.int64
    # n_samples counts kept documents: stop after the first kept one
    _, one = build_blocks(["a b c d", "the of and"], tokenizer, n_samples=1, seqlen=4, seed=0)
    assert one.documents_kept == 1


def test_too_little_text_for_a_block_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"no block of seqlen=64 tokens.*lower calib.seqlen"):
        build_blocks(["river king"] * 3, tokenizer, n_samples=3, seqlen=64, seed=0)


def test_text_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\nstill one\n\n\n second doc \n")
    assert load_documents(str(tmp_path / "a.txt")) == ["one doc\nstill one", "second doc"]
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "x"}) + "\n\n" + json.dumps({"body": "y"})
    )
    assert load_documents(str(tmp_path / "b.jsonl"), text_field="body") == ["x", "y"]
    (tmp_path / "c.json").write_text(json.dumps(["p", "", "q"]))
    assert load_documents(str(tmp_path / "c.json")) == ["p", "q"]


def test_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="contains no text"):
        load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        check_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="no string field 'text'"):
        load_documents(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported text file type"):
        load_documents(str(tmp_path / "e.csv"))
    with pytest.raises(ValueError, match=r"unknown embedded wiki source.*\['calib', 'eval'\]"):
        check_source("wiki:train")
    with pytest.raises(ValueError, match=r"language of \['en', 'es', 'fr'\]"):
        check_source("wiki-de:eval")


def test_french_wiki_pool_is_french_and_apart_from_english():
    fr = load_documents("wiki-fr:eval")
    assert set(fr).isdisjoint(wiki_pool("eval"))
    assert sum(" est " in d or " les " in d for d in fr[:200]) > 150  # French, not English


def test_embedded_wiki_pools_split_by_title_parity():
    calib, ev = wiki_pool("calib"), wiki_pool("eval")
    assert len(calib) + len(ev) == 10033
    assert len(calib) - len(ev) == 1
    assert not set(calib) & set(ev)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot load hub dataset .* offline"):
        load_documents("hf:someone/no-such-dataset-xyz")
