"""Target `hf`: a Hugging Face checkpoint that transformers loads (merged fp weights, or a quantized format)."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from lorafast_export.errors import ArtifactLoadError, RuntimeMissingError, UnsupportedError
from lorafast_export.outdir import shown_path
from lorafast_export.stagecache import RECORD
from lorafast_export.targets.registry import LowerInput, register

log = logging.getLogger(__name__)


def _dequantized_rounding(model, model_dir: Path) -> str | None:
    """How the loaded model's weights compare with our exact (float32) dequantization of the checkpoint's first
    quantized linear: None where they are equal; else the dtype they were rounded to ("float16", "bfloat16"), or
    "unknown" (transformers 5.25's dequantize=True computes in the scales' dtype; 5.17's in float32)."""
    from lorafast_export.qform import dequantize
    from lorafast_export.quant.read_hf import read_quantized_checkpoint

    qm = read_quantized_checkpoint(model_dir, lazy=True)
    name = next(iter(qm.q))
    exact = dequantize(qm.q[name]).float()
    loaded = model.get_submodule(name).weight.detach().float().cpu()
    if loaded.shape != exact.shape:
        return "unknown"
    if torch.equal(loaded, exact):
        return None
    for dt in ("float16", "bfloat16"):
        if torch.equal(loaded, exact.to(getattr(torch, dt)).float()):
            return dt
    return "unknown"


class _NoLoadReport(logging.Filter):
    """transformers' LOAD REPORT table of an attempt that HFSession answers itself (it retries, or says why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


class HFSession:
    """transformers' own forward and generate: the runtime an `hf` artifact is made for.

    transformers 5.23-5.25 with compressed-tensors 0.20 cannot load an asymmetric pack-quantized checkpoint
    compressed: it builds the module from meta tensors, where compressed-tensors leaves the zero point unpacked
    ([out, groups]) while every such checkpoint (ours, llm-compressor's) stores it packed ([out / 8, groups]), and
    the load stops on the size mismatch. transformers' other way in, CompressedTensorsConfig(dequantize=True),
    loads it with compressed-tensors' own dequantization (5.25: in the scales' dtype); the session then runs that,
    and its runtime_note says so (`dequantized_to`: the dtype the weights were rounded to, measured on one layer
    against our exact dequantization; None where they are exact or the load was compressed)."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        import transformers

        from lorafast_export.quant.export_hf import asymmetric_pack_quantized, checkpoint_loader_notes

        self.dequantized_to: str | None = None
        notes = []
        asym = asymmetric_pack_quantized(model_dir)
        try:
            try:
                model = self._load(model_dir, asym)
            except RuntimeError as e:
                if not ("mismatched_sizes" in str(e) and asym):
                    raise ArtifactLoadError(
                        f"{shown_path(model_dir)}: transformers {transformers.__version__} refuses this "
                        f"checkpoint ({e}). "
                        "The versions an artifact was built and validated with are in its manifest.json "
                        "(versions): load it with those, or build with --no-validate to skip this check."
                    ) from None
                model = self._load(
                    model_dir, asym, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
                )
                self.dequantized_to = _dequantized_rounding(model, model_dir)
                rounded = {"unknown": "rounded (neither to float16 nor to bfloat16)"}.get(
                    self.dequantized_to, f"rounded to {self.dequantized_to}"
                )
                rounding = (
                    "come out exact (float32), so its numbers are those of the checkpoint's codes"
                    if self.dequantized_to is None
                    else f"come out {rounded}, and that rounding is in its numbers"
                )
                notes.append(
                    f"transformers {transformers.__version__} cannot load this asymmetric pack-quantized "
                    "compressed-tensors checkpoint compressed (it builds the zero points unpacked: an upstream "
                    "issue of transformers 5.23+ with compressed-tensors 0.20); the artifact stage loaded it with "
                    f"CompressedTensorsConfig(dequantize=True), whose weights {rounding}. "
                    "transformers 5.17-5.22 load it compressed."
                )
                # logged too: `generate` and `run` show no report note
                log.warning("%s: %s", shown_path(model_dir), notes[-1])
        except ImportError as e:  # GPTQ/AWQ checkpoints need GPTQModel (+ optimum) to load in transformers
            raise RuntimeMissingError(
                f"{shown_path(model_dir)}: transformers cannot load this quantized checkpoint here ({e}). "
                "Install the loader "
                "(GPTQ/AWQ: pip install gptqmodel==7.6.0 optimum==2.3.0), use --hf-format compressed-tensors, "
                "or build with --no-validate."
            ) from None
        self.model = model.to(device).eval()
        self.device = device
        # e.g. a W8A8 compressed-tensors checkpoint: transformers rounds activations differently from our form
        self.runtime_note = " ".join(notes + checkpoint_loader_notes(model_dir)) or None

    @staticmethod
    def _load(model_dir: Path, asym: bool, **kwargs):
        """from_pretrained; for an asymmetric pack-quantized checkpoint (asym) without the LOAD REPORT of a refusal
        that __init__ answers itself, or the warning that its quantization_config wins (it does)."""
        import transformers

        if not asym:
            return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **kwargs)
        quiet = _NoLoadReport()
        log_ = logging.getLogger("transformers.modeling_utils")
        log_.addFilter(quiet)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="You passed `quantization_config`", category=UserWarning
                )
                return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **kwargs)
        finally:
            log_.removeFilter(quiet)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device)).logits.float().cpu()

    @torch.no_grad()
    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([input_ids], device=self.device)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out[0, len(input_ids) :].tolist()


