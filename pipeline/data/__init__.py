"""Corpora shipped with kdpipe: the Debian package-description corpus (build_debian_corpus) and the
templated unit-test fixture (make_corpus.py -> summarization.jsonl)."""
