"""Accuracy metrics streamed block by block against a reference kept on disk (torch and numpy only, so that the
peers' venvs import it too: bench/quant_peers.py computes its own row's statistics with this module).

The reference logits [blocks, seq, vocab] float32 live in one raw file read through a memory map (1.5 GB on the
30M fixture's 180 x 256 eval tokens: the page cache holds it once for every row process). A row never holds more
than one block of logits: per token it keeps KL(ref || cand), top-1 agreement and both next-token NLLs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

TOKEN_FIELDS = ("kl", "same_top1", "nll_ref", "nll_cand")


def write_reference(path: Path, blocks: Iterable[torch.Tensor]) -> None:
    """Each block's reference logits [seq, vocab], in order, into one raw float32 file (written, then renamed)."""
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for logits in blocks:
            f.write(logits.detach().float().contiguous().numpy().tobytes())
    tmp.rename(path)


def open_reference(path: Path, ids: torch.Tensor) -> np.memmap:
    """The raw reference file as [blocks, seq, vocab] for eval ids [blocks, seq] (the vocab from the size)."""
    n, s = ids.shape
    vocab = path.stat().st_size // (4 * n * s)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, s, vocab))


def block_stats(ref: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """ref, cand [seq, vocab] logits of one block, ids [seq] → per-token KL(ref || cand) and top-1 agreement
    [seq]; NLL of the next token under each [seq - 1]."""
    lr, lc = ref.float().log_softmax(-1), cand.float().log_softmax(-1)
    nxt = ids[1:, None]
    return {
        "kl": (lr.exp() * (lr - lc)).sum(-1),
        "same_top1": (lr.argmax(-1) == lc.argmax(-1)).float(),
        "nll_ref": -lr[:-1].gather(-1, nxt)[:, 0],
        "nll_cand": -lc[:-1].gather(-1, nxt)[:, 0],
    }


@torch.no_grad()
def stream_tokens(
    logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, ref: np.memmap, batch: int = 8
) -> dict[str, torch.Tensor]:
    """logits_of(ids [b, seq]) → logits [b, seq, vocab], `batch` eval blocks at a time (larger matmuls) → the
    per-token fields of every block, flattened in block order."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_FIELDS}
    for i0 in range(0, ids.shape[0], batch):
        logits = logits_of(ids[i0 : i0 + batch])
        for j, b in enumerate(ids[i0 : i0 + batch]):
            st = block_stats(torch.from_numpy(np.array(ref[i0 + j])), logits[j], b)
            for k in TOKEN_FIELDS:
                parts[k].append(st[k])
    return {k: torch.cat(v) for k, v in parts.items()}


def summary(tokens: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-token fields → KL mean / p99, same top-1 rate, perplexity ratio candidate / reference."""
    kl = tokens["kl"]
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1": float(tokens["same_top1"].mean()),
        "ppl_ratio": float(torch.exp(tokens["nll_cand"].mean() - tokens["nll_ref"].mean())),
    }
