# Serve a lorafast-export `trt-llm` bundle with TensorRT-LLM's OpenAI-compatible server (PyTorch backend).
#
#   lorafast-export build ... --target trt-llm --quant awq --symmetric --out dist/trt
#   docker build -f docker/trtllm.Dockerfile --build-arg BUNDLE=dist/trt/model -t my-model:trtllm .
#   docker run --rm --gpus all --ipc host --ulimit memlock=-1 --ulimit stack=67108864 -p 8000:8000 my-model:trtllm
#
# The bundle's serve.sh holds the command line (trtllm-serve --backend pytorch ... --extra_llm_api_options).
# TRTLLM_VERSION: a release image tag of nvcr.io/nvidia/tensorrt-llm/release; pick the one you validated against.
# For a --trt-llm-legacy checkpoint use a release <= 1.2 and run its build.sh (trtllm-build) before serving
# (that layout is the one for --quant smoothquant; SmoothQuant engines need a GPU of compute capability 7.0-9.0).
ARG TRTLLM_VERSION=1.2.0
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION}

ARG BUNDLE=model
COPY ${BUNDLE} /opt/model
WORKDIR /opt/model
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD ["curl", "-fsS", "http://localhost:8000/health"]
ENTRYPOINT ["/opt/model/serve.sh"]
