"""Cross-tokenizer KD in train-student and `kdpipe check`: the hooks (the package train/xtok/).

A store written by a teacher with tokenizer A trains a student with tokenizer B. The data path is
three numpy modules, each one level of the problem, all run in the collate stage (the data thread)
and never in the training loop:

* `bytes.py`: tokenizer level — the byte string of every token id (`TokenBytes`), the
  vocabulary map teacher id -> student id;
* `align.py`: record level — the exact-bytes rule, retokenization for the student, aligned
  groups (`Aligner` -> `Aligned`);
* `collate.py`: batch level — aligned records padded into an `XBatch` with the group tensors
  (`XCollate`).

`losses.py` compares teacher and student on those groups. This module holds what
train-student and `kdpipe check` call (load and check the teacher's tokenizer, build the collate
stage, describe the plan); the data path's names are imported from their own modules.
"""

from __future__ import annotations

from kdpipe.pipeline.train.xtok.align import Aligner
from kdpipe.pipeline.train.xtok.bytes import token_bytes
from kdpipe.pipeline.train.xtok.collate import XCollate, alignment_summary
from kdpipe.storage.errors import ConfigError


# ------------------------------------------------------------------------------- train-student hooks


def load_teacher_tokenizer(cfg, manifest):
    """The teacher's tokenizer: --teacher-tokenizer, else STORE/teacher_tokenizer; checked against the fingerprint."""
    from transformers import AutoTokenizer

    from kdpipe.storage.errors import StoreError
    from kdpipe.storage.manifest import tokenizer_fingerprint
    from kdpipe.storage.tokenizer_files import TEACHER_TOKENIZER_DIR, check_tokenizer_folder, teacher_tokenizer_dir

    path = cfg.teacher_tokenizer or teacher_tokenizer_dir(manifest.store_dir)
    if path is None:
        imported = manifest.meta.generation_params.get("imported_from")
        why = (f"it was imported from {imported} (`kdpipe import`) by a kdpipe that did not save the --tokenizer it was "
               "given" if imported else "written by a kdpipe before phase one saved the teacher's tokenizer")
        raise ConfigError(
            f"{manifest.store_dir}: the store carries no {TEACHER_TOKENIZER_DIR}/ ({why}) and no --teacher-tokenizer "
            f"was given; pass --teacher-tokenizer PATH, the folder of the tokenizer of {manifest.meta.teacher!r}"
            + (" (the import's --tokenizer)" if imported else "")
        )
    path = check_tokenizer_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher_tokenizer: cannot load a tokenizer from {str(path)!r} ({e})") from None
    fp = tokenizer_fingerprint(tok)
    if fp != manifest.meta.tokenizer_fingerprint:
        raise StoreError(
            f"{path}: this tokenizer is not the one that wrote {manifest.store_dir} (fingerprint {fp[:12]}… vs the "
            f"store's {manifest.meta.tokenizer_fingerprint[:12]}…); pass --teacher-tokenizer with the tokenizer of "
            f"{manifest.meta.teacher!r}"
        )
    return tok


def check_cross_tokenizer(cfg, manifests, student_tok) -> None:
    """Every refusal specific to cross-tokenizer KD, before training (train-student's check_inputs)."""
    codecs = {m.meta.codec.name for m in manifests}
    if codecs != {"topk"}:
        raise ConfigError(
            f"cross_tokenizer: {cfg.cross_tokenizer!r} needs 'topk' stores (the teacher's log-probs of its kept ids); "
            f"{', '.join(str(m.store_dir) for m in manifests)} use {', '.join(sorted(codecs))}"
        )
    teacher = load_teacher_tokenizer(cfg, manifests[0])
    token_bytes(teacher, f"teacher tokenizer of {manifests[0].store_dir}")
    token_bytes(student_tok, f"student tokenizer of {cfg.student!r}")


