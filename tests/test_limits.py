"""Limits checked early and memory bounded: the check stage refuses sequences past the model's
context and texts too small for what is asked, naming the numbers, before any weight loads;
text files are read in bounded pieces whatever their size."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from ptqflow import text
from ptqflow.pipeline import check
from ptqflow.pipeline.common import StageRun


@pytest.mark.parametrize("pool", ["calib", "eval"])
def test_a_sequence_past_the_models_context_is_refused_by_check(tiny_cfg, tmp_path, pool):
    # the tiny Llama has max_position_embeddings=256
    with pytest.raises(ValueError, match=rf"{pool}.seqlen=300 is longer .*\(256 tokens.*<=256"):
        check.run(tiny_cfg(f"{pool}.seqlen=300"), StageRun(tmp_path))


def test_an_empty_calibration_text_is_refused_by_check(tiny_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    with pytest.raises(ValueError, match=r"calib.source=.*empty.txt holds no text"):
        check.run(tiny_cfg(f"calib.source={empty}"), StageRun(tmp_path))


def test_too_many_windows_for_the_text_are_refused_by_check_with_the_numbers(
    tiny_cfg, texts, tmp_path
):
    docs = text.load_documents(str(texts["eval"]))
    chars = sum(len(d) for d in docs)
    bound = chars + 2 * len(docs)
    need = 100000 * 32
    expected = (
        rf"holds {chars} characters in {len(docs)} documents, so at most about {bound} tokens, "
        rf"fewer than the {need} needed; lower eval.n_windows"
    )
    with pytest.raises(ValueError, match=expected):
        check.run(tiny_cfg("eval.n_windows=100000"), StageRun(tmp_path))


def test_a_huge_one_line_text_is_read_in_bounded_memory_and_its_document_skipped(
    tmp_path, monkeypatch, caplog
):
    """A 24 MB document on one line between two short ones: it is skipped (and logged), the
    others are kept, and reading never holds more than a few pieces."""
    monkeypatch.setattr(text, "MAX_DOC_CHARS", 200_000)
    monkeypatch.setattr(text, "PIECE", 65_536)
    source = tmp_path / "big.txt"
    with source.open("w") as f:
        f.write("first document\n\n")
        for _ in range(24):
            f.write("x" * 1_000_000)
        f.write("\n\nlast document\n")
    tracemalloc.start()
    with caplog.at_level("WARNING", logger="ptqflow.text"):
        docs = text.load_documents(str(source))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert docs == ["first document", "last document"]
    assert peak < 2_000_000, f"peak {peak} bytes while reading a 24 MB line"
    assert "skipped 1 document(s) over 200000 characters" in caplog.text


def test_a_jsonl_line_over_the_bound_is_skipped_and_a_large_json_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "MAX_DOC_CHARS", 1000)
    monkeypatch.setattr(text, "PIECE", 64)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in ("a b", "y" * 5000, "c d")))
    assert text.load_documents(str(rows)) == ["a b", "c d"]
    monkeypatch.setattr(text, "MAX_JSON_BYTES", 100)
    whole = tmp_path / "rows.json"
    whole.write_text(json.dumps(["z" * 200]))
    with pytest.raises(ValueError, match=r"parsed whole.* 204 bytes \(at most 100\).*\.jsonl"):
        text.load_documents(str(whole))


def test_an_unreachable_hub_is_named_in_seconds(monkeypatch):
    """A hub id that is not cached, with the hub silent (a port on 127.0.0.1 that accepts
    nothing): refused within the timeout, naming the address, not after the clients' retries."""
    import socket
    import time

    from ptqflow.models import resolve_model

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]  # bound but not listening: connections are refused
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match=rf"hub \(127.0.0.1:{port}\) did not answer"):
            resolve_model("someone/not-cached-model-xyz")
    assert time.monotonic() - start < 5
