"""Corpus files and tokenizer: fast checks that need no apt packages."""

import json
import lzma
from pathlib import Path

import pytest

from nlrw_jax.data.corpus import (
    clean_rst, collect_documents, read_documents, read_records, split_documents, write_jsonl_xz,
)
from nlrw_jax.data.tokenizer import EOT_ID, EOT_TOKEN, load_tokenizer, train_bpe_tokenizer
from nlrw_jax.errors import UserError

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus"


@pytest.fixture(scope="module")
def splits():
    return {s: list(read_records(CORPUS / f"{s}.jsonl.xz")) for s in ("train", "val")}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CORPUS)


def test_committed_splits_are_nonempty_and_disjoint(splits):
    train, val = splits["train"], splits["val"]
    assert len(train) > 10_000 and len(val) > 100
    assert all(r["text"].strip() for r in train + val)
    assert {r["source"] for r in train} == {"kjv", "python-docs", "fortunes"}
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert not {r["text"] for r in train} & {r["text"] for r in val}


def test_split_assignment_is_deterministic_by_id(splits):
    train, val = split_documents(splits["train"] + splits["val"])
    assert [d["id"] for d in train] == [r["id"] for r in splits["train"]]
    assert [d["id"] for d in val] == [r["id"] for r in splits["val"]]


def test_read_documents_yields_texts(tmp_path):
    docs = [{"id": "a", "source": "t", "text": "one\n\ntwo"}, {"id": "b", "source": "t", "text": "three"}]
    write_jsonl_xz(docs, tmp_path / "x.jsonl.xz")
    assert list(read_documents(tmp_path / "x.jsonl.xz")) == ["one\n\ntwo", "three"]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    assert list(read_documents(tmp_path / "x.jsonl")) == ["one\n\ntwo", "three"]


def test_read_documents_names_file_and_line_of_malformed_json(tmp_path):
    p = tmp_path / "bad.jsonl.xz"
    with lzma.open(p, "wt") as f:
        f.write('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=rf"{p}:2"):
        list(read_documents(p))
    with pytest.raises(UserError, match="missing.jsonl"):
        list(read_documents(tmp_path / "missing.jsonl"))


def test_empty_source_is_an_error_naming_the_path(tmp_path):
    empty = tmp_path / "empty_docs"
    empty.mkdir()
    # Sources are read in order kjv, python-docs, fortunes; a missing KJV file fails first.
    with pytest.raises(UserError, match=str(tmp_path / "no_bible.data")):
        collect_documents(tmp_path / "no_bible.data", empty, empty)


def test_empty_pydoc_dir_is_an_error_naming_the_path(tmp_path, monkeypatch):
    import nlrw_jax.data.corpus as corpus

    monkeypatch.setattr(corpus, "kjv_documents", lambda _: iter([{"id": "k", "source": "kjv", "text": "x"}]))
    empty = tmp_path / "empty_docs"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no documents found in {empty}"):
        corpus.collect_documents("unused", empty, empty)


def test_clean_rst_drops_markup():
    rst = (
        ":mod:`json` --- JSON\n=====================\n\n.. module:: json\n   :synopsis: JSON.\n\n"
        ".. index:: single: foo\n\nUse :func:`~json.dumps` and ``loads``, see :ref:`the table <tbl>`"
        " and `JSON <https://json.org>`_::\n\n   >>> 1\n\n.. versionadded:: 3.2\n   Added *this*.\n"
    )
    assert clean_rst(rst) == (
        "json --- JSON\n\nUse dumps and loads, see the table and JSON:\n\n   >>> 1\n\n"
        "New in version 3.2.\n   Added this."
    )


def test_tokenizer_round_trips_english(tok):
    text = "In the beginning God created the heaven and the earth.\n\n    def f(x):\n\treturn x  # caf\u00e9!"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert len(enc.ids) < len(text.encode())  # it actually merges something


def test_tokenizer_vocab_and_special_token(tok):
    assert tok.get_vocab_size() <= 8192
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert tok.encode(EOT_TOKEN).ids == [0]


def test_train_tokenizer_on_tiny_texts():
    t = train_bpe_tokenizer(["hello world", "hello there world", "worlds of hello"] * 5, vocab_size=300)
    assert t.token_to_id(EOT_TOKEN) == 0
    assert 257 < t.get_vocab_size() <= 300
    assert t.decode(t.encode("hello, unseen \u00fcber world").ids) == "hello, unseen \u00fcber world"


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(UserError, match=str(bad)):
        load_tokenizer(bad)
