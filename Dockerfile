# GPU image: NVIDIA's PyTorch container brings CUDA, NCCL, torch, Triton, apex and Transformer Engine;
# megatron-core uses apex / Transformer Engine kernels when present. This project's other
# dependencies are installed on top, keeping all of those exactly as the container has them.
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /opt/pretrain
COPY pyproject.toml README.md constraints.txt ./
COPY pretrain ./pretrain
COPY kernels ./kernels
COPY launchers ./launchers
# Install step (tests/test_packaging.py resolves this step with pip against a stand-in container):
# - constraints.txt (the tested versions) minus torch, triton and nvidia-*: the container's builds stay;
#   no `torch`/`cpu` extra either. Minus setuptools too: the container's torch requires its own
#   (torch 2.11 declares setuptools<82; constraints.txt has the newer one torch 2.13 accepts). torch's NGC version (e.g. 2.11.0a0+<git>.nv25.10) satisfies
#   megatron-core's and DeepSpeed's `torch>=` requirements, pip checking installed versions with
#   pre-releases allowed.
# - minus every package the container's own constraint file pins (NGC sets PIP_CONSTRAINT, which stays
#   in force): for those the container's version wins and pyproject's ranges must admit it (pip stops
#   with the conflict otherwise).
# - then check that torch, Triton, apex, Transformer Engine, flash-attn and nvidia-* are unchanged.
RUN set -eu; \
    keep='^(torch|triton|apex|transformer[-_]engine|flash[-_]attn|nvidia-)'; \
    pip list --format=freeze 2>/dev/null | grep -iE "$keep" | sort > /tmp/kept.before; \
    grep -vE '^(torch|triton|nvidia-|setuptools)' constraints.txt > /tmp/constraints.txt; \
    if [ -n "${PIP_CONSTRAINT:-}" ] && [ -f "$PIP_CONSTRAINT" ]; then \
        for name in $(sed -nE 's/^([A-Za-z0-9][A-Za-z0-9._-]*).*/\1/p' "$PIP_CONSTRAINT" | tr 'A-Z_.' 'a-z--'); do \
            sed -i "/^${name}==/d" /tmp/constraints.txt; \
        done; \
    fi; \
    pip install --no-cache-dir -c /tmp/constraints.txt -e .; \
    pip list --format=freeze 2>/dev/null | grep -iE "$keep" | sort > /tmp/kept.after; \
    diff /tmp/kept.before /tmp/kept.after || { echo "pip replaced a container package (above)" >&2; exit 1; }; \
    bash pretrain/data/install_corpus.sh

# Runs as: torchrun --nproc_per_node 8 -m pretrain.train model=gpt3-xl parallel=tp8_dp4_zero1 trainer=gpu
ENTRYPOINT []
CMD ["pretrain-train", "--help"]
