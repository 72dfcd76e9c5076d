"""Prompts as every phase builds them: phase one's recipes, the evaluation's generations and reference
scores, the teacher fine-tuning of lm_train (and the benchmarks) all tokenize user text the same way.

A cross-phase helper: it imports no phase.
"""

from __future__ import annotations

DEFAULT_SUMMARIZE_TEMPLATE = "Summarize the following text in a few sentences.\n\nText: {text}\n\nSummary:"


class Prompter:
    """User text -> prompt token ids, through the teacher's chat template when it has one."""

    def __init__(self, tokenizer, use_chat_template: bool, system_prompt: str | None) -> None:
        self.tok = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.system = system_prompt

    def _messages(self, user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def prompt_text(self, user: str) -> str:
        if self.chat:
            return self.tok.apply_chat_template(self._messages(user), tokenize=False, add_generation_prompt=True)
        return f"{self.system}\n\n{user}" if self.system else user

    def ids(self, user: str) -> list[int]:
        # A chat template writes its own BOS/special tokens; plain text gets the tokenizer's.
        return list(self.tok(self.prompt_text(user), add_special_tokens=not self.chat)["input_ids"])

    def target_ids(self, user: str, target: str) -> list[int]:
        """Token ids of `target` as the teacher's answer, including its end-of-turn marker."""
        if self.chat:
            prompt = self.prompt_text(user)
            full = self.tok.apply_chat_template(
                self._messages(user) + [{"role": "assistant", "content": target}], tokenize=False
            )
            suffix = full[len(prompt) :] if full.startswith(prompt) else target
            return list(self.tok(suffix, add_special_tokens=False)["input_ids"])
        ids = list(self.tok(target, add_special_tokens=False)["input_ids"])
        return ids + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])
