"""The Triton greedy argmax (runtime/triton_argmax.py) gives torch.argmax's indices: ties, NaNs, infinities,
several rows, vocabularies that are not a multiple of its slice, half-precision logits. CUDA, or the CPU
interpreter."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.runtime.triton_argmax import BLOCK, argmax_last


def _check(x: torch.Tensor) -> None:
    want = x.cpu().argmax(-1)  # torch's own argmax, on the CPU, is the truth here
    got = argmax_last(x.to(DEV))
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got.cpu().tolist(), want.tolist())


@pytest.mark.parametrize("v", [1, 100, BLOCK, BLOCK + 1, 3 * BLOCK - 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_rows_equal_torch_argmax(v, dtype):
    g = torch.Generator().manual_seed(v)
    _check(torch.randn(5, v, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_give_the_first_index_within_a_slice_and_across_slices(dtype):
    v = 3 * BLOCK + 7
    x = torch.zeros(6, v, dtype=dtype)
    x[0, [5, 9, BLOCK + 3]] = 2.0  # in the first slice twice, then later
    x[1, [BLOCK + 4, 2 * BLOCK + 1, v - 1]] = 2.0  # the first tie is in the second slice
    x[2, [v - 2, v - 1]] = 1.0  # in the ragged last slice
    x[3] = 1.5  # every logit equal: index 0
    x[4, [7, BLOCK + 7]] = 3.0  # the same position in two slices
    x[4, 2 * BLOCK] = 3.0
    x[5, v - 1] = -1.0  # the maximum (0) is everywhere else
    _check(x)
    # bf16 rounds near values together: a tie torch also sees
    y = torch.full((1, v), 1.0) + torch.arange(v) * 1e-9
    _check(y.to(dtype))


def test_nan_counts_above_every_number_and_the_first_nan_wins():
    v = 2 * BLOCK + 3
    x = torch.randn(5, v, generator=torch.Generator().manual_seed(0))
    x[0, 17] = float("nan")
    x[1, [BLOCK + 5, BLOCK + 9, 3]] = float("nan")  # the first NaN is in the first slice
    x[1, 0] = float("inf")
    x[2, [v - 1]] = float("nan")
    x[2, 4] = float("inf")
    x[3] = float("nan")
    x[4, [BLOCK, 2 * BLOCK + 1]] = float("nan")
    _check(x)
    _check(x.bfloat16())


def test_infinities_compare_as_numbers():
    v = BLOCK + 40
    x = torch.full((4, v), float("-inf"))
    x[1, BLOCK + 3] = -1e30  # one finite value among -inf
    x[2, [9, BLOCK + 1]] = float("inf")
    x[3, BLOCK + 2] = 0.0
    x[3, BLOCK + 30] = float("inf")
    _check(x)  # row 0: all -inf, torch returns index 0


def test_shapes_of_a_verify_and_a_strided_view():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, BLOCK + 11, generator=g)  # [requests, k + 1, V]: what a speculative verify takes
    _check(x)
    _check(x[:, 2])  # a view whose rows are strided
    _check(torch.randn(BLOCK + 11, generator=g))  # one row without a batch dimension
    wide = torch.randn(4, 2 * (BLOCK + 11), generator=g)[:, ::2]  # the last dimension strided
    _check(wide)
    assert argmax_last(torch.empty(0, 7, device=DEV)).shape == (0,)


@pytest.mark.parametrize("speculative", [False, True])
def test_runtime_with_triton_argmax_picks_every_greedy_token_through_it(tmp_path, monkeypatch, speculative):
    """Option triton_argmax: the engine's greedy picks (the decode steps and bursts, and with a draft its drafts
    and the verify) go through the kernels, and the tokens are the canonical decoder's greedy ones."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime import loader, triton_argmax
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    calls = []

    def counted(x):
        calls.append(tuple(x.shape))
        return argmax_last(x)

    monkeypatch.setattr(triton_argmax, "argmax_last", counted)
    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    opts = RuntimeOptions(
        compile="off",
        max_seq_len=32,
        max_batch=2,
        batch_buckets=(1, 2),
        triton_argmax="on",
        spec_k=2,
        speculation="always",
    )
    draft = (
        loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts) if speculative else None
    )
    rt = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts, draft=draft)
    assert rt.engine.argmax is counted
    prompts = [[5, 9, 1, 44, 3, 17, 2, 8, 60], [7, 7]]
    ref = load_decoder(md)
    want = [greedy_reference(ref, p, 6) for p in prompts]
    assert [rt.generate_batch([p], 6)[0] for p in prompts] == want
    assert rt.generate_batch(prompts, 6) == want
    assert calls and all(s[-1] == md.config.vocab_size for s in calls)
    if speculative:
        assert rt.engine.stats.spec_rounds > 0 and any(
            s[1:] == (3, md.config.vocab_size) for s in calls
        )  # a verify: [n, k + 1, V]
    # off: torch's argmax, the kernels never run
    calls.clear()
    plain = loader.build_runtime(
        md.config, fp_state(md), None, DEV, torch.float32, opts.replace(triton_argmax="off")
    )
    assert plain.generate_batch(prompts, 6) == want and not calls


def test_option_auto_takes_the_kernels_on_cuda_only_and_old_booleans_still_read():
    """auto (the default since session 37): the kernels on a CUDA device, torch's argmax on a CPU even where
    Triton's interpreter runs; on: wherever Triton runs; off: never. A runtime.json or recipe written when the
    option was a boolean reads as on / off; anything else is refused by name."""
    from lorafast_export.errors import InputError
    from lorafast_export.runtime import loader, triton_argmax
    from lorafast_export.runtime.options import RuntimeOptions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # _argmax only reads the device's type
    assert RuntimeOptions().triton_argmax == "auto"
    assert loader._argmax(RuntimeOptions(), cuda) is triton_argmax.argmax_last
    assert loader._argmax(RuntimeOptions(), cpu) is None
    assert loader._argmax(RuntimeOptions(triton_argmax="off"), cuda) is None
    assert loader._argmax(RuntimeOptions(triton_argmax="on"), cpu) is triton_argmax.argmax_last  # interpreter
    assert RuntimeOptions.from_dict({"triton_argmax": True}).triton_argmax == "on"
    assert RuntimeOptions.from_dict({"triton_argmax": False}).triton_argmax == "off"
    with pytest.raises(InputError, match="triton_argmax='yes'"):
        RuntimeOptions.from_dict({"triton_argmax": "yes"})
