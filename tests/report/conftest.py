"""A sample report built from the metrics functions on synthetic logits (no hand-typed numbers)."""

from __future__ import annotations

import pytest
import torch

from lorafast_export.report.schema import (
    ArtifactInfo,
    EvalSetInfo,
    LayerError,
    Report,
    StageResult,
    build_report,
    stage_result,
)
from lorafast_export.validate.metrics import (
    IGNORE_INDEX,
    MetricAccumulator,
    PerplexityAccumulator,
    greedy_agreement,
)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _stage_logits(ref: torch.Tensor, bump: torch.Tensor, quant_noise: float, keep_adapter: float, g) -> dict:
    """Logits of each pipeline stage: fp32 merge ~ exact, fp16 rounding, quantization noise growing with
    position (and eating part of the adapter's bump), lowering ~ float rounding on top of quantized."""
    seq = ref.shape[1]
    growth = (0.5 + torch.arange(seq) / seq).view(1, seq, 1)
    quantized = ref + quant_noise * growth * torch.randn(ref.shape, generator=g) - (1 - keep_adapter) * bump
    return {
        "merged-fp32": ref + 1e-6 * torch.randn(ref.shape, generator=g),
        "merged-fp16": ref.half().float(),
        "quantized": quantized,
        "artifact": quantized + 3e-3 * torch.randn(ref.shape, generator=g),
    }


def _greedy(stage: str, prompts: int, new_tokens: int, vocab: int, g) -> tuple[list, list]:
    ref = torch.randint(vocab, (prompts, new_tokens), generator=g)
    cand = ref.clone()
    if stage in ("quantized", "artifact"):
        for row in range(0, prompts, 2):  # every other prompt diverges somewhere
            cand[row, int(torch.randint(new_tokens, (1,), generator=g)) :] = (ref[row, 0] + 1) % vocab
    return ref.tolist(), cand.tolist()


def _eval_set(
    name: str, seed: int, batch: int, seq: int, vocab: int, quant_noise: float, keep_adapter: float
):
    g = torch.Generator().manual_seed(seed)
    base = 4.0 * torch.randn(batch, seq, vocab, generator=g)
    probs = torch.softmax(base, dim=-1).reshape(
        -1, vocab
    )  # labels drawn from the base model's own distribution
    labels = torch.multinomial(probs, 1, generator=g).reshape(batch, seq)
    labels[0, seq - seq // 8 :] = IGNORE_INDEX  # padding at the end of one sequence
    bump = 1.5 * torch.nn.functional.one_hot(labels.clamp_min(0), vocab).float()  # the adapter's effect
    ref = base + bump
    base_ppl = PerplexityAccumulator()
    for b in range(batch):  # stream one sequence at a time, as the orchestration does
        base_ppl.update(base[b : b + 1], labels[b : b + 1])
    stages, previous, results = _stage_logits(ref, bump, quant_noise, keep_adapter, g), ref, []
    prev_name = None
    for stage, logits in stages.items():
        vs_ref, vs_prev = MetricAccumulator(), MetricAccumulator()
        for b in range(batch):
            vs_ref.update(ref[b : b + 1], logits[b : b + 1], labels[b : b + 1])
            vs_prev.update(previous[b : b + 1], logits[b : b + 1], labels[b : b + 1])
        greedy = greedy_agreement(*_greedy(stage, 8, 32, vocab, g))
        m = vs_ref.result()
        results.append(stage_result(stage, name, m, vs_prev.result(), prev_name or "reference", greedy))
        previous, prev_name = logits, stage
    info = EvalSetInfo(
        name=name, tokens=m["tokens"], sequences=batch, ppl_ref=m["ppl_ref"], ppl_base=base_ppl.ppl
    )
    return info, results


def layer_errors(layers: int, seed: int = 0) -> list[LayerError]:
    g = torch.Generator().manual_seed(seed)
    return [
        LayerError(
            module=f"model.layers.{i}.{'mlp' if 'p_proj' in m and m[0] in 'gud' else 'self_attn'}.{m}",
            layer=i,
            rel_error=float(0.02 + 0.01 * torch.rand(1, generator=g) + (0.015 if m == "down_proj" else 0.0)),
        )
        for i in range(layers)
        for m in MODULES
    ]


def synthetic_report(
    name: str = "llama-demo-lora",
    quant_noise: float = 0.25,
    keep_adapter: float = 0.9,
    batch: int = 4,
    seq: int = 64,
    vocab: int = 48,
    gates: tuple[str, ...] | None = None,
) -> Report:
    sets = [
        _eval_set(es, seed, batch, seq, vocab, quant_noise, keep_adapter)
        for es, seed in (("prose", 1), ("code", 2))
    ]
    stages: list[StageResult] = [
        s for stage_i in range(4) for _, results in sets for s in results[stage_i : stage_i + 1]
    ]
    extra = {} if gates is None else {"gates": gates}
    return build_report(
        ArtifactInfo(name=name, target="torch_compile", quant="gptq-w4-g128"),
        [info for info, _ in sets],
        stages,
        layer_weight_error=layer_errors(4),
        **extra,
    )


@pytest.fixture(scope="session")
def sample_report() -> Report:
    return synthetic_report()


@pytest.fixture(scope="session")
def failing_report() -> Report:
    """A build whose quantizer erased most of the adapter and added a lot of noise."""
    return synthetic_report(name="llama-demo-broken", quant_noise=1.2, keep_adapter=0.2)
