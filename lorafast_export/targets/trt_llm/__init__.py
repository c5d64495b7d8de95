"""TensorRT-LLM target internals: scheme (quant_algo, options, refusals), pack (layout math), weights (sources),
hf_bundle (PyTorch-backend bundle), legacy (engine checkpoint), reader (reference dequantizer and, for SmoothQuant,
per-token activation quantization), layout (a bundle's names/dtypes/shapes, and our SmoothQuant layout vs ModelOpt's)."""
