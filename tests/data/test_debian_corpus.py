"""The Debian corpus builder on a small Translation-en sample, and the shipped corpus it made."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kdpipe.pipeline.data import build_debian_corpus as bdc
from kdpipe.storage.errors import DataError


def _stanza(package: str, synopsis: str, *paragraphs: str) -> str:
    body = "\n .\n".join("\n".join(" " + line for line in p.split("\n")) for p in paragraphs)
    md5 = f"{abs(hash(package)) % 10**32:032d}"
    return f"Package: {package}\nDescription-md5: {md5}\nDescription-en: {synopsis}\n{body}\n"


FOO_INTRO = "Foo is a   tool that frobs\nwidgets quickly and\tsafely."
SAMPLE_STANZAS = [
    _stanza("foo", "widget frobber", FOO_INTRO, "It has many options."),
    # A -data sibling with the same first paragraph: dropped as a repeat, grouped with foo.
    _stanza("foo-data", "widget frobber (data files)", FOO_INTRO, "This package contains the data files."),
    # Siblings by stem only (different texts): same group as foo, so the same split.
    _stanza("libfoo-dev", "widget frobber library (development files)",
            "The foo library lets programs frob widgets.", "This package contains the headers."),
    _stanza("python3-foo", "Python bindings for the widget frobber", "Bindings to frob widgets from Python 3."),
    # A package with another name that repeats the text of a different one: same group as it.
    _stanza("bar", "a bar chart maker", "Bar draws bar charts from tables.\nIt reads CSV."),
    _stanza("zz-bar-clone", "bar chart maker (fork)", "Bar draws bar charts from tables.\nIt reads CSV."),
    _stanza("oldthing", "transitional package", "This is a transitional package. It can safely be removed."),
    "Package: emptydoc\nDescription-md5: 0123\nDescription-en: nothing but a synopsis\n",
]
# Enough independent groups that every split is populated by the stable hash.
SAMPLE_STANZAS += [
    _stanza(f"tool{chr(97 + i)}{chr(97 + j)}", f"utility number {i}-{j}",
            f"Utility {i}-{j} does one thing.\nIt does it well.", f"Paragraph two of {i}-{j}.")
    for i in range(8) for j in range(8)
]


def _write_sample(path: Path, stanzas: list[str]) -> Path:
    path.write_text("\n".join(stanzas), encoding="utf-8")
    return path


def _build(translation: Path, out: Path) -> list[dict]:
    assert bdc.main(["--translation", str(translation), "--out", str(out)]) == 0
    return bdc.load_corpus(path=out)


def test_parse_paragraphs_and_whitespace(tmp_path):
    entries = bdc.parse_translation(_write_sample(tmp_path / "T", SAMPLE_STANZAS).read_text())
    foo = next(e for e in entries if e.package == "foo")
    assert foo.summary == "widget frobber"
    assert foo.document == "Foo is a tool that frobs widgets quickly and safely.\nIt has many options."
    assert next(e for e in entries if e.package == "emptydoc").paragraphs == ()


def test_builder_is_deterministic_drops_repeats_and_groups_siblings(tmp_path):
    sample = _write_sample(tmp_path / "Translation-en", SAMPLE_STANZAS)
    rows = _build(sample, tmp_path / "a.jsonl.gz")
    # Same input in another stanza order -> the same bytes.
    shuffled = _write_sample(tmp_path / "Translation-en-rev", list(reversed(SAMPLE_STANZAS)))
    _build(shuffled, tmp_path / "b.jsonl.gz")
    _build(sample, tmp_path / "c.jsonl.gz")
    a = (tmp_path / "a.jsonl.gz").read_bytes()
    assert a == (tmp_path / "b.jsonl.gz").read_bytes() == (tmp_path / "c.jsonl.gz").read_bytes()

    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == sorted(by_id)
    assert all(list(r) == list(bdc.KEYS) for r in rows)
    # Repeats (same first paragraph), empty documents and transitional packages are dropped.
    assert "foo-data" not in by_id and "zz-bar-clone" not in by_id
    assert "emptydoc" not in by_id and "oldthing" not in by_id
    assert by_id["foo"]["document"] == "Foo is a tool that frobs widgets quickly and safely.\nIt has many options."
    # Siblings by stem share foo's group, and therefore its split.
    assert by_id["libfoo-dev"]["group"] == by_id["python3-foo"]["group"] == by_id["foo"]["group"] == "foo"
    assert len({by_id[n]["split"] for n in ("foo", "libfoo-dev", "python3-foo")}) == 1
    assert by_id["bar"]["group"] == "bar"
    assert {r["split"] for r in rows} == set(bdc.SPLITS)


def test_no_heldout_group_or_text_leaks_into_train(tmp_path):
    rows = _build(_write_sample(tmp_path / "T", SAMPLE_STANZAS), tmp_path / "c.jsonl.gz")
    split_of_group: dict[str, set[str]] = {}
    for r in rows:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    train_docs = {r["document"] for r in rows if r["split"] == "train"}
    assert not any(r["document"] in train_docs for r in rows if r["split"] != "train")


def test_stems():
    for name in ("foo", "foo-data", "foo-doc", "libfoo-dev", "libfoo2", "python3-foo", "foo-utils", "libfoo-1.2-0"):
        assert bdc.stem(name) == "foo", name
    assert bdc.stem("2048") == "2048"


def test_bad_input_names_the_stanza(tmp_path):
    bad = _write_sample(tmp_path / "T", ["Package: x\nDescription-en: y\n z\n", "Description-en: no package\n"])
    with pytest.raises(DataError, match="stanza 1 has no Package"):
        bdc.parse_translation(bad.read_text(), str(bad))
    with pytest.raises(DataError, match="split='test'"):
        bdc.load_corpus(split="test")


def test_shipped_corpus_loads_and_splits_by_group():
    path = bdc.shipped_path()
    raw = path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0: rebuilding gives the same bytes
    rows = bdc.load_corpus()
    assert len(rows) > 30_000
    groups: dict[str, str] = {}
    for r in rows:
        assert groups.setdefault(r["group"], r["split"]) == r["split"], r["group"]
    short = bdc.load_corpus(split="heldout", max_doc_chars=300)
    assert short and all(r["split"] == "heldout" and len(r["document"]) <= 300 for r in short)


def test_datasets_reads_the_shipped_file(tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(bdc.shipped_path()), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.column_names == list(bdc.KEYS)
    first = json.loads(gzip.open(bdc.shipped_path(), "rt", encoding="utf-8").readline())
    assert ds[0] == first
