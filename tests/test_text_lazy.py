"""Text sources read lazily give what reading them whole gives: the document index of a .txt or
.jsonl file (calibration) lists exactly ``load_documents``' documents, and the evaluation
windows read from a prefix of the documents are the windows of the whole text. Expected values
are computed here the old way (everything read, joined, tokenized), not by the new helpers."""

from __future__ import annotations

import json
import random
import tracemalloc
from contextlib import closing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, build_tokenizer, make_text

from ptqflow import text
from ptqflow.calib import build_blocks
from ptqflow.evaluate import eval_windows
from ptqflow.text import (
    Documents,
    IndexedDocuments,
    load_documents,
    open_documents,
    stream_documents,
)

LIMIT = 300  # MAX_DOC_CHARS in these tests


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def sample_docs(seed: int) -> list[str]:
    """Documents of every kind: multi-line, padded, empty, whitespace-only (ASCII and Unicode),
    non-ASCII, and one over ``LIMIT`` characters."""
    rng = random.Random(seed)
    words = make_text(seed, 80, 1, 12)
    docs = []
    for i, w in enumerate(words):
        kind = rng.random()
        if kind < 0.1:
            docs.append("")
        elif kind < 0.2:
            docs.append(rng.choice([" ", "\t  ", "\u3000", "\xa0 \x0c"]))
        elif kind < 0.35:
            docs.append(f"  {w}\n  {words[(i + 1) % len(words)]} \u00e9t\u00e9 \u4e2d\U0001f600 ")
        else:
            docs.append(w)
    docs.insert(37, "river " * 100)  # 600 characters: too long
    return docs


def expected(docs: list[str]) -> list[str]:
    return [d.strip() for d in docs if d.strip() and len(d) < LIMIT]