class QuantizedReaderSession:
    """For quantized checkpoints whose transformers loader is not installed: our reading of the files on disk."""

    # the report shows it next to the verdict: the artifact stage's numbers are not transformers' own
    runtime_note = (
        "artifact stage = lorafast-export's reading of the quantized checkpoint in the canonical "
        "decoder; transformers itself was not run (its GPTQ/AWQ loader is not installed here: "
        "pip install gptqmodel==7.6.0 optimum==2.3.0 to validate with transformers)"
    )

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._decoder = None  # built on first use: validation reads the checkpoint layer by layer instead

    def layer_source(self):
        """The checkpoint as validation's layer-streamed evaluator reads it (one layer's codes at a time)."""
        from lorafast_export.quant.read_hf import read_quantized_checkpoint
        from lorafast_export.validate.layers import QuantizedSource

        return QuantizedSource("artifact", read_quantized_checkpoint(self.model_dir, lazy=True))

    def _dec(self):
        if self._decoder is None:
            from lorafast_export.model.quantized import fake_quant_decoder
            from lorafast_export.quant.read_hf import read_quantized_checkpoint

            self._decoder = fake_quant_decoder(read_quantized_checkpoint(self.model_dir))
        return self._decoder

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._dec()(input_ids)[0].float()

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        from lorafast_export.validate.candidates import decoder_greedy

        return decoder_greedy(self._dec(), input_ids, max_new_tokens)


class CheckpointReaderSession(QuantizedReaderSession):
    """A checkpoint too large for transformers to load through host memory whole: validation reads it layer by
    layer in the canonical decoder (a quantized one as QuantizedReaderSession does)."""

    runtime_note = (
        "artifact stage = lorafast-export's reading of the checkpoint, layer by layer, in the canonical decoder; "
        "transformers itself was not run (the model is too large to load whole for validation here)"
    )

    def __init__(self, model_dir: Path):
        import json

        super().__init__(model_dir)
        self.quantized = "quantization_config" in json.loads((self.model_dir / "config.json").read_text())

    def layer_source(self):
        if self.quantized:
            return super().layer_source()
        from lorafast_export.validate.layers import StoreSource
        from lorafast_export.weights import open_model

        md = open_model(self.model_dir)
        return StoreSource("artifact", md.config, md.store)

    def _dec(self):
        if self.quantized:
            return super()._dec()
        if self._decoder is None:
            from lorafast_export.model.decoder import load_decoder
            from lorafast_export.weights import open_model

            self._decoder = load_decoder(open_model(self.model_dir))
        return self._decoder


class HFTarget:
    name = "hf"
    install_hint = "always available (transformers is a core dependency)"

    def available(self) -> tuple[bool, str]:
        return True, self.install_hint

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        if inp.quantized is None:
            shutil.copytree(inp.merged_dir, out_dir, ignore=shutil.ignore_patterns(RECORD))
            return {"format": "merged", "dtype": inp.recipe.merge.dtype}
        try:
            from lorafast_export.quant.export_hf import write_quantized_checkpoint
        except ModuleNotFoundError:
            raise UnsupportedError(
                "quantized hf checkpoints are not available in this version yet."
            ) from None
        return write_quantized_checkpoint(inp, out_dir)

    def load(self, model_dir: Path, device: str = "cpu", whole: bool = True):
        """whole=False (validation of a model too large to load whole through host memory): our reading of the
        checkpoint, layer by layer, instead of transformers."""
        if not whole:
            return CheckpointReaderSession(Path(model_dir))
        try:
            return HFSession(model_dir, device)
        except RuntimeMissingError:
            log.warning(
                "transformers cannot load %s here (GPTQ/AWQ need GPTQModel); validating with our reader",
                shown_path(model_dir),
            )
            return QuantizedReaderSession(model_dir)


register(HFTarget())
