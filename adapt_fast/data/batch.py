"""The packed micro-batch: a flat stream of token slots, examples end to end, grouped by task.

This is the contract between the loader, the model's attention and the loss/ghost kernels.
Attention never crosses examples (`cu_seqlens`), so every gradient splits exactly by task.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100
PAD_TASK = -1  # task id of padding slots; kernels ignore ids outside [0, K)


@dataclass
class MicroBatch:
    """One rank's micro-batch of T token slots holding N segments (examples, then padding if any).

    input_ids    (T,) int64   token ids; padding slots hold 0
    labels       (T,) int64   HF convention (unshifted): -100 on prompt tokens, padding and the
                              first token of every example, so a global shift never crosses examples
    position_ids (T,) int64   restart at 0 for every example (and for the padding segment)
    cu_seqlens   (N+1,) int32 segment boundaries; cu_seqlens[-1] == T
    task_ids     (T,) int64   task of each slot's example; PAD_TASK on padding
    task_offsets (K+1,) int64 task k's examples occupy slots [task_offsets[k], task_offsets[k+1])
    max_seqlen   int          longest segment
    num_examples int          real examples (the first num_examples segments; padding is after)
    global_loss_tokens int    loss tokens of the whole global micro-step (all ranks' micro-batches)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    task_ids: torch.Tensor
    task_offsets: torch.Tensor
    max_seqlen: int
    num_examples: int
    global_loss_tokens: int = 0  # loss tokens in this global micro-step, all ranks (for the token mean)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_tasks(self) -> int:
        return int(self.task_offsets.numel() - 1)

    def to(self, device: torch.device | str) -> MicroBatch:
        """The batch on `device`. To CUDA through pinned memory: a copy from pageable memory waits for the GPU's
        queued work first, so the host could not prepare the next micro-batch while the GPU runs this one."""
        pin = torch.device(device).type == "cuda"

        def move(v: torch.Tensor) -> torch.Tensor:
            if pin and v.device.type == "cpu":
                v = v.pin_memory()
            return v.to(device, non_blocking=True)

        moved = {f.name: (move(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)}
        return MicroBatch(**moved)

    def shift_labels(self) -> torch.Tensor:
        """(T,) target of each position: labels[t + 1], and -100 at the last slot."""
        shifted = torch.full_like(self.labels, IGNORE_INDEX)
        shifted[:-1] = self.labels[1:]
        return shifted

    def model_inputs(self) -> dict:
        """Keyword arguments for an HF causal LM forward with the document-masked attention."""
        return {
            "input_ids": self.input_ids[None],
            "position_ids": self.position_ids[None],
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,  # a KV cache would also switch off HF's own packing detection
        }

    def loss_tokens_per_task(self) -> torch.Tensor:
        """(K,) int64: tokens that carry a loss (shifted labels != -100) per task."""
        mask = (self.shift_labels() != IGNORE_INDEX) & (self.task_ids >= 0)
        return torch.bincount(self.task_ids[mask], minlength=self.num_tasks)[: self.num_tasks]

    def to_rows(self) -> dict:
        """A padded (B, L) view for attention that needs rows: one row per real example.

        Returns input_ids, labels, position_ids (B, L), attention_mask (B, L) bool and `index`
        (B, L) int64 giving each row slot's position in the flat stream (-1 on row padding),
        so per-row outputs can be scattered back.
        """
        starts = self.cu_seqlens[: self.num_examples].long()
        lengths = (self.cu_seqlens[1 : self.num_examples + 1] - self.cu_seqlens[: self.num_examples]).long()
        width = int(lengths.max()) if self.num_examples else 0
        cols = torch.arange(width, device=starts.device)
        valid = cols[None, :] < lengths[:, None]
        index = torch.where(valid, starts[:, None] + cols[None, :], torch.full_like(valid, -1, dtype=torch.long))
        safe = index.clamp(min=0)
        return {
            "input_ids": torch.where(valid, self.input_ids[safe], 0),
            "labels": torch.where(valid, self.labels[safe], IGNORE_INDEX),
            "position_ids": torch.where(valid, self.position_ids[safe], 0),
            "attention_mask": valid,
            "index": index,
        }
