"""Cross-tokenizer KD (a student with another tokenizer than the teacher's): bytes (token byte strings,
the vocabulary map), align (the exact-bytes groups), collate (the padded XBatch), losses (span, uld,
hybrid) and hooks (what train-student and `kdpipe check` call). Import each from its own module."""