def write_source(path: Path, docs: list[str], newline: str) -> None:
    """``docs`` as a .txt (blank lines between documents) or .jsonl (blank lines among the
    rows), every line ended by ``newline``."""
    if path.suffix == ".txt":
        body = "\n\n".join(docs) + "\n"
    else:
        rows = [json.dumps({"text": d}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
        body = "\n".join(r + ("\n" if i % 9 == 4 else "") for i, r in enumerate(rows))
    path.write_bytes(body.replace("\n", newline).encode("utf-8"))


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_the_index_of_a_file_lists_exactly_load_documents(
    tmp_path, monkeypatch, caplog, suffix, newline
):
    monkeypatch.setattr(text, "MAX_DOC_CHARS", LIMIT)
    monkeypatch.setattr(text, "PIECE", 7)  # lines, \r\n and UTF-8 sequences cut across pieces
    docs = sample_docs(3)
    source = tmp_path / f"docs{suffix}"
    write_source(source, docs, newline)
    want = expected(docs)
    assert load_documents(str(source)) == want
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptqflow.text"), open_documents(str(source)) as index:
        assert isinstance(index, IndexedDocuments)
        assert len(index) == len(want)
        assert [index[i] for i in range(len(index))] == want
        order = random.Random(0).sample(range(len(want)), len(want))
        assert [index[i] for i in order] == [want[i] for i in order]
        assert index[-1] == want[-1]
        with pytest.raises(IndexError):
            index[len(want)]
    assert f"skipped 1 document(s) over {LIMIT} characters" in caplog.text


def test_other_sources_are_documents_in_memory(tmp_path):
    whole = tmp_path / "rows.json"
    whole.write_text(json.dumps(["a b", " ", "c d "]))
    with open_documents(str(whole)) as docs:
        assert type(docs) is Documents and list(docs) == ["a b", "c d"]
    assert type(open_documents("wiki:eval")) is Documents


def test_no_text_and_a_changed_file_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": " "}\n\n{"text": ""}\n')
    with pytest.raises(ValueError, match="contains no text"):
        open_documents(str(empty))
    with pytest.raises(ValueError, match="contains no text"):
        list(stream_documents(str(empty)))
    source = tmp_path / "a.txt"
    source.write_text("one\n\ntwo\n")
    index = open_documents(str(source))
    source.write_text("one\n\ntwo, changed\n")
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        index[1]


def test_indexing_holds_no_more_than_offsets(tmp_path, monkeypatch):
    """A 5 MB file of 40,000 documents: indexing it holds the offsets and one piece, not the
    text."""
    monkeypatch.setattr(text, "PIECE", 65_536)
    source = tmp_path / "many.jsonl"
    with source.open("w") as f:
        for i in range(40_000):
            f.write(json.dumps({"text": f"document {i} " + "x" * 100}) + "\n")
    tracemalloc.start()
    index = open_documents(str(source))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(index) == 40_000 and index[12345] == "document 12345 " + "x" * 100
    assert peak < 2_000_000, f"peak {peak} bytes indexing a {source.stat().st_size}-byte file"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_are_the_same_from_a_list_and_from_the_index(tokenizer, tmp_path, seed):
    docs = make_text(seed, 120, 1, 30)
    docs[5] = docs[40] = ""  # empty rows are not documents
    docs[17] = "city " * 40  # longer than seqlen: skipped by the recipe
    source = tmp_path / "calib.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    listed = [d for d in docs if d]
    for n_samples, seqlen in [(30, 16), (200, 8), (5, 32)]:
        want, want_stats = build_blocks(listed, tokenizer, n_samples, seqlen, seed)
        with open_documents(str(source)) as index:
            got, got_stats = build_blocks(index, tokenizer, n_samples, seqlen, seed)
        assert torch.equal(got, want) and got_stats == want_stats


def boundary_tokenizer():
    """A BPE whose punctuation pre-token takes the line ends after it (as Llama 3's does):
    ``"ab!!"`` is ``a b ! !`` but ``"ab!!\\n\\ncd"`` is ``a b !!\\n\\n c d``, so the tokens at
    the end of a prefix of the text differ from those of the whole text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "!", "\n", *"abcdef", "\n\n", "!\n\n", "!!\n\n"]
    merges = [("\n", "\n"), ("!", "\n\n"), ("!", "!\n\n")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\p{L}+|[^\s\p{L}]+[\r\n]*|\s+"), behavior="isolated"
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_windows_from_a_prefix_are_those_of_the_whole_text(tmp_path):
    tok = boundary_tokenizer()
    rng = random.Random(5)
    docs = ["".join(rng.choices("abcdef", k=rng.randint(1, 4))) + "!!" for _ in range(150)]
    docs[::7] = ["!!"] * len(docs[::7])
    source = tmp_path / "eval.txt"
    source.write_text("\n\n".join(docs) + "\n")

    def encode(parts: list[str]) -> list[int]:
        return tok("\n\n".join(parts), add_special_tokens=False)["input_ids"]

    whole = encode(docs)  # the old way: every document, joined, tokenized once
    prefix_matters = read_less = 0
    for seqlen in (1, 3, 8):
        for n_windows in range(1, len(whole) // seqlen + 1, 2):
            need = n_windows * seqlen
            read = 0

            def counted(it):
                nonlocal read
                for doc in it:
                    read += 1
                    yield doc

            with closing(stream_documents(str(source))) as stream:
                got = eval_windows(counted(stream), tok, seqlen, n_windows)
            want = torch.tensor(whole[:need]).reshape(n_windows, seqlen)
            assert torch.equal(got, want), (seqlen, n_windows)
            read_less += read < len(docs)
            # the shortest prefix with more than `need` tokens, cut without one more document
            k = next(k for k in range(1, len(docs) + 1) if len(encode(docs[:k])) > need)
            prefix_matters += encode(docs[:k])[:need] != whole[:need]
    assert read_less > 100 and prefix_matters > 10, (read_less, prefix_matters)
    with pytest.raises(ValueError, match=rf"has {len(whole)} tokens, fewer than"):
        eval_windows(stream_documents(str(source)), tok, 1, len(whole) + 1)


def test_the_default_windows_and_blocks_are_unchanged(tokenizer):
    """The embedded default (conf/eval/wiki.yaml, conf/calib/wiki.yaml) with the tests'
    tokenizer: windows and blocks as the whole text, read the old way, gives them."""
    ev = yaml.safe_load((ROOT / "conf/eval/wiki.yaml").read_text())
    docs = load_documents(ev["source"])
    need = ev["n_windows"] * ev["seqlen"]
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"][:need]
    want = torch.tensor(ids).reshape(ev["n_windows"], ev["seqlen"])
    with closing(stream_documents(ev["source"])) as stream:
        got = eval_windows(stream, tokenizer, ev["seqlen"], ev["n_windows"])
    assert torch.equal(got, want)

    calib = yaml.safe_load((ROOT / "conf/calib/wiki.yaml").read_text())
    args = (tokenizer, calib["n_samples"], calib["seqlen"], calib["seed"])
    with open_documents(calib["source"]) as index:
        got_blocks, got_stats = build_blocks(index, *args)
    want_blocks, want_stats = build_blocks(load_documents(calib["source"]), *args)
    assert torch.equal(got_blocks, want_blocks) and got_stats == want_stats
