"""Target `onnxruntime`: one ONNX decoder graph of onnxruntime's fused ops, run by onnxruntime-genai.

Artifact (model/): model.onnx + model.onnx.data, genai_config.json, config.json and the tokenizer files.
onnxruntime-genai (og.Model / og.Generator) loads the directory unchanged; plain onnxruntime runs model.onnx
with an explicit KV cache (input_ids, attention_mask, past_key_values.N.key/value → logits, present.N.*).

Graph (ort/decoder_graph.py): Gather embedding → per layer SimplifiedLayerNormalization /
SkipSimplifiedLayerNormalization, q/k/v linears, com.microsoft GroupQueryAttention with rotary inside
(do_rotary=1; cos/sin caches computed from model.spec.rope_inv_freq, so linear and llama3 rope scaling are
right; Mistral's sliding window → local_window_size), SiLU MLP → final norm → lm_head. No MatMul/Softmax
attention chain. Linears: fp32/fp16 MatMul when unquantized; MatMulNBits holding the QTensor's codes,
scales and zero points bit for bit (ort/nbits.py; act-order by an input-column Gather, since MatMulNBits'
g_idx input is deprecated); W8A8 (SmoothQuant) as per-token int8 quantization + MatMulInteger, exact in
integer arithmetic.

Why the graph is written here rather than exported (DESIGN.md prefers the runtime's own exporter):
- onnxruntime-genai's model builder quantizes float weights itself (its own RTN/k-quant); it takes
  pre-quantized codes only through GPTQ/AWQ checkpoints of layouts it knows, through the deprecated g_idx
  input for act-order, and not at all for W8A8. Routing our IR through a checkpoint format and back would
  make "the same codes reach every runtime" depend on two packers agreeing. Building MatMulNBits from the
  QTensor ourselves makes it true by construction, and a test unpacks the initializers to check it.
- torch.onnx export of the canonical decoder followed by onnxruntime's transformer fusions would need
  the attention pattern to match a GQA fusion (and our rope variants to survive constant folding), then a
  second pass to swap MatMuls for MatMulNBits: more moving parts for the same graph.
- The graph is small and declarative (about 20 node kinds), uses exactly the ops and I/O names the
  builder emits, so onnxruntime-genai runs it as one of its own models.

Lowering error, measured on the test models (unquantized, MatMulNBits, W8A8, accuracy_level=4, float16):
bench/ORT.md, "Lowering error". accuracy_level=4 is a second quantization, not a lowering: an option, not the
default.

Options (recipe target.options): accuracy_level (0-4, default 0), max_length (rotary cache rows and
genai context_length; default max_position_embeddings), fuse_qkv (default true: q/k/v rows concatenated
into one MatMulNBits/MatMul, as the builder does; their codes unchanged). target.dtype: auto (= float32) |
float32 | float16 (bfloat16 is refused: not validated with onnxruntime's CPU kernels).
Limits: head_dim must be a multiple of 16 (GroupQueryAttention); quantization group sizes must be
multiples of 16 (MatMulNBits blocks); act-order groups must all have group_size columns (GPTQ's do).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafast_export.errors import InputError, RuntimeMissingError, UnsupportedError
from lorafast_export.model.spec import ModelConfig
from lorafast_export.specs import ORT_DTYPES, ort_option_problems
from lorafast_export.targets.registry import LowerInput, recorded_path_problems, register
from lorafast_export.weights import TOKENIZER_FILES, open_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def settings_from(recipe, cfg: ModelConfig):
    """recipe.target (dtype, options) → GraphSettings; every bad option reported at once."""
    from lorafast_export.targets.onnxruntime.decoder_graph import GraphSettings

    opts = dict(recipe.target.options or {})
    problems = ort_option_problems(opts, recipe.target.dtype)
    if problems:
        raise InputError("target onnxruntime: " + "; ".join(problems) + ".")
    return GraphSettings(
        dtype=ORT_DTYPES[recipe.target.dtype],
        accuracy_level=opts.get("accuracy_level", 0),
        max_length=opts.get("max_length", cfg.max_position_embeddings),
        fuse_qkv=opts.get("fuse_qkv", True),
    )


# ------------------------------------------------------------------------------------------- weights


class CheckpointWeights:
    """fp tensors of the merged checkpoint (read one at a time with positional reads); nothing is quantized."""

    def __init__(self, store):
        self.store = store

    def fp(self, name: str) -> torch.Tensor | None:
        return self.store.get(name) if name in self.store else None

    def q(self, module: str):
        return None


@dataclass
class QuantizedWeights:
    """A QuantizedModel: QTensors by module path, every other tensor (folded norms included) from .fp."""

    qm: object

    def fp(self, name: str) -> torch.Tensor | None:
        return self.qm.fp.get(name)

    def q(self, module: str):
        return self.qm.q.get(module)


# ------------------------------------------------------------------------------------------ artifact


def genai_config(cfg: ModelConfig, max_length: int, gen: dict) -> dict:
    """onnxruntime-genai's genai_config.json for our graph's I/O names (greedy search by default)."""
    eos = gen.get("eos_token_id", cfg.raw.get("eos_token_id"))
    eos = eos if eos is not None else 0
    pad = gen.get("pad_token_id", cfg.raw.get("pad_token_id"))
    bos = gen.get("bos_token_id", cfg.raw.get("bos_token_id"))
    return {
        "model": {
            "bos_token_id": bos if bos is not None else (eos[0] if isinstance(eos, list) else eos),
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": cfg.family,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "do_sample": bool(gen.get("do_sample", False)),
            "num_beams": 1,
            "max_length": max_length,
            "min_length": 0,
            "past_present_share_buffer": True,
            "early_stopping": True,
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "num_return_sequences": 1,
            "diversity_penalty": 0.0,
        },
    }


def _copy_side_files(src: Path, out_dir: Path) -> None:
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).exists():
            shutil.copy2(src / name, out_dir / name)


# ------------------------------------------------------------------------------------------- session


class OrtSession:
    """logits(): plain onnxruntime, whole input as a prefill with empty past. generate(): onnxruntime-genai."""

    # generate() runs onnxruntime-genai's own model, never self.sess: validation may decode in one thread while
    # another computes logits (validate/run.py)
    decodes_beside_logits = True

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        providers = ["CPUExecutionProvider"]
        if device not in ("cpu", "auto"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError(
                    f"onnxruntime here has no provider for device {device!r} "
                    f"(available: {ort.get_available_providers()}); validate on cpu."
                )
            providers = ["CUDAExecutionProvider", *providers]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # Workers sleep between runs instead of spinning: validation runs torch between two runs of this session
        # (metrics, other stages), and on a 2-core CPU a spinning worker took a core from it (16 demo blocks,
        # each one run + float64 metrics: 2.84 s instead of 3.58 s, identical logits).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(self.model_dir / MODEL_FILE), so, providers=providers)
        self.past_inputs = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv_dtype = np.float16 if self.past_inputs[0].type == "tensor(float16)" else np.float32
        self.threads = threads  # 0: onnxruntime's default (one per physical core)
        self.context_length = json.loads((self.model_dir / "genai_config.json").read_text())["model"][
            "context_length"
        ]
        self._og_model = None

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), self.kv_dtype) for i in self.past_inputs}

    def step(self, input_ids: torch.Tensor, past: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict]:
        """One forward with an explicit cache: ids [b, s] after `past` → (logits [b, s, V], next past).

        GroupQueryAttention takes s > 1 after a non-empty past only at batch size 1 (prefill any batch,
        then decode one token at a time, as onnxruntime-genai does).
        """
        b, s = input_ids.shape
        past_len = next(iter(past.values())).shape[2]
        feeds = {
            "input_ids": input_ids.numpy().astype(np.int64),
            "attention_mask": np.ones((b, past_len + s), np.int64),
            **past,
        }
        names = ["logits", *(i.name.replace("past_key_values.", "present.") for i in self.past_inputs)]
        out = self.sess.run(names, feeds)
        present = {i.name: o for i, o in zip(self.past_inputs, out[1:])}
        return torch.from_numpy(out[0]).float(), present

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids.cpu(), self.empty_past(input_ids.shape[0]))[0]

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        import onnxruntime_genai as og

        total = len(input_ids) + max_new_tokens
        if total > self.context_length:
            raise InputError(
                f"{len(input_ids)} prompt + {max_new_tokens} new tokens exceed this artifact's "
                f"max_length={self.context_length}; rebuild with target.options.max_length >= {total}."
            )
        if self._og_model is None:
            config = og.Config(str(self.model_dir))
            if self.threads:
                config.overlay(
                    json.dumps(
                        {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}
                    )
                )
            self._og_model = og.Model(config)
        params = og.GeneratorParams(self._og_model)
        params.set_search_options(
            do_sample=False, max_length=total, min_length=total
        )  # min: ignore EOS like hf
        gen = og.Generator(self._og_model, params)
        gen.append_tokens(np.asarray([input_ids], dtype=np.int32))
        new: list[int] = []
        while len(new) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        return new


# -------------------------------------------------------------------------------------------- target


class OnnxRuntimeTarget:
    name = "onnxruntime"
    install_hint = "pip install 'lorafast-export[onnxruntime]'"

    def available(self) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxruntime_genai  # noqa: F401
        except ImportError as e:
            return False, f"{e.name or e} is not installed: {self.install_hint}"
        return True, self.install_hint

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        ok, hint = self.available()
        if not ok:
            raise RuntimeMissingError(f"target onnxruntime cannot lower here: {hint}")
        from lorafast_export.targets.onnxruntime.decoder_graph import build_decoder_graph

        cfg = inp.config
        settings = settings_from(inp.recipe, cfg)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if inp.quantized is not None:
            weights = QuantizedWeights(inp.quantized)
        else:
            weights = CheckpointWeights(open_model(inp.merged_dir).store)
        facts = build_decoder_graph(cfg, weights, settings, out_dir / MODEL_FILE)
        gen_path = Path(inp.merged_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        (out_dir / "genai_config.json").write_text(
            json.dumps(genai_config(cfg, settings.max_length, gen), indent=2)
        )
        _copy_side_files(Path(inp.merged_dir), out_dir)
        log.info("onnxruntime: wrote %s (%s)", out_dir / MODEL_FILE, facts["ops"])
        return {
            "format": "onnx+genai",
            "dtype": settings.dtype,
            "accuracy_level": settings.accuracy_level,
            "max_length": settings.max_length,
            "fuse_qkv": settings.fuse_qkv,
            **facts,
        }

    def load(self, model_dir: Path, device: str = "cpu") -> OrtSession:
        ok, hint = self.available()
        if not ok:
            raise RuntimeMissingError(f"target onnxruntime cannot load here: {hint}")
        escapes = recorded_path_problems(self.name, Path(model_dir))
        if escapes:  # onnxruntime-genai would open that file: refuse before it does
            raise InputError(
                f"{model_dir}: " + "; ".join(escapes) + ". The artifact is damaged or was tampered "
                "with; rebuild it (lorafast-export verify lists what changed)."
            )
        return OrtSession(Path(model_dir), device)


register(OnnxRuntimeTarget())
