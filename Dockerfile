# GPU image: NVIDIA's PyTorch container brings CUDA, NCCL, apex and Transformer Engine; megatron-core
# uses apex / Transformer Engine kernels when present. This project's other pinned dependencies are
# installed on top, keeping the container's torch (no `torch` extra).
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /opt/pretrain
COPY pyproject.toml README.md ./
COPY pretrain ./pretrain
COPY kernels ./kernels
COPY conf ./conf
COPY launchers ./launchers
RUN pip install --no-cache-dir -e . \
    && bash pretrain/data/install_corpus.sh

# Runs as: torchrun --nproc_per_node 8 -m pretrain.train model=gpt3-xl parallel=tp8_dp4_zero1 trainer=gpu
ENTRYPOINT []
CMD ["pretrain-train", "--help"]
