"""Request state inside the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from microserve.engine.sampling import SamplingParams
from microserve.kv.cache import SendWindow, SeqKV


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence. `token_ids` is prompt + output so far; KV exists for token_ids[:num_computed].

    A step computes token_ids[num_computed : num_computed + n] for some n; when that reaches the end
    of token_ids the last row's logits are sampled (unless `send_only`). So prefill, chunked prefill,
    a prefix hit and decode are one mechanism: only n differs.
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    seq: SeqKV | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 503  # the HTTP status `error` maps to
    send: SendWindow | None = None  # remote_send: ship KV of these positions as it is computed
    send_only: bool = False  # remote_send: compute KV, sample nothing
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix hit or received)
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None  # seeded sampling; on the engine's device
    detok: object | None = None  # engine.tokenizer.IncrementalDetokenizer
    text: str = ""  # output text so far (stop strings cut it)
    emitted: int = 0  # characters of `text` already streamed

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next sample (or, for send_only, before done)."""
        return len(self.token_ids) - self.num_computed


@dataclass
class RequestOutput:
    """What one step produced for one request. `text` is the new, stop-string-safe text."""
    rid: str
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None
    error_status: int = 503
