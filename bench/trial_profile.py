"""Where one of awq-gptq's trial solves (quant/methods._gptq_choice: GPTQ with min-max static groups, no search, no
refit, then its error (W - Q) H (W - Q)^T) spends its GPU time on Llama-3-8B layer shapes: the whole trial, and its
parts timed alone (the damped Cholesky inverse, the sweep with its static group parameters, the error's product).
Random weights, H from 2,048 random inputs scaled per column (an AWQ-like scale folded in). Device only:

    PYTHONPATH=. python bench/trial_profile.py

Results: bench/QUANT.md, session 12."""

import torch

from bench.refit_profile import seconds
from lorafast_export.qform import dequantize
from lorafast_export.quant import gptq

# (group of linears, rows stacked, input width): q/k/v, gate/up, down as awq-gptq's trials solve them
SHAPES = [("qkv", 6144, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def profile_shape(name: str, out: int, n: int, dev: str = "cuda") -> None:
    w = torch.randn(out, n, device=dev) * 0.02
    s = torch.rand(n, device=dev) + 0.5
    x = torch.randn(2048, n, device=dev) * torch.linspace(0.2, 3.0, n, device=dev)
    h = x.T @ x / 2048
    hs = h / s[:, None] / s[None, :]
    ws = w * s[None, :]

    def solve():
        return gptq.gptq_quantize_many([ws], hs, 4, 128, False, act_order=True, static_groups=True)

    def error(qt):
        d = dequantize(qt) / s[None, :] - w
        return float(((d @ h) * d).sum(dtype=torch.float64))

    (qt,) = solve()
    whole = seconds(lambda: error(solve()[0]))
    t_solve = seconds(solve)
    t_err = seconds(lambda: error(qt))
    perm = torch.argsort(torch.diag(hs), descending=True)
    hp = hs[perm][:, perm]
    t_chol = seconds(lambda: gptq.inverse_hessian_cholesky(hp, 0.01))
    print(
        f"{name:8s} [{out} x {n}]: trial {whole * 1e3:7.1f} ms = solve {t_solve * 1e3:7.1f} ms "
        f"(of which the damped Cholesky inverse {t_chol * 1e3:6.1f} ms) + error {t_err * 1e3:6.1f} ms",
        flush=True,
    )


def main() -> None:
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(
        "high"
    )  # as the quantize walk sets it on CUDA (the sweep forces "highest")
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, out, n in SHAPES:
        profile_shape(name, out, n)


if __name__ == "__main__":
    main()
