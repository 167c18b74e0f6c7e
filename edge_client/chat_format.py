"""A (prompt, response) row as one chat exchange, through the tokenizer's own chat template.

The template is rendered once around two placeholder messages, which cuts it into three token pieces:

    head  prompt  middle  response  end        e.g. for SmolLM2 (ChatML):
    head   = "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n"
    middle = "<|im_end|>\\n<|im_start|>assistant\\n"
    end    = "<|im_end|>"  (the template's text after the reply, up to and including the eos token)

The targets (the labels; every other position is IGNORE) are the response and `end`: the model learns what
the person replies and where the reply stops, and perplexity is measured on exactly those tokens.
A row longer than `seq_len` keeps the end of its prompt (the words next to the reply) and the start of its
response: the prompt is cut from the left to what fits beside the response, but keeps at least a quarter of
the room; a response longer than the rest is cut on the right, and then has no `end` target (its room goes to
the response).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_client.objective import IGNORE
from hetlora.errors import UserError

_USER, _REPLY = "\ue000", "\ue001"  # private-use characters: never part of a template's own text


@dataclass(frozen=True)
class ChatFormat:
    head: tuple[int, ...]
    middle: tuple[int, ...]
    end: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "ChatFormat | None":
        """The pieces of the tokenizer's chat template; None when it has none."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        text = tokenizer.apply_chat_template([{"role": "user", "content": _USER},
                                              {"role": "assistant", "content": _REPLY}], tokenize=False)
        if text.count(_USER) != 1 or text.count(_REPLY) != 1 or text.index(_USER) > text.index(_REPLY):
            raise UserError("the tokenizer's chat template does not place one user and one assistant message in "
                            "order; use a model with a standard chat template")
        head, rest = text.split(_USER)
        middle, tail = rest.split(_REPLY)
        tokens = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else ()  # noqa: E731
        end = tokens(tail)
        if tokenizer.eos_token_id in end:
            end = end[: end.index(tokenizer.eos_token_id) + 1]
        return cls(tokens(head), tokens(middle), end)

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.middle) + len(self.end)

    def row(self, prompt: list[int], response: list[int], seq_len: int) -> tuple[list[int], list[int], bool]:
        """(input ids, labels, truncated) of one exchange, at most `seq_len` tokens (module docstring)."""
        room = seq_len - self.overhead
        if room < 2:
            raise UserError(f"--seq-len {seq_len} leaves no room for a message: this chat template alone takes "
                            f"{self.overhead} tokens; use at least {self.overhead + 16}")
        keep_prompt = min(len(prompt), max(room - len(response), room // 4))
        whole = keep_prompt + len(response) <= room
        keep_response = len(response) if whole else min(len(response), room + len(self.end) - keep_prompt)
        kept_prompt = prompt[len(prompt) - keep_prompt:]
        targets = response[:keep_response] + (list(self.end) if whole else [])
        context = list(self.head) + kept_prompt + list(self.middle)
        truncated = keep_prompt < len(prompt) or not whole
        return context + targets, [IGNORE] * len(context) + targets, truncated
