"""Offline English training corpus, built from Debian packages, plus its BPE tokenizer.

Sources (installed by scripts/build_corpus.sh):
  kjv          King James Bible, one document per chapter (bible-kjv-text, read with the
               `bible` program from bible-kjv, since the text is stored compressed)
  python-docs  Python 3.11 documentation, one document per page (python3.11-doc, the
               reStructuredText `_sources/*.rst.txt`, with the Sphinx markup thinned out)
  fortunes     fortune cookies, one document per cookie (fortunes; offensive cookies live in
               the separate fortunes-off package, which is not installed)

File format: JSON lines compressed with xz (`train.jsonl.xz`, `val.jsonl.xz`). Each line is one
document, `{"id": ..., "source": ..., "text": ...}`; newlines inside a text are JSON-escaped,
so a document never spans lines and no separator string is needed. Documents are assigned to
validation when the SHA-256 of their id falls in the first `val_fraction` of the hash range,
and each split is ordered by another hash of the id, so sources are interleaved and the
output is byte-identical from run to run.

CLI:  python -m nlrw_jax.data.corpus build --out assets/corpus [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from nlrw_jax.errors import UserError

BIBLE_DATA = "/usr/lib/bible.data"
PYDOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
FORTUNE_DIR = "/usr/share/games/fortunes"
VAL_FRACTION = 0.02

Doc = dict  # {"id": str, "source": str, "text": str}


# ---------------------------------------------------------------- text cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalize_whitespace(text: str) -> str:
    """NFC, Unix newlines, no control characters or tabs, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [line.expandtabs(8).rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n")


# Sphinx directives whose line and indented body carry no prose.
_DROP_DIRECTIVES = {
    "index", "module", "currentmodule", "moduleauthor", "sectionauthor", "highlight", "toctree",
    "include", "literalinclude", "raw", "image", "figure", "tabularcolumns", "testsetup",
    "testcleanup", "audit-event", "audit-event-table", "c:namespace", "c:namespace-push",
    "c:namespace-pop", "py:currentmodule", "py:module", "limited-api-list", "miscnews",
}
# Directives rendered as a short lead-in label; "{}" takes the directive argument.
_LABELS = {
    "note": "Note:", "warning": "Warning:", "important": "Important:", "tip": "Tip:",
    "caution": "Caution:", "attention": "Attention:", "danger": "Danger:", "hint": "Hint:",
    "error": "Error:", "seealso": "See also:", "impl-detail": "CPython implementation detail:",
    "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}.", "availability": "Availability:",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}.",
}
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+<>_.:])\1{3,}\s*$")  # heading under/overlines
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")  # grid/simple table borders
_OPTION = re.compile(r"^\s+:[\w-]+:(\s|$)")  # directive options such as `:synopsis: ...`
_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]*)`")
_EMPHASIS = re.compile(r"(?<![\w*`])\*([^\s*][^*]*?)\*(?![\w*])")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_FOOTREF = re.compile(r"\s*\[#?[\w-]*\]_")


def _role_text(m: re.Match) -> str:
    role, text = m.group(1), m.group(2)
    if role in ("rfc", "pep"):  # :rfc:`7159` shows "RFC 7159"
        return f"{role.upper()} {text}"
    if text.endswith(">") and "<" in text:  # :ref:`title <label>` shows the title
        text = text[: text.rfind("<")].strip()
    if text.startswith("~"):  # :func:`~a.b.c` shows c
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def _inline(text: str) -> str:
    """Inline markup to its displayed text; runs on whole pages since roles may span lines."""
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _FOOTREF.sub("", text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)
    text = re.sub(r"\*\*(\S(?:[^*]*?\S)?)\*\*", r"\1", text)
    return _EMPHASIS.sub(r"\1", text)


def _literal_intro(line: str) -> str:
    """"Example::" introduces a literal block; Sphinx renders it "Example:" (and drops a lone "::")."""
    s = line.rstrip()
    if not s.endswith("::"):
        return line
    return "" if s.strip() == "::" else (s[:-3] if s.endswith(" ::") else s[:-1])


def clean_rst(text: str) -> str:
    """Turn Sphinx reStructuredText into plain text, cheaply: a line-by-line pass, not a parser."""
    out: list[str] = []
    skip_indent = -1  # >= 0 while dropping an indented block under a directive or comment
    in_options = False  # just after a kept directive, its `:option:` lines are dropped
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        blank = not line.strip()
        if skip_indent >= 0:
            if blank or indent > skip_indent:
                continue
            skip_indent = -1
        if in_options:
            if _OPTION.match(line):
                continue
            in_options = False
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            continue
        m = re.match(r"^(\s*)\.\.(?:\s+(.*))?$", line)
        if m:
            pad, rest = m.group(1), (m.group(2) or "")
            d = re.match(r"([\w-]+(?::[\w-]+)?)::\s*(.*)$", rest)
            if d is None:
                if rest.startswith("["):  # footnote body: keep its text
                    out.append(pad + rest.split("]", 1)[-1].strip())
                else:  # comment, link target `.. _x:` or substitution: drop with its body
                    skip_indent = indent
                continue
            name, arg = d.groups()
            if name in _DROP_DIRECTIVES:
                skip_indent = indent
                continue
            in_options = True
            if name in _LABELS:
                label = _LABELS[name]
                k = label.count("{}")  # leading words of the argument that fill the label
                words = arg.split(None, k) if k else [arg]
                fill, rest = (words[:k] + [""] * k)[:k], " ".join(words[k:])
                out.append(pad + label.format(*fill) + (" " + rest if rest else ""))
            elif arg and name not in {"code-block", "sourcecode", "code", "highlight", "only", "csv-table",
                                      "list-table", "table", "doctest", "testcode", "testoutput"}:
                out.append(pad + arg)  # signatures (function::, class::), rubric, etc.
            continue
        out.append(_literal_intro(line))
    return normalize_whitespace(_inline("\n".join(out)))


# ---------------------------------------------------------------- sources


def kjv_documents(bible_data: str | Path = BIBLE_DATA) -> Iterator[Doc]:
    """One document per chapter: "Genesis 1", a blank line, then numbered verses."""
    data = Path(bible_data)
    if not data.is_file():
        raise UserError(f"KJV text not found: {data} (apt-get install bible-kjv-text)")
    exe = shutil.which("bible")
    if exe is None:
        raise UserError(f"`bible` program not found, needed to read {data} (apt-get install bible-kjv)")
    # -l: a huge line width so verses are not wrapped.
    proc = subprocess.run([exe, "-l1000000", "-d", str(data), "gen1:1-rev22:21"],
                          capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise UserError(f"cannot read KJV text {data}: {proc.stderr.strip() or proc.stdout.strip()}")
    chapter, verses = None, []
    for line in proc.stdout.splitlines() + ["<end>"]:
        if line and not line[0].isspace():  # chapter heading, or the end marker
            if chapter is not None and verses:
                yield {"id": f"kjv/{chapter}", "source": "kjv",
                       "text": normalize_whitespace(chapter + "\n\n" + "\n".join(verses))}
            chapter, verses = line.strip(), []
        elif line.strip():
            verses.append(" ".join(line.split()))  # "  1 In the beginning" -> "1 In the beginning"


def pydoc_documents(src_dir: str | Path = PYDOC_SOURCES) -> Iterator[Doc]:
    """One document per documentation page, markup thinned out; tiny pages (tables of contents) dropped."""
    root = Path(src_dir)
    if not root.is_dir():
        raise UserError(f"Python docs sources not found: {root} (apt-get install python3.11-doc)")
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("includes/"):  # fragments pulled into other pages
            continue
        text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 200:
            yield {"id": "python-docs/" + rel[: -len(".rst.txt")], "source": "python-docs", "text": text}


def fortune_documents(fortune_dir: str | Path = FORTUNE_DIR) -> Iterator[Doc]:
    """One document per cookie. Skips ascii-art (pictures, not prose) and any `off/` subdirectory."""
    root = Path(fortune_dir)
    if not root.is_dir():
        raise UserError(f"fortunes not found: {root} (apt-get install fortunes)")
    for path in sorted(root.iterdir()):
        # The .dat files are indexes, the .u8 files symlinks to the same text.
        if not path.is_file() or path.is_symlink() or path.suffix in {".dat", ".u8"} or path.name == "ascii-art":
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for cookie in re.split(r"^%\s*$", raw, flags=re.M):
            cookie = re.sub(r".\x08", "", cookie)  # overstrike (x^Hx bold, _^Hx underline)
            text = normalize_whitespace(cookie)
            if text:
                digest = hashlib.sha256(text.encode()).hexdigest()[:12]
                yield {"id": f"fortunes/{path.name}/{digest}", "source": "fortunes", "text": text}


def collect_documents(bible_data=BIBLE_DATA, pydoc_dir=PYDOC_SOURCES, fortune_dir=FORTUNE_DIR) -> list[Doc]:
    """All documents from the three sources, exact duplicates removed (first one kept)."""
    docs, seen = [], set()
    for where, it in ((bible_data, kjv_documents(bible_data)), (pydoc_dir, pydoc_documents(pydoc_dir)),
                      (fortune_dir, fortune_documents(fortune_dir))):
        n = 0
        for doc in it:
            n += 1
            if doc["text"] not in seen:
                seen.add(doc["text"])
                docs.append(doc)
        if n == 0:  # an empty source means a broken install, not a smaller corpus
            raise UserError(f"no documents found in {where}")
    return docs


# ---------------------------------------------------------------- splits and files


def _hash01(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def is_validation(doc_id: str, val_fraction: float = VAL_FRACTION) -> bool:
    return _hash01(doc_id) < val_fraction


def split_documents(docs: Iterable[Doc], val_fraction: float = VAL_FRACTION) -> tuple[list[Doc], list[Doc]]:
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc["id"], val_fraction) else train).append(doc)
    order = lambda d: _hash01("order:" + d["id"])  # noqa: E731  (interleave sources, deterministically)
    return sorted(train, key=order), sorted(val, key=order)


def write_jsonl_xz(docs: Iterable[Doc], path: str | Path) -> None:
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["id"], "source": doc["source"], "text": doc["text"]},
                               ensure_ascii=False) + "\n")


