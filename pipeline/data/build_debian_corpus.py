"""Build the real summarization corpus from Debian's package descriptions, deterministically.

Each Debian package carries a long description written by its maintainer (the document) and a
one-line synopsis (the summary): about 64k human-written pairs in the style of XSum's one-sentence
summaries, available offline from the apt index. This module turns Debian's
`Translation-en` file into `pipeline/data/debian-descriptions.jsonl.gz` (origin and licensing:
`pipeline/data/DEBIAN.md`), and `load_corpus()` reads that shipped file.

    apt-get update -o Acquire::Languages=en
    python -m kdpipe.pipeline.data.build_debian_corpus            # finds the apt list itself
    python -m kdpipe.pipeline.data.build_debian_corpus --translation Translation-en --out x.jsonl.gz

Same input, same bytes: stanzas are parsed in file order but every decision below depends only on
their contents, the output is sorted by package name, and gzip is written with mtime 0 and no
file name.

1. Parse: `Package:`, `Description-md5:`, `Description-en:` (the synopsis), then the indented
   long text where a line of ` .` is a paragraph break. Lines in a paragraph are joined with one
   space and all whitespace runs collapse to one space; paragraphs are joined with "\n".
2. Drop: empty documents, documents over MAX_DOC_CHARS, transitional / dummy packages (boilerplate, not a summary task), and
   repeated documents: packages whose FIRST paragraph equals another's (`foo`, `foo-data`,
   `foo-doc` usually share it and differ only by "This package contains ...") keep one
   representative, the shortest name (then the alphabetically first), which is usually `foo`.
3. Group: packages are linked when they share a first paragraph or a source-ish stem (`foo`,
   `foo-data`, `foo-doc`, `libfoo-dev`, `libfoo2`, `python3-foo` all have stem `foo`); a group is
   a connected component, named by its alphabetically first member (kept or dropped).
4. Split by group with a stable hash (sha256 of the group name), so siblings always land in the
   same split and no held-out text, nor a near copy of it, appears in training.

Each output line is one JSON object with exactly the keys `id` (package name), `document`,
`summary`, `split` ("train" | "validation" | "heldout") and `group`.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kdpipe.storage.errors import DataError

CORPUS_FILE = "debian-descriptions.jsonl.gz"
KEYS = ("id", "document", "summary", "split", "group")
SPLITS = ("train", "validation", "heldout")
# Fractions of GROUPS per split (documents follow their group). The validation split is for
# choosing settings, the held-out split only for the final figures.
SPLIT_FRACTIONS = {"validation": 0.05, "heldout": 0.05}
# Longer documents (0.25% of them: feature lists and manuals of up to 80k characters) are dropped:
# they exceed the context of the models this corpus is for, and a one-line synopsis of them is
# not a summary of the text.
MAX_DOC_CHARS = 2000
# The apt list of bookworm's main component (not -security / -updates, which repeat a few hundred
# packages with newer versions).
APT_LIST_GLOB = "/var/lib/apt/lists/*_debian_dists_bookworm_main_i18n_Translation-en.lz4"
APT_HELPER = "/usr/lib/apt/apt-helper"

# Package-name prefixes and suffixes that mark a sibling of the same source (libfoo-dev is foo's).
_PREFIXES = (
    "python3-", "python-", "pypy-", "golang-github-", "golang-", "node-", "r-cran-", "r-bioc-",
    "ruby-", "php-", "lua-", "libghc-", "libjs-", "librust-", "elpa-", "fonts-", "gir1.2-",
    "ocaml-", "libocaml-", "haskell-", "lib",
)
_SUFFIXES = (
    "-dev", "-doc", "-docs", "-data", "-common", "-dbg", "-bin", "-utils", "-tools", "-examples",
    "-perl", "-java", "-cil", "-plugins", "-plugin", "-l10n", "-locales", "-i18n", "-dbgsym",
    "-runtime", "-headers", "-static", "-prof", "-server", "-client", "-extra", "-core", "-gtk",
    "-qt", "-cli", "-tests", "-test",
)
_TRAILING_VERSION = re.compile(r"[-.]?\d[\d.+~]*(?:-\d+)*$")
_BOILERPLATE = re.compile(r"\b(transitional|dummy) package\b", re.IGNORECASE)
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Entry:
    """One parsed stanza of Translation-en."""

    package: str
    summary: str
    paragraphs: tuple[str, ...]

    @property
    def document(self) -> str:
        return "\n".join(self.paragraphs)

    @property
    def first_paragraph(self) -> str:
        return self.paragraphs[0] if self.paragraphs else ""


def _normalize(text: str) -> str:
    return _WS.sub(" ", text).strip()


def parse_translation(text: str, source: str = "Translation-en") -> list[Entry]:
    """Parse Translation-en stanzas (blank-line separated) into entries, in file order."""
    entries: list[Entry] = []
    stanzas = [s for s in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if s.strip()]
    for number, stanza in enumerate(stanzas):
        package = summary = None
        paragraphs: list[str] = []
        current: list[str] = []
        in_description = False
        for line in stanza.strip("\n").split("\n"):
            if line.startswith((" ", "\t")):
                if not in_description:
                    continue  # continuation of a field we do not use
                if line.strip() == ".":
                    paragraphs.append(_normalize(" ".join(current)))
                    current = []
                else:
                    current.append(line)
                continue
            in_description = False
            field, sep, value = line.partition(":")
            if not sep:
                raise DataError(f"{source}: stanza {number}: line {line[:60]!r} is neither `Field: value` "
                                "nor an indented continuation; pass an unpacked Translation-en file")
            if field == "Package":
                package = value.strip()
            elif field.startswith("Description-"):
                summary = _normalize(value)
                in_description = True
        if current:
            paragraphs.append(_normalize(" ".join(current)))
        if package is None or summary is None:
            raise DataError(f"{source}: stanza {number} has no "
                            f"{'Package' if package is None else 'Description-en'} field; "
                            "pass an unpacked Translation-en file (apt-helper cat-file …)")
        entries.append(Entry(package, summary, tuple(p for p in paragraphs if p)))
    return entries


def stem(package: str) -> str:
    """The source-ish stem of a package name: libfoo-dev, foo-data, python3-foo -> foo."""
    name = package.lower()
    for prefix in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix) + 1:
            name = name[len(prefix):]
            break
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix) + 1:
                name, changed = name[: -len(suffix)], True
        trimmed = _TRAILING_VERSION.sub("", name)
        if trimmed != name and len(trimmed) >= 2 and re.search(r"[a-z]", trimmed):
            name, changed = trimmed, True
    return name


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller name becomes the root, so the root is the group's name.
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def split_of(group: str) -> str:
    """The split of a group: a stable hash, independent of the input's order and of Python's hash seed."""
    u = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["heldout"]:
        return "heldout"
    if u < SPLIT_FRACTIONS["heldout"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "train"


def build_rows(entries: list[Entry]) -> list[dict]:
    """Entries -> the corpus rows (sorted by id), after dropping, grouping and splitting."""
    by_package: dict[str, Entry] = {}
    for e in entries:
        # A package appears once per Description-md5; keep the content-first one so file order
        # does not matter.
        prev = by_package.get(e.package)
        if prev is None or (e.document, e.summary) < (prev.document, prev.summary):
            by_package[e.package] = e
    uf = _UnionFind()
    first_owner: dict[str, str] = {}
    stem_owner: dict[str, str] = {}
    for name in sorted(by_package):
        e = by_package[name]
        uf.find(name)
        if e.first_paragraph:
            uf.union(name, first_owner.setdefault(e.first_paragraph, name))
        uf.union(name, stem_owner.setdefault(stem(name), name))

    # One representative per first paragraph: the shortest name, then the alphabetically first.
    keep: dict[str, str] = {}
    for name in sorted(by_package, key=lambda n: (len(n), n)):
        e = by_package[name]
        if not e.first_paragraph or len(e.document) > MAX_DOC_CHARS:
            continue
        if _BOILERPLATE.search(e.summary) or _BOILERPLATE.search(e.document):
            continue
        keep.setdefault(e.first_paragraph, name)

    rows = []
    for name in sorted(keep.values()):
        e = by_package[name]
        group = uf.find(name)
        rows.append({"id": name, "document": e.document, "summary": e.summary,
                     "split": split_of(group), "group": group})
    return rows


def encode_rows(rows: list[dict]) -> bytes:
    """The gzip'd JSONL bytes: keys in KEYS order, UTF-8, mtime 0, no file name (same rows, same bytes)."""
    text = "".join(json.dumps({k: r[k] for k in KEYS}, ensure_ascii=False) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def write_corpus(rows: list[dict], out: Path) -> None:
    """Write atomically: a reader never sees half a corpus."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(encode_rows(rows))
    os.replace(tmp, out)


def read_translation(path: Path | None) -> tuple[str, str]:
    """(text, where it came from). An .lz4 apt list is unpacked with apt-helper cat-file."""
    if path is None:
        found = sorted(glob.glob(APT_LIST_GLOB))
        if len(found) != 1:
            raise DataError(f"{APT_LIST_GLOB}: {len(found)} apt lists match; run "
                            "`apt-get update -o Acquire::Languages=en` or pass --translation FILE")
        path = Path(found[0])
    if not path.exists():
        raise DataError(f"{path}: no such file; pass an unpacked Translation-en or an apt .lz4 list")
    if path.suffix in (".lz4", ".gz", ".xz", ".bz2"):
        proc = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise DataError(f"{path}: `{APT_HELPER} cat-file` failed ({proc.stderr.decode(errors='replace').strip()}); "
                            "unpack it yourself and pass the plain file")
        data = proc.stdout
    else:
        data = path.read_bytes()
    return data.decode("utf-8"), str(path)


def shipped_path() -> Path:
    return Path(__file__).with_name(CORPUS_FILE)


def load_corpus(split: str | None = None, max_doc_chars: int | None = None,
                path: str | Path | None = None) -> list[dict]:
    """The shipped Debian corpus (or `path`), sorted by id, optionally one split and short documents only."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r}: choose one of {', '.join(SPLITS)} (or None for all)")
    if max_doc_chars is not None and max_doc_chars <= 0:
        raise DataError(f"max_doc_chars={max_doc_chars}: must be > 0 (or None for no limit)")
    path = Path(path) if path is not None else shipped_path()
    if not path.exists():
        raise DataError(f"{path}: corpus not found; build it with "
                        "`python -m kdpipe.pipeline.data.build_debian_corpus`")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if set(row) != set(KEYS):
                raise DataError(f"{path}: line {line_no} has keys {sorted(row)}, expected {list(KEYS)}; rebuild the corpus")
            if split is not None and row["split"] != split:
                continue
            if max_doc_chars is not None and len(row["document"]) > max_doc_chars:
                continue
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--translation", type=Path, default=None,
                        help=f"Translation-en (plain or apt .lz4); default: {APT_LIST_GLOB}")
    parser.add_argument("--out", type=Path, default=shipped_path())
    args = parser.parse_args(argv)
    text, source = read_translation(args.translation)
    entries = parse_translation(text, source)
    rows = build_rows(entries)
    write_corpus(rows, args.out)
    sizes = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(json.dumps({"input": source, "input_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                      "stanzas": len(entries), "rows": len(rows),
                      "groups": len({r["group"] for r in rows}), "splits": sizes,
                      "out": str(args.out), "bytes": args.out.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
