"""Accelerator presets: memory, bandwidth, peak dense FLOP/s and interconnect, from vendor datasheets.

Every figure is the datasheet's *dense* number (NVIDIA quotes tensor throughput "with sparsity"
first; we halve it back), and each preset's `source` names the datasheet it came from and says
where a figure is uncertain. Units: bytes, bytes/s, FLOP/s, seconds.

Memory capacity: vendors' "80 GB" of HBM/GDDR is binary (an A100 80GB reports 81,920 MiB in
nvidia-smi, an H200 "141 GB" 143,771 MiB), so memory_bytes = memory_gb * 2**30.
Bandwidths and FLOP/s are decimal (3.35 TB/s = 3.35e12 B/s).

Interconnect bandwidth is the datasheet figure, which NVIDIA quotes as the bidirectional total
(H100 NVLink 900 GB/s = 450 GB/s each way). A ring all-reduce moves data one way per link at a
time, so the cost model uses `interconnect_bw_per_direction` (half).

Plain Python, no JAX.
"""
from __future__ import annotations

from dataclasses import dataclass

from reference.errors import ConfigError

GiB = 2**30
GB = 1e9
TB = 1e12
TFLOPS = 1e12

#: Compute dtypes a preset can list a peak for.
COMPUTE_DTYPES = ("fp16", "bf16", "fp8", "int8", "fp4")


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU socket) as the cost model sees it.

    Peak FLOP/s are dense tensor-core figures; 0.0 means the hardware has no such unit
    (then formats.compute_dtype falls back to dequantising to fp16).
    """

    name: str
    memory_gb: float  # datasheet capacity ("80 GB"); binary GB, see module docstring
    memory_bw: float  # B/s, peak DRAM/HBM bandwidth
    fp16_flops: float  # FLOP/s, dense, FP32 accumulate
    bf16_flops: float  # FLOP/s, dense, FP32 accumulate
    fp8_flops: float  # FLOP/s, dense (0 = no FP8 tensor cores)
    int8_ops: float  # OP/s, dense (0 = no INT8 tensor cores)
    fp4_flops: float  # FLOP/s, dense (0 = no FP4 tensor cores)
    interconnect: str  # what links the devices for tensor parallelism ("" = none)
    interconnect_bw: float  # B/s, datasheet total (bidirectional); 0 = tensor parallelism unsupported
    allreduce_latency_s: float  # s, fixed cost of one small all-reduce (estimate, not datasheet)
    default_step_overhead_s: float  # s, per engine step: launches, sync, sampling, host work (estimate)
    source: str

    @property
    def memory_bytes(self) -> int:
        """Memory capacity in bytes."""
        return int(self.memory_gb * GiB)

    @property
    def interconnect_bw_per_direction(self) -> float:
        """B/s one way over a link: what a ring all-reduce step can use."""
        return self.interconnect_bw / 2.0

    def supports(self, dtype: str) -> bool:
        """True when the hardware has tensor units for this compute dtype."""
        return self.peak_flops(dtype, strict=False) > 0.0

    def peak_flops(self, dtype: str, strict: bool = True) -> float:
        """Dense peak FLOP/s (OP/s for int8) for a compute dtype.

        strict: raise ConfigError when the hardware lacks that unit; otherwise return 0.0.
        """
        value = {
            "fp16": self.fp16_flops,
            "bf16": self.bf16_flops,
            "fp8": self.fp8_flops,
            "int8": self.int8_ops,
            "fp4": self.fp4_flops,
        }.get(dtype)
        if value is None:
            raise ConfigError("compute_dtype", f"unknown compute dtype {dtype!r}", ", ".join(COMPUTE_DTYPES))
        if strict and value <= 0.0:
            have = ", ".join(d for d in COMPUTE_DTYPES if self.peak_flops(d, strict=False) > 0)
            raise ConfigError("compute_dtype", f"{self.name} has no {dtype} tensor units", have)
        return value


# Estimates shared by presets (not datasheet figures; see each field's comment):
_NVLINK_AR_LATENCY = 10e-6  # s; small-message all-reduce over NVLink/NVSwitch (NCCL / custom kernels: ~5-20 us)
_PCIE_AR_LATENCY = 25e-6  # s; over PCIe through the host bridge or a PCIe switch
_GPU_STEP_OVERHEAD = 0.5e-3  # s; one engine step with CUDA graphs: launch, sync, sampler, scheduler
_CPU_STEP_OVERHEAD = 0.1e-3  # s; llama.cpp-style CPU step: thread sync, sampling


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware(
            "rtx-4090", memory_gb=24, memory_bw=1008 * GB,
            fp16_flops=165.2 * TFLOPS, bf16_flops=165.2 * TFLOPS,
            fp8_flops=330.3 * TFLOPS, int8_ops=660.6 * TFLOPS, fp4_flops=0.0,
            interconnect="PCIe Gen4 x16", interconnect_bw=64 * GB,
            allreduce_latency_s=_PCIE_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA Ada Lovelace architecture whitepaper (v2.1), GeForce RTX 4090 column: 24 GB "
                   "GDDR6X, 1008 GB/s; dense tensor FP16/BF16 with FP32 accumulate 165.2 TFLOPS (GeForce "
                   "runs FP32 accumulate at half rate; 330.3 with FP16 accumulate, which inference GEMMs "
                   "rarely use), FP8 with FP32 accumulate 330.3 (660.6 with FP16 accumulate), INT8 660.6 "
                   "TOPS; no FP4. No NVLink: PCIe 4.0 x16 = 32 GB/s each way.",
        ),
        Hardware(
            "l40s", memory_gb=48, memory_bw=864 * GB,
            fp16_flops=362.05 * TFLOPS, bf16_flops=362.05 * TFLOPS,
            fp8_flops=733 * TFLOPS, int8_ops=733 * TFLOPS, fp4_flops=0.0,
            interconnect="PCIe Gen4 x16", interconnect_bw=64 * GB,
            allreduce_latency_s=_PCIE_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA L40S datasheet: 48 GB GDDR6 with ECC, 864 GB/s; BF16/FP16 tensor 362.05 TFLOPS "
                   "dense (733 sparse), FP8 733 (1,466 sparse), INT8 733 TOPS dense; PCIe Gen4 x16 "
                   "64 GB/s bidirectional, no NVLink.",
        ),
        Hardware(
            "a100-40gb", memory_gb=40, memory_bw=1555 * GB,
            fp16_flops=312 * TFLOPS, bf16_flops=312 * TFLOPS,
            fp8_flops=0.0, int8_ops=624 * TFLOPS, fp4_flops=0.0,
            interconnect="NVLink 3", interconnect_bw=600 * GB,
            allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM4: 40 GB HBM2, 1,555 GB/s; "
                   "BF16/FP16 tensor 312 TFLOPS dense (624 sparse), INT8 624 TOPS dense; no FP8; "
                   "NVLink 600 GB/s.",
        ),
        Hardware(
            "a100-80gb", memory_gb=80, memory_bw=2039 * GB,
            fp16_flops=312 * TFLOPS, bf16_flops=312 * TFLOPS,
            fp8_flops=0.0, int8_ops=624 * TFLOPS, fp4_flops=0.0,
            interconnect="NVLink 3", interconnect_bw=600 * GB,
            allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM4: 80 GB HBM2e, 2,039 GB/s "
                   "(the PCIe card is 1,935 GB/s); BF16/FP16 tensor 312 TFLOPS dense, INT8 624 TOPS "
                   "dense; no FP8; NVLink 600 GB/s.",
        ),
        Hardware(
            "h100-sxm", memory_gb=80, memory_bw=3350 * GB,
            fp16_flops=989.4 * TFLOPS, bf16_flops=989.4 * TFLOPS,
            fp8_flops=1978.9 * TFLOPS, int8_ops=1978.9 * TFLOPS, fp4_flops=0.0,
            interconnect="NVLink 4", interconnect_bw=900 * GB,
            allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5: 80 GB HBM3, 3.35 TB/s; BF16/FP16 "
                   "tensor 1,979 TFLOPS with sparsity = 989.4 dense, FP8 3,958 sparse = 1,978.9 dense, "
                   "INT8 1,978.9 TOPS dense; no FP4; NVLink 900 GB/s.",
        ),
        Hardware(
            "h100-pcie", memory_gb=80, memory_bw=2000 * GB,
            fp16_flops=756.5 * TFLOPS, bf16_flops=756.5 * TFLOPS,
            fp8_flops=1513 * TFLOPS, int8_ops=1513 * TFLOPS, fp4_flops=0.0,
            interconnect="PCIe Gen5 x16", interconnect_bw=128 * GB,
            allreduce_latency_s=_PCIE_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: 80 GB HBM2e, 2 TB/s (product brief: "
                   "'greater than 2,000 GB/s'); BF16/FP16 1,513 TFLOPS sparse = 756.5 dense, FP8 3,026 "
                   "sparse = 1,513 dense, INT8 1,513 TOPS dense; PCIe Gen5 128 GB/s (an optional NVLink "
                   "bridge gives 600 GB/s between pairs; not modelled).",
        ),
        Hardware(
            "h200", memory_gb=141, memory_bw=4800 * GB,
            fp16_flops=989.4 * TFLOPS, bf16_flops=989.4 * TFLOPS,
            fp8_flops=1978.9 * TFLOPS, int8_ops=1978.9 * TFLOPS, fp4_flops=0.0,
            interconnect="NVLink 4", interconnect_bw=900 * GB,
            allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 141 GB HBM3e, 4.8 TB/s; tensor "
                   "compute as H100 SXM (BF16 989.4, FP8 1,978.9 TFLOPS dense); NVLink 900 GB/s.",
        ),
        Hardware(
            "b200", memory_gb=180, memory_bw=8000 * GB,
            fp16_flops=2250 * TFLOPS, bf16_flops=2250 * TFLOPS,
            fp8_flops=4500 * TFLOPS, int8_ops=4500 * TFLOPS, fp4_flops=9000 * TFLOPS,
            interconnect="NVLink 5", interconnect_bw=1800 * GB,
            allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
            source="NVIDIA HGX B200 datasheet (1,000 W B200, per GPU = 8-GPU total / 8): 1,440 GB HBM3e "
                   "total = 180 GB per GPU (Blackwell was announced with 192 GB; shipping HGX/DGX B200 "
                   "lists 180 GB), 64 TB/s total = 8 TB/s; FP16/BF16 36 PFLOPS sparse = 2.25 PFLOPS "
                   "dense, FP8 4.5, INT8 4.5 POPS, FP4 9 PFLOPS dense; NVLink 5 1.8 TB/s. GB200 parts "
                   "(1,200 W) are ~10% faster and not modelled.",
        ),
        Hardware(
            "cpu-generic", memory_gb=64, memory_bw=76.8 * GB,
            fp16_flops=0.768 * TFLOPS, bf16_flops=0.768 * TFLOPS,
            fp8_flops=0.0, int8_ops=3.07 * TFLOPS, fp4_flops=0.0,
            interconnect="", interconnect_bw=0.0,
            allreduce_latency_s=0.0, default_step_overhead_s=_CPU_STEP_OVERHEAD,
            source="Nominal desktop CPU, not a datasheet: 8 cores at 3.0 GHz with AVX2 (2 FMA ports x 8 "
                   "FP32 lanes = 32 FLOP/cycle/core -> 0.768 TFLOPS; FP16/BF16 are computed in FP32), "
                   "AVX-VNNI INT8 at 4x that (3.07 TOPS); 64 GB dual-channel DDR5-4800 = 2 x 8 B x "
                   "4.8 GT/s = 76.8 GB/s. No tensor parallelism.",
        ),
    ]
}


def get_hardware(name: str) -> Hardware:
    """The preset called name; ConfigError listing the presets otherwise."""
    try:
        return HARDWARE[name]
    except (KeyError, TypeError):
        raise ConfigError("hardware", f"unknown hardware {name!r}", ", ".join(HARDWARE)) from None
