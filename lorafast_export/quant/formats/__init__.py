"""Pack the one quantized form (QTensor) into the ecosystem's checkpoint layouts, and back, bit-exactly."""

from lorafast_export.quant.formats.awq import awq_quant_config, pack_awq, unpack_awq
from lorafast_export.quant.formats.compressed_tensors import (
    compressed_tensors_config,
    compressed_tensors_format,
    compressed_tensors_loader_notes,
    ct_fake_quant_int8_per_token,
    pack_compressed_tensors,
    scheme_from_config_group,
    unpack_compressed_tensors,
)
from lorafast_export.quant.formats.gptq import gptq_quant_config, pack_gptq, unpack_gptq

__all__ = [
    "awq_quant_config",
    "compressed_tensors_config",
    "compressed_tensors_format",
    "compressed_tensors_loader_notes",
    "ct_fake_quant_int8_per_token",
    "gptq_quant_config",
    "pack_awq",
    "pack_compressed_tensors",
    "pack_gptq",
    "scheme_from_config_group",
    "unpack_awq",
    "unpack_compressed_tensors",
    "unpack_gptq",
]
