# The lorafast-export toolchain on CPU with the ONNX Runtime and OpenVINO targets (no GPU, no TensorRT-LLM).
#
#   docker build -f docker/cpu.Dockerfile -t lorafast-export:cpu .
#   docker run --rm -v "$PWD:/work" -w /work lorafast-export:cpu build --base B --adapter A --target onnxruntime --out dist/ort
#
# torch comes first from PyTorch's CPU index, pinned, so that installing the package pulls in no CUDA wheel;
# lorafast-export itself is installed from this source tree (its dependencies are pinned in pyproject.toml).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lorafast_export ./lorafast_export
# hadolint ignore=DL3013
RUN pip install ".[onnxruntime,openvino]" torch==2.13.0 \
    && useradd --create-home --uid 1000 lorafast

USER 1000
WORKDIR /work
ENTRYPOINT ["lorafast-export"]
CMD ["--help"]
