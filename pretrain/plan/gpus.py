"""The GPU catalogue and the cluster a plan runs on: data-sheet numbers plus a few calibrated constants.

Units: FLOP/s, bytes/s (one direction, per GPU), GiB for device memory. ``Cluster`` is what the time and
memory models read; ``load_cluster`` builds it from a catalogue name, a GPU count and, optionally, a
user YAML (``cluster.file=PATH``) whose ``gpus:`` entries add or override catalogue GPUs and whose
other keys (``gpus_per_node``, ``nvlink_bw``, ``network_bw``) override the cluster's links.

Data-sheet numbers (NVIDIA A100, H100, H200 and DGX B200 data sheets; dense, i.e. without the 2:4
sparsity factor the sheets print first):

======== ========== ===== ========= =============== ================== ==========
GPU      bf16 peak  HBM   HBM B/W   NVLink per dir  network per GPU    GPUs/node
======== ========== ===== ========= =============== ================== ==========
A100-40  312 T      40    1.555 TB  300 GB/s (NV3)  25 GB/s (HDR 200G) 8
A100-80  312 T      80    2.039 TB  300 GB/s        25 GB/s            8
H100-SXM 989 T      79.6  3.35 TB   450 GB/s (NV4)  50 GB/s (NDR 400G) 8
H200     989 T      140.4 4.8 TB    450 GB/s        50 GB/s            8
B200     2250 T     179   8.0 TB    900 GB/s (NV5)  50 GB/s (400G)     8
======== ========== ===== ========= =============== ================== ==========

Memory is what the driver reports as usable (H100 81559 MiB, H200 143771 MiB, B200 183359 MiB).

Calibrated constants (the only tuned numbers in the planner; no per-row factors):

- ``gemm_eff``/``gemm_half``: achieved fraction of peak of a bf16 GEMM whose smallest dimension is n,
  ``gemm_eff * n / (n + gemm_half)``. A100: 0.78 and 64, fitted (a grid over the five A100 constants,
  minimising the largest error) to Korthikanti et al. 2022 Table 5, Narayanan et al. 2021 Table 1 and
  the MosaicML rows (PLANNER_DATA.md); 0.78 of 312 is the ~245 TFLOP/s cuBLAS reaches on large A100
  GEMMs. H100/H200: 0.72 (large cuBLAS bf16 GEMMs measure ~700-750 TFLOP/s on the
  power-capped SXM part). B200: 0.70 (early cuBLAS reports), not validated here.
- ``hbm_eff``: fraction of the HBM bandwidth reached by the memory-bound kernels (norms, dropout,
  residual adds, softmax over a materialised score matrix, Adam); 0.80 is what STREAM-like copy
  kernels reach on A100/H100.
- ``nvlink_eff``/``network_eff``: NCCL bus bandwidth over the link's one-direction bandwidth.
  nccl-tests all-reduce alone on DGX A100 reaches ~230 GB/s busbw of 300 (0.77); the fit to the TP=8
  rows (Korthikanti Table 5, Narayanan's 18B/39B) gives 0.60, i.e. ~180 GB/s for the 30-100 MB
  activations of a layer while GEMMs share the GPU. H100/B200 keep the same ratio to nccl-tests
  (~360 of 450 GB/s alone): 0.62. Over InfiniBand rails ~0.85 of line rate at large messages.
- ``flash_eff``: fraction of peak that fused (flash) attention reaches on the attention FLOPs as the
  sources count them (the full s x s score matrix, 4 s^2 a d per sequence forward): FlashAttention-2
  runs causal attention at ~50% of A100 peak on the causal half, i.e. ~0.25 on the full count (0.26
  fitted with the GEMM constants); on H100 FA2 reaches ~35% of peak on the causal half: 0.18.
- ``latency``: fixed cost per collective or send, seconds (NCCL ring latency ~15-30 us).
- ``overhead_gib``: memory outside PyTorch's tensors (CUDA context, cuBLAS workspace, NCCL buffers),
  ~1.5-2 GiB as nvidia-smi shows over torch.cuda.memory_reserved on an idle rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

from pretrain.errors import UserError

T, G = 1e12, 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s
    memory_gib: float  # usable device memory
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s per GPU, one direction
    network_bw: float  # bytes/s per GPU, one direction (one NIC rail per GPU)
    gpus_per_node: int = 8
    gemm_eff: float = 0.75
    gemm_half: float = 64.0
    hbm_eff: float = 0.80
    nvlink_eff: float = 0.77
    network_eff: float = 0.85
    flash_eff: float = 0.25
    latency: float = 20e-6
    overhead_gib: float = 2.0

    def gemm_efficiency(self, m: int, n: int, k: int) -> float:
        """Achieved fraction of peak for an (m x k) @ (k x n) GEMM: tiles waste more on thin shapes."""
        small = min(m, n, k)
        return self.gemm_eff * small / (small + self.gemm_half)


_A100 = dict(peak_flops=312 * T, nvlink_bw=300 * G, network_bw=25 * G, gemm_eff=0.78, gemm_half=64.0,
             nvlink_eff=0.60, flash_eff=0.26)
_H100 = dict(peak_flops=989 * T, nvlink_bw=450 * G, network_bw=50 * G, gemm_eff=0.72, gemm_half=64.0,
             nvlink_eff=0.62, flash_eff=0.18)

CATALOGUE: dict[str, GPU] = {
    "A100-40GB": GPU("A100-40GB", memory_gib=40.0, hbm_bw=1555 * G, **_A100),
    "A100-80GB": GPU("A100-80GB", memory_gib=80.0, hbm_bw=2039 * G, **_A100),
    "H100-SXM": GPU("H100-SXM", memory_gib=79.6, hbm_bw=3350 * G, **_H100),
    "H200": GPU("H200", memory_gib=140.4, hbm_bw=4800 * G, **_H100),
    "B200": GPU("B200", peak_flops=2250 * T, memory_gib=179.0, hbm_bw=8000 * G, nvlink_bw=900 * G,
                network_bw=50 * G, gemm_eff=0.70, gemm_half=128.0, nvlink_eff=0.62, flash_eff=0.18),
}
# Names people type for the same parts.
ALIASES = {"A100": "A100-80GB", "A100-80": "A100-80GB", "A100-40": "A100-40GB", "H100": "H100-SXM",
           "H100-80GB": "H100-SXM"}


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus: int
    gpus_per_node: int
    nvlink_bw: float  # bytes/s, one direction, per GPU
    network_bw: float  # bytes/s, one direction, per GPU

    def link(self, group: int, stride: int) -> tuple[float, float]:
        """(achieved bus bandwidth, latency) of a collective over ``group`` ranks spaced ``stride`` apart.

        Ranks are laid out tensor-fastest (tp, then cp, then dp, then pp, as the trainer does), so a group
        stays on NVLink while group * stride fits in a node; otherwise its ring crosses the network.
        """
        nvlink = self.nvlink_bw * self.gpu.nvlink_eff
        if group * stride <= self.gpus_per_node:
            return nvlink, self.gpu.latency
        # NCCL runs one ring per NIC rail: a group with k members on each node drives k rails at once,
        # so its bus bandwidth is k rails' worth (at most NVLink's).
        members = max(1, min(group, self.gpus_per_node // stride))
        return min(nvlink, self.network_bw * self.gpu.network_eff * members), 2 * self.gpu.latency

    def hop(self, span: int) -> tuple[float, float]:
        """(bandwidth, latency) of one point-to-point transfer between neighbours of a ring whose ranks
        span ``span`` consecutive ranks (a context-parallel group: tp x cp). Within a node, NVLink; else
        the hops that leave a node each run over that GPU's own NIC rail, and every ring step waits for
        its slowest hop."""
        nvlink = self.nvlink_bw * self.gpu.nvlink_eff
        if span <= self.gpus_per_node:
            return nvlink, self.gpu.latency
        return min(nvlink, self.network_bw * self.gpu.network_eff), 2 * self.gpu.latency


class ClusterError(UserError):
    """An unknown GPU, an unreadable cluster file, or a GPU count that does not fit."""


def _gpu_from_dict(name: str, entry: dict, base: Optional[GPU]) -> GPU:
    known = {f.name for f in fields(GPU)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ClusterError(f"cluster file: gpus.{name} has unknown key(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known - {'name'}))}")
    if base is None:
        missing = [k for k in ("peak_flops", "memory_gib", "hbm_bw", "nvlink_bw", "network_bw") if k not in entry]
        if missing:
            raise ClusterError(f"cluster file: new GPU {name} needs {', '.join(missing)} (or base it on a "
                               f"catalogue GPU by using its name: {', '.join(CATALOGUE)})")
        return GPU(name=name, **{k: float(v) if k != "gpus_per_node" else int(v) for k, v in entry.items()})
    return replace(base, **entry)


def read_cluster_file(path: str) -> dict:
    """The user's YAML as a dict; its ``gpus`` mapping adds or overrides catalogue entries."""
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise ClusterError(f"cluster.file={path}: no such file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # a YAML syntax error is the user's, not a bug
        raise ClusterError(f"cluster.file={path}: cannot read it as YAML: {err}") from err
    if not isinstance(data, dict):
        raise ClusterError(f"cluster.file={path}: expected a mapping at the top level")
    return data


CLUSTER_KEYS = ("gpu", "gpus", "file", "gpus_per_node", "nvlink_bw", "network_bw")


def load_cluster(settings: dict) -> Cluster:
    """A Cluster from ``cluster.*`` settings: gpu (name), gpus (count), file (YAML), link overrides."""
    unknown = sorted(set(settings) - set(CLUSTER_KEYS))
    if unknown:
        raise ClusterError(f"unknown cluster key(s) {', '.join('cluster.' + k for k in unknown)}; "
                           f"known: {', '.join('cluster.' + k for k in CLUSTER_KEYS)}")
    settings = dict(settings)
    catalogue = dict(CATALOGUE)
    if settings.get("file"):
        data = read_cluster_file(str(settings.pop("file")))
        for name, entry in (data.pop("gpus", None) or {}).items():
            catalogue[name] = _gpu_from_dict(name, entry or {}, catalogue.get(name))
        for key, value in data.items():
            if key not in CLUSTER_KEYS or key == "file":
                raise ClusterError(f"cluster file: unknown key {key}; known: gpus, "
                                   f"{', '.join(k for k in CLUSTER_KEYS if k != 'file')}")
            settings.setdefault(key, value)  # the command line wins over the file
    name = str(settings.get("gpu") or "")
    name = ALIASES.get(name, name)
    if name not in catalogue:
        raise ClusterError(f"unknown GPU {settings.get('gpu')!r} (cluster.gpu): known GPUs are "
                           f"{', '.join(catalogue)}; add one with cluster.file=YOUR.yaml (gpus: {{NAME: {{...}}}})")
    gpu = catalogue[name]
    try:
        gpus = int(settings.get("gpus") or 0)
        per_node = int(settings.get("gpus_per_node") or gpu.gpus_per_node)
        nvlink = float(settings.get("nvlink_bw") or gpu.nvlink_bw)
        network = float(settings.get("network_bw") or gpu.network_bw)
    except (TypeError, ValueError) as err:
        raise ClusterError(f"cluster settings must be numbers: {err}") from err
    if gpus < 1:
        raise ClusterError("cluster.gpus=N is required: the number of GPUs the run gets (N >= 1)")
    return Cluster(gpu=gpu, gpus=gpus, gpus_per_node=min(per_node, gpus), nvlink_bw=nvlink, network_bw=network)