def cross_tokenizer_collate(cfg, plan, student_tok) -> XCollate:
    """The collate stage of train-student for a student with another tokenizer (DataSpec.collate)."""
    from kdpipe.storage.manifest import open_store

    m = open_store(cfg.stores[0])
    aligner = Aligner(student_tok, load_teacher_tokenizer(cfg, m), identical=False, store=", ".join(cfg.stores))
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else 0
    return XCollate(aligner, plan.cross_tokenizer, cfg.temperature, cfg.xtok_min_mapped_mass, pad,
                    max_len=plan.max_len, truncate=cfg.truncate)


LOSS_LINES = {
    "span": "vocabulary-mapped KL on fully mapped 1:1 groups, span (chain-rule string probabilities, Bernoulli D) elsewhere",
    "uld": "vocabulary-mapped KL on fully mapped 1:1 groups, ULD (W1 of sorted probabilities) elsewhere",
    "hybrid": "vocabulary-mapped KL on 1:1 groups whose mapped ids hold >= {m:g} of the kept mass, span elsewhere",
}


def cross_tokenizer_plan(cfg, sample_rows: int = 64) -> list[str]:
    """`kdpipe check`: the cross-tokenizer plan of one run config, measured on a sample of its store.

    A run without cross_tokenizer gets one warning line when its student's tokenizer differs from the
    (finalized) store's and alpha < 1: train-student would refuse it."""
    from transformers import AutoTokenizer

    if getattr(cfg, "cross_tokenizer", "none") == "none":
        if cfg.alpha >= 1.0:
            return []
        from kdpipe.storage.errors import KdpipeError
        from kdpipe.storage.manifest import open_store, tokenizer_fingerprint

        try:
            m = open_store(cfg.stores[0])
            student = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
        except (KdpipeError, OSError, ValueError):
            return []
        if tokenizer_fingerprint(student) == m.meta.tokenizer_fingerprint:
            return []
        return ["    WARNING: the student's tokenizer differs from the teacher's: train-student refuses logit KD; set "
                "cross_tokenizer = \"span\" | \"uld\" | \"hybrid\" (docs/cross-tokenizer.md), or alpha = 1.0 (sequence-level)"]

    from kdpipe.storage import StoreReader
    from kdpipe.storage.errors import KdpipeError
    from kdpipe.storage.manifest import open_store, tokenizer_fingerprint

    lines = [f"    cross-tokenizer {cfg.cross_tokenizer}: "
             + LOSS_LINES[cfg.cross_tokenizer].format(m=cfg.xtok_min_mapped_mass)]
    try:
        student = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        return lines + [f"      student tokenizer {cfg.student!r} not loadable here ({str(e)[:120]}); checked when training starts"]
    try:
        m = open_store(cfg.stores[0])
    except KdpipeError:
        return lines + ["      alignment: measured here once the store is finalized (train-student checks it again)"]
    if tokenizer_fingerprint(student) == m.meta.tokenizer_fingerprint:
        return lines + ["      the student shares the teacher's tokenizer: same-tokenizer KD (cross_tokenizer has no effect)"]
    try:
        teacher = load_teacher_tokenizer(cfg, m)
        aligner = Aligner(student, teacher, identical=False, store=str(m.store_dir))
        xc = XCollate(aligner, cfg.cross_tokenizer, cfg.temperature, cfg.xtok_min_mapped_mass, 0)
        recs = []
        for rec in StoreReader(str(m.store_dir), shuffle=False):
            recs.append(rec)
            if len(recs) >= sample_rows:
                break
        stats = [xc(recs[i:i + 16]).stats for i in range(0, len(recs), 16)]
    except KdpipeError as e:
        return lines + [f"      REFUSED: {e}"]
    s = alignment_summary(stats)
    return lines + [
        f"      alignment: byte offsets (teacher {aligner.tb_t.scheme}, student {aligner.tb_s.scheme}); groups = the "
        "shortest token runs of both ending at the same byte offset (docs/cross-tokenizer.md)",
        f"      measured on {len(recs)} sequences: {s['groups']} groups, {s['one_to_one_share']:.1%} 1:1, "
        f"{s['mapped_group_share']:.1%} scored by the mapped KL, {s['mapped_mass']:.1%} of the teacher's mass mapped",
    ]