def read_records(path: str | Path, text_field: str = "text") -> Iterator[Doc]:
    """Yield the JSON objects of a `.jsonl.xz` or `.jsonl` file; each needs a string `text_field`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"corpus file not found: {p}")
    opener = lzma.open if p.name.endswith(".xz") else open
    lineno = 0
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{lineno}: malformed JSON line ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise UserError(f"{p}:{lineno}: expected an object with a string {text_field!r} field")
                yield rec
    except (lzma.LZMAError, EOFError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read {p} (line {lineno + 1}): {e}") from None


def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the document texts of a `.jsonl.xz` or `.jsonl` corpus file."""
    for rec in read_records(path):
        yield rec["text"]


# ---------------------------------------------------------------- build


def _stats(docs: list[Doc], tok) -> dict:
    texts = [d["text"] for d in docs]
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    by_source: dict[str, int] = {}
    for d in docs:
        by_source[d["source"]] = by_source.get(d["source"], 0) + 1
    return {"documents": len(docs), "documents_by_source": by_source,
            "bytes": sum(len(t.encode()) for t in texts), "tokens": n_tokens}


def build(out_dir: str | Path, vocab_size: int = 8192, val_fraction: float = VAL_FRACTION,
          bible_data=BIBLE_DATA, pydoc_dir=PYDOC_SOURCES, fortune_dir=FORTUNE_DIR) -> dict:
    """Write train.jsonl.xz, val.jsonl.xz and tokenizer.json (trained on train only) to out_dir."""
    from nlrw_jax.data.tokenizer import train_bpe_tokenizer

    docs = collect_documents(bible_data, pydoc_dir, fortune_dir)
    train, val = split_documents(docs, val_fraction)
    if not train or not val:
        raise UserError(f"split left train={len(train)} val={len(val)} documents; need both non-empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_xz(train, out / "train.jsonl.xz")
    write_jsonl_xz(val, out / "val.jsonl.xz")
    tok = train_bpe_tokenizer((d["text"] for d in train), vocab_size=vocab_size)
    tok.save(str(out / "tokenizer.json"))
    stats = {"vocab_size": tok.get_vocab_size(), "train": _stats(train, tok), "val": _stats(val, tok)}
    for split in ("train", "val"):
        stats[split]["xz_bytes"] = (out / f"{split}.jsonl.xz").stat().st_size
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlrw_jax.data.corpus", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the corpus splits and train the tokenizer")
    b.add_argument("--out", required=True, help="output directory (e.g. assets/corpus)")
    b.add_argument("--vocab-size", type=int, default=8192)
    b.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    b.add_argument("--bible-data", default=BIBLE_DATA)
    b.add_argument("--pydoc-dir", default=PYDOC_SOURCES)
    b.add_argument("--fortune-dir", default=FORTUNE_DIR)
    args = ap.parse_args(argv)
    try:
        stats = build(args.out, args.vocab_size, args.val_fraction, args.bible_data, args.pydoc_dir, args.fortune_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
