"""Per-group range search: shrink each row's [min, max] (or absmax) and keep the candidate whose rounding error
is smallest, instead of plain min-max.

The reference is GPTQ's own `Quantizer.find_params(mse=True)` (IST-DASLab/gptq quant.py; llm-compressor's
"mse" observer and GPTQModel's `mse` option are the same loop): candidates p = 1, 1 - 1/grid, ...,
1 - max_shrink, range [p·min, p·max], error Σ |w - Q(w)|^norm per row. Here the error may be weighted per
column by diag(H) (the calibration energy of each input, the diagonal of GPTQ's own objective), which is
what the output error of independent rounding is. The candidates' scales go through `qparams`, so they are
rounded to scale_dtype exactly as a plain min-max scale is.
"""

from __future__ import annotations

import torch

from lorafast_export.quant.rtn import qparams

# largest [candidates, out, k] temporary: on the CPU 16 MB of float32 (larger ran 8x slower: out of cache); on a GPU
# 256 MB (fewer, larger launches)
CHUNK_ELEMENTS = {"cpu": 2**22}
CHUNK_ELEMENTS_GPU = 2**26


def search_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    grid: int,
    max_shrink: float,
    norm: float = 2.0,
    col_weight: torch.Tensor | None = None,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [out, k] float32 → (scale [out], zero [out] or None): the best of the shrunk ranges per row.

    col_weight [k] or [out, k] (>= 0) weights each column's error (e.g. diag(H)), the same for every row or per row
    (rows of several groups searched at once); None weighs them equally. p = 1 (plain min-max) is always a
    candidate, so the result never has a larger error than min-max on w. Candidates are scored `chunk` at a time,
    fewer where w is large (the [chunk, out, k] temporaries stay under CHUNK_ELEMENTS); each row's choice is the first
    candidate of least error whatever the chunking.
    """
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)  # [out]
    n = int(max_shrink * grid) + 1  # p = 1 - i/grid for i = 0 .. max_shrink·grid
    best_s, best_z = qparams(wmin, wmax, bits, symmetric, scale_dtype)
    best_err = torch.full_like(wmin, float("inf"))
    colw = None if col_weight is None else col_weight.float().expand_as(w)[None]  # [1, out, k]
    limit = CHUNK_ELEMENTS.get(w.device.type, CHUNK_ELEMENTS_GPU)
    chunk = max(1, min(chunk, limit // max(1, w.numel())))
    rows = torch.arange(w.shape[0], device=w.device)
    maxq = 2**bits - 1
    buf = torch.empty(
        min(chunk, n), *w.shape, device=w.device, dtype=torch.float32
    )  # [c, out, k], every chunk's
    for i0 in range(0, n, chunk):  # candidates in chunks: [c, out, k] temporaries stay small
        p = 1.0 - torch.arange(i0, min(i0 + chunk, n), device=w.device, dtype=torch.float32) / grid  # [c]
        s, z = qparams(p[:, None] * wmin, p[:, None] * wmax, bits, symmetric, scale_dtype)  # [c, out]
        sf = s.float()[..., None]  # [c, out, 1]
        zf = 2.0 ** (bits - 1) if z is None else z.float()[..., None]
        e = buf[: len(p)]
        # rtn.quantize_codes, then dequantized, in one buffer (the same float32 operations, no uint8 round trip and
        # no temporaries: 5x less CPU at g128 asymmetric): round(w / s) + z clamped to the grid, minus z, times s
        torch.div(w[None], sf, out=e).round_().add_(zf).clamp_(0, maxq).sub_(zf).mul_(sf).sub_(w[None])
        e = e.square_() if norm == 2.0 else e.abs_().pow_(norm)
        err = (e if colw is None else e.mul_(colw)).sum(dim=2)  # [c, out]
        e, j = err.min(dim=0)  # best candidate of this chunk, per row
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, s[j, rows], best_s)
        if z is not None:
            best_z = torch.where(better, z[j, rows], best_z)
    return best_s, best_z
