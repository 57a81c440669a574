"""Streaming token loader with the challenge baseline's exact batch semantics.

There is no shuffling, sampling or worker process: shards are read in sorted order and the
stream wraps around forever, so a run sees the same tokens in the same order as the
baseline `train_gpt.py` for the same shards, world size and batch size. The stream position
is two integers, which makes resuming a run exact.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from pgolf.data.shards import read_shard, shard_token_count
from pgolf.errors import PgolfError


def check_token_ids(tokens: torch.Tensor, vocab_size: int, where: str) -> None:
    """Every token id must index the model's vocab_size-row embedding and byte tables."""
    top = int(tokens.numpy().max()) if tokens.numel() else -1  # (torch has no max for uint16)
    if top >= vocab_size:
        raise PgolfError(f"{where}: token id {top} is not below vocab_size={vocab_size}; these tokens were made with "
                         "another tokenizer: use its data.tokenizer_path and model.vocab_size, or re-create the shards")


def _match(pattern: str, what: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise PgolfError(
            f"{what} {pattern}: no file matches; download shards with "
            "`python -m pgolf.data download --variant sp1024 --train-shards 10` or use data=stdlib"
        )
    return files


class TokenStream:
    """Reads the shards matching `pattern` in sorted order and wraps around forever.

    What a run relies on is checked before the first token is used, at no cost per step: every
    shard's header (magic, version, size) and that it holds tokens, all read from the 1 KB
    headers at construction (an empty shard would make the stream spin forever); and, with
    `vocab_size`, that every token id is below it, checked vectorised when a shard is first
    read (an id past the embedding table fails deep inside the model, or on CUDA as a device
    assert)."""

    def __init__(self, pattern: str, *, vocab_size: int | None = None):
        self.pattern, self.vocab_size = pattern, vocab_size
        self.files = _match(pattern, "token shards")
        counts = [shard_token_count(f) for f in self.files]
        for f, n in zip(self.files, counts):
            if n == 0:
                raise PgolfError(f"{f} (one of the {len(self.files)} shards of {pattern}) holds no tokens; delete it "
                                 "or re-create the shards with `python -m pgolf.data prepare ...`")
        self.total_tokens = sum(counts)
        self._checked: set[int] = set()
        self._open(0)

    def _open(self, file_idx: int) -> None:
        self.file_idx = file_idx
        self.tokens = read_shard(self.files[file_idx])
        self.pos = 0
        if self.vocab_size is not None and file_idx not in self._checked:
            check_token_ids(self.tokens, self.vocab_size, str(self.files[file_idx]))
            self._checked.add(file_idx)

    def take(self, n: int) -> torch.Tensor:
        """Return the next `n` tokens (uint16), crossing shard boundaries as needed."""
        chunks: list[torch.Tensor] = []
        remaining = n
        while remaining > 0:
            avail = self.tokens.numel() - self.pos
            if avail <= 0:
                self._open((self.file_idx + 1) % len(self.files))
                continue
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def state_dict(self) -> dict[str, int]:
        """The stream position: which shard (index into the sorted file list) and where in it."""
        return {"file_idx": self.file_idx, "pos": self.pos, "num_files": len(self.files)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Jump to a position saved by `state_dict`; the shard set must be the same one."""
        if state.get("kind", "sequential") != "sequential":
            raise PgolfError(f"loader state was saved by the {state['kind']} loader, this run uses data.loader="
                             "sequential; resume with the same loader")
        if int(state["num_files"]) != len(self.files):
            raise PgolfError(
                f"loader state was saved with {state['num_files']} shards but {len(self.files)} match now "
                f"({self.files[0].parent}); resume with the same shard set"
            )
        self._open(int(state["file_idx"]))
        if not 0 <= int(state["pos"]) <= self.tokens.numel():
            raise PgolfError(
                f"{self.files[self.file_idx]}: saved position {state['pos']} is past its "
                f"{self.tokens.numel()} tokens; the shard changed since the checkpoint, resume with the same shards"
            )
        self.pos = int(state["pos"])


class DistributedTokenLoader:
    """Gives each rank its (x, y) slice of one shared, deterministic token stream.

    Every call takes one contiguous chunk of `world_size * (local_tokens + 1)` tokens and
    rank r gets the span starting at `r * (local_tokens + 1)`; the extra token per span is
    what lets y be x shifted by one. All ranks read the same stream, so their states agree.
    """

    def __init__(self, pattern: str, *, rank: int, world_size: int, device: torch.device | str,
                 vocab_size: int | None = None):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.stream = TokenStream(pattern, vocab_size=vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return int64 (x, y), each (local_tokens // seq_len, seq_len), for one micro-step."""
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise PgolfError(
                f"train_batch_tokens={global_tokens} gives {local_tokens} tokens per rank per micro-step "
                f"(world_size={self.world_size}, grad_accum_steps={grad_accum_steps}), not a positive multiple "
                f"of seq_len={seq_len}; make train_batch_tokens a multiple of world_size*grad_accum_steps*seq_len"
            )
        span = local_tokens + 1
        if span * self.world_size > self.stream.total_tokens:  # the batch would repeat tokens within itself
            raise PgolfError(
                f"train shards {self.stream.pattern} hold {self.stream.total_tokens} tokens, fewer than one "
                f"micro-batch reads ({self.world_size} x {span}); add training data or lower "
                "schedule.train_batch_tokens"
            )
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(torch.int64)
        if self.device.type == "cuda":
            # Pinned host memory makes the copy truly asynchronous, overlapping it with compute.
            local = local.pin_memory().to(self.device, non_blocking=True)
        else:
            local = local.to(self.device)  # a no-op on CPU
        # x and y are (B, T) views of the same span, shifted by one token: no further copies.
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict[str, int]:
        """The shared stream position; identical on every rank."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()` so the next batch is exactly the one the saved run would get."""
        self.stream.load_state_dict(state)


def load_validation_tokens(pattern: str, seq_len: int, *, vocab_size: int | None = None) -> torch.Tensor:
    """Concatenate every validation shard (sorted) and keep `((n-1)//seq_len)*seq_len + 1`
    tokens, as the baseline does: whole sequences plus the one target past the last. With
    `vocab_size`, every token id must be below it (checked once, vectorised)."""
    tokens = torch.cat([read_shard(f) for f in _match(pattern, "validation split")]).contiguous()
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, f"validation split {pattern}")
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise PgolfError(
            f"validation split {pattern} has {tokens.numel()} tokens, fewer than seq_len+1={seq_len + 1}; "
            f"set eval.seq_len (default schedule.train_seq_len) to at most {tokens.numel() - 1}"
        )
    return tokens[: usable + 1]
