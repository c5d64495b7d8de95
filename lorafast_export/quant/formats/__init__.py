"""Pack the one quantized form (QTensor) into the ecosystem's checkpoint layouts, and back, bit-exactly."""

from lorafast_export.quant.formats.awq import awq_quant_config, pack_awq, unpack_awq
from lorafast_export.quant.formats.compressed_tensors import (
    compressed_tensors_config,
    compressed_tensors_format,
    pack_compressed_tensors,
    scheme_from_config_group,
    unpack_compressed_tensors,
)
from lorafast_export.quant.formats.gptq import gptq_quant_config, pack_gptq, unpack_gptq

__all__ = [
    "awq_quant_config",
    "compressed_tensors_config",
    "compressed_tensors_format",
    "gptq_quant_config",
    "pack_awq",
    "pack_compressed_tensors",
    "pack_gptq",
    "scheme_from_config_group",
    "unpack_awq",
    "unpack_compressed_tensors",
    "unpack_gptq",
]
