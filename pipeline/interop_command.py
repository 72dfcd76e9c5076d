"""`kdpipe export STORE OUT` and `kdpipe import SRC STORE`: thin commands over storage/interop.py."""

from __future__ import annotations

import click

from kdpipe.pipeline.cli import run_command
from kdpipe.storage.interop import EXPORT_FORMATS, IMPORT_FORMATS, TAIL_MODES


@click.command("export")
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="parquet: plain per-sequence columns (datasets.load_dataset('parquet')); axolotl: its KD rows.")
@click.option("--rows-per-file", type=int, default=10_000, show_default=True, help="Rows per Parquet file.")
def export(store: str, out: str, fmt: str, rows_per_file: int) -> None:
    """Write the finalized STORE into OUT as Parquet files (the store's meta in their schema metadata)."""
    from kdpipe.storage.interop_export import export_store

    side = run_command(export_store, store, out, fmt, rows_per_file=rows_per_file)
    click.echo(f"{out}: {side['rows']} sequences in {len(side['files'])} file(s), format {fmt} "
               f"(store cache key {side['cache_key'][:16]}…)")


@click.command("import")
@click.argument("src", type=click.Path(exists=True))
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS), required=True,
              help="vllm-logprobs: vLLM completions responses with prompt_logprobs (.json/.jsonl); axolotl: its KD rows; "
                   "parquet: `kdpipe export --format parquet` files.")
@click.option("--tokenizer", required=True, help="The tokenizer the source's token ids belong to (the teacher's).")
@click.option("--teacher", default=None, help="Teacher name recorded in the store (default: the source's).")
@click.option("--top-k", type=int, default=None, help="Entries kept per position (default: what the source has).")
@click.option("--tail", type=click.Choice(TAIL_MODES), default="auto", show_default=True,
              help="auto: lists summing to 1 everywhere are renormalized (tail unknown); exact / unknown: say so.")
def import_(src: str, store: str, fmt: str, tokenizer: str, teacher: str | None, top_k: int | None, tail: str) -> None:
    """Build a finalized kdpipe STORE from existing teacher log-probs in SRC (a file or a folder)."""
    from kdpipe.storage.interop import import_source

    r = run_command(import_source, src, store, fmt, tokenizer, teacher=teacher, top_k=top_k, tail=tail)
    click.echo(f"{store}: imported {r['sequences']} sequences (top-{r['top_k']}, tail {r['tail']}, teacher "
               f"{r['teacher']}); cache key {r['cache_key'][:16]}…")
