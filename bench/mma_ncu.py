"""A driver for Nsight Compute: one launch of the CUDA int4 MMA kernel (runtime/cuda_int4.py) per 8B-shaped
linear at 1 row, each with the layout the shipped H200 table chooses, after one warm-up launch that compiles
it. Run it under `ncu -k regex:int4_mma --launch-skip 4` (the warm-ups are the first four launches)."""

from __future__ import annotations

import torch

from lorafast_export.runtime import cuda_int4

SHAPES = {"qkv": (6144, 4096, 8), "o": (4096, 4096, 8), "gate_up": (28672, 4096, 4), "down": (4096, 14336, 8)}


def main() -> None:
    dev, gs = torch.device("cuda"), 128
    g = torch.Generator(device=dev).manual_seed(0)
    calls = []
    for n, k, ksb in SHAPES.values():
        codes = torch.randint(0, 16, (n, k), generator=g, device=dev, dtype=torch.uint8)
        frags = cuda_int4.pack_frags(codes, gs)
        scales = (torch.rand(n, k // gs, generator=g, device=dev) * 0.01).half()
        zeros = torch.randint(0, 16, (n, k // gs), generator=g, device=dev, dtype=torch.uint8)
        x = torch.randn(1, k, generator=g, device=dev).bfloat16()
        calls.append(
            lambda x=x, f=frags, s=scales, z=zeros, k=k, ksb=ksb: cuda_int4.mma_mm(x, f, s, z, k, gs, ksb)
        )
    for c in calls:  # warm-up: compile
        c()
    torch.cuda.synchronize()
    for c in calls:
        c()
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
