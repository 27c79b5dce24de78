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

from dataclasses import dataclass, replace

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
    # Optional card details (defaults keep every preset valid); the runtime laws in sim.runtimes use them.
    memory_type: str = ""  # "HBM" or "GDDR" ("" = not stated)
    sm_count: int = 0  # streaming multiprocessors (0 = not stated)
    boost_clock_ghz: float = 0.0  # GHz, datasheet maximum boost clock (0 = not stated)
    fp16_acc16_flops: float = 0.0  # FLOP/s, dense FP16 tensor with FP16 accumulate (0 = same as fp16_flops)
    arch: str = ""  # "ampere", "ada", "hopper", "blackwell" ("" = not stated)

    @property
    def fp16_flops_acc16(self) -> float:
        """FLOP/s, dense FP16 tensor rate with FP16 accumulate (GeForce: twice their FP32-accumulate rate)."""
        return self.fp16_acc16_flops or self.fp16_flops

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


# --------------------------------------------------------------------------------------------
# Card details for the runtime laws (sim.runtimes): memory type, SM count, boost clock, FP16-accumulate
# tensor rate and architecture of the presets above, and more presets. Each figure is quoted in `source`;
# where it is derived (SMs x clock x per-SM rate) or from a third-party spec list, `source` says so.
# --------------------------------------------------------------------------------------------

_DETAILS = {
    "rtx-4090": dict(memory_type="GDDR", sm_count=128, boost_clock_ghz=2.52, fp16_acc16_flops=330.3 * TFLOPS,
                     arch="ada", note="Ada whitepaper: 128 SMs, boost 2520 MHz, FP16 tensor with FP16 accumulate "
                                      "330.3 TFLOPS dense."),
    "l40s": dict(memory_type="GDDR", sm_count=142, boost_clock_ghz=2.52, arch="ada",
                 note="142 SMs (568 4th-gen tensor cores / 4), boost 2520 MHz (datasheet lists cores, not SMs; the "
                      "clock is from third-party spec lists)."),
    "a100-40gb": dict(memory_type="HBM", sm_count=108, boost_clock_ghz=1.41, arch="ampere",
                      note="A100 whitepaper: 108 SMs, boost 1410 MHz."),
    "a100-80gb": dict(memory_type="HBM", sm_count=108, boost_clock_ghz=1.41, arch="ampere",
                      note="A100 whitepaper: 108 SMs, boost 1410 MHz."),
    "h100-sxm": dict(memory_type="HBM", sm_count=132, boost_clock_ghz=1.98, arch="hopper",
                     note="H100 whitepaper: SXM5 132 SMs; max boost 1980 MHz (tensor peaks are quoted at 1830 MHz)."),
    "h100-pcie": dict(memory_type="HBM", sm_count=114, boost_clock_ghz=1.755, arch="hopper",
                      note="H100 whitepaper / PCIe product brief: 114 SMs, GPU boost clock 1755 MHz."),
    "h200": dict(memory_type="HBM", sm_count=132, boost_clock_ghz=1.98, arch="hopper",
                 note="Same GH100 configuration as H100 SXM5 (132 SMs, 1980 MHz)."),
    "b200": dict(memory_type="HBM", sm_count=148, boost_clock_ghz=1.98, arch="blackwell",
                 note="148 SMs and 1980 MHz boost are from third-party spec lists, not an NVIDIA datasheet "
                      "(uncertain)."),
}
for _name, _d in _DETAILS.items():
    _note = _d.pop("note")
    HARDWARE[_name] = replace(HARDWARE[_name], source=HARDWARE[_name].source + " Card details: " + _note, **_d)
del _name, _d, _note

_NVLINK_BRIDGE_AMPERE = 112.5 * GB  # GA102 NVLink 3 bridge: 4 x4 links, 56.25 GB/s each way, 112.5 GB/s total


def _gddr(name, memory_gb, bw_gbs, fp16_tf, acc16_tf, fp8_tf, int8_tops, sms, clock_ghz, arch, link, link_gbs,
          source):
    """A GDDR card preset (figures in GB, GB/s, TFLOPS, GHz; dense tensor rates)."""
    nvlink = link.startswith("NVLink")
    return Hardware(name, memory_gb=memory_gb, memory_bw=bw_gbs * GB, fp16_flops=fp16_tf * TFLOPS,
                    bf16_flops=fp16_tf * TFLOPS, fp8_flops=fp8_tf * TFLOPS, int8_ops=int8_tops * TFLOPS,
                    fp4_flops=0.0, interconnect=link, interconnect_bw=link_gbs * GB,
                    allreduce_latency_s=_NVLINK_AR_LATENCY if nvlink else _PCIE_AR_LATENCY,
                    default_step_overhead_s=_GPU_STEP_OVERHEAD, source=source, memory_type="GDDR", sm_count=sms,
                    boost_clock_ghz=clock_ghz, fp16_acc16_flops=acc16_tf * TFLOPS, arch=arch)


HARDWARE.update({h.name: h for h in [
    _gddr("rtx-3090", 24, 936, 71.2, 142.3, 0.0, 284.7, 82, 1.695, "ampere", "NVLink 3 bridge (2 cards)", 112.5,
          "NVIDIA Ampere GA102 whitepaper v2.0, Appendix A, GeForce RTX 3090: 82 SMs, boost 1695 MHz, 24 GB GDDR6X, "
          "936 GB/s; peak FP16 tensor 142/285 TFLOPS with FP16 accumulate, 71/142 with FP32 accumulate (dense/"
          "sparse; 71.2 and 142.3 = 82 SMs x 1.695 GHz x 512 or 1024 FLOP/clk/SM), INT8 284/568 TOPS; no FP8. "
          "NVLink 3 bridge for 2 cards, 112.5 GB/s total."),
    _gddr("rtx-3090-ti", 24, 1008, 80.0, 160.0, 0.0, 320.1, 84, 1.86, "ampere", "NVLink 3 bridge (2 cards)", 112.5,
          "GeForce RTX 3090 Ti (NVIDIA launch specs as reported by TweakTown): full GA102, 84 SMs / 10,752 CUDA "
          "cores, boost 1860 MHz, 24 GB GDDR6X at 21 Gbps on 384 bits = 1008 GB/s. Tensor rates are derived, not "
          "quoted: 84 SMs x 1.86 GHz x GA102's per-SM rates (whitepaper: 512 FP16 FLOP/clk/SM with FP32 "
          "accumulate, 1024 with FP16 accumulate, 2048 INT8 OP/clk/SM) = 80.0 / 160.0 TFLOPS, 320.1 TOPS dense."),
    _gddr("rtx-4080", 16, 716.8, 97.5, 194.9, 194.9, 389.9, 76, 2.505, "ada", "PCIe Gen4 x16", 64,
          "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4080 (16 GB) column: 76 SMs, boost 2505 MHz, "
          "16 GB GDDR6X, 716.8 GB/s; peak FP16 tensor 194.9/389.9 TFLOPS with FP16 accumulate, 97.5/194.9 with "
          "FP32 accumulate; FP8 194.9/389.9 with FP32 accumulate; INT8 389.9/779.8 TOPS (dense/sparse). No NVLink."),
    _gddr("rtx-a6000", 48, 768, 154.8, 154.8, 0.0, 309.7, 84, 1.80, "ampere", "NVLink 3 bridge (2 cards)", 112.5,
          "NVIDIA RTX A6000 datasheet and Ampere GA102 whitepaper v2.0 Appendix C: 84 SMs (10,752 CUDA cores), "
          "boost 1800 MHz, 48 GB GDDR6 with ECC, 768 GB/s; tensor 309.7 TFLOPS sparse = FP16 154.8 dense with FP16 "
          "or FP32 accumulate (professional GA102 runs FP32 accumulate at full rate); INT8 309.7 TOPS dense; "
          "NVLink bridge 112.5 GB/s bidirectional."),
    _gddr("rtx-6000-ada", 48, 960, 364.2, 364.2, 728.5, 728.5, 142, 2.505, "ada", "PCIe Gen4 x16", 64,
          "NVIDIA RTX 6000 Ada Generation datasheet: 48 GB GDDR6 with ECC, 960 GB/s, 18,176 CUDA cores (142 SMs), "
          "568 tensor cores, 'Tensor Performance 1,457.0 TFLOPS' (FP8 with sparsity) = FP8 728.5 dense, FP16 "
          "364.2 dense (full-rate FP32 accumulate on professional Ada); boost 2505 MHz from third-party spec "
          "lists. PCIe Gen4 x16, no NVLink."),
    _gddr("l4", 24, 300, 121.0, 121.0, 242.5, 242.5, 58, 2.04, "ada", "PCIe Gen4 x16", 64,
          "NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s; FP16/BF16 tensor 242 TFLOPS with sparsity = 121 dense, FP8 "
          "485 sparse = 242.5 dense, INT8 485 TOPS sparse = 242.5 dense; 58 SMs (7,424 CUDA cores) and boost "
          "2040 MHz from third-party spec lists (58 x 2.04 GHz x 1024 FLOP/clk/SM = 121, consistent). PCIe Gen4 "
          "x16, no NVLink."),
    _gddr("a10g", 24, 600, 70.0, 140.1, 0.0, 280.2, 80, 1.71, "ampere", "PCIe Gen4 x16", 64,
          "NVIDIA A10G (AWS G5 only; NVIDIA publishes no A10G datasheet): 24 GB GDDR6, 600 GB/s (AWS; Baseten "
          "'A10 vs A10G'). UNCERTAIN: 80 SMs and boost 1710 MHz are from third-party spec lists, and the tensor "
          "rates are derived (80 x 1.71 GHz x 512 FLOP/clk/SM with FP32 accumulate = 70.0 TFLOPS, 140.1 with "
          "FP16 accumulate, INT8 280.2 TOPS); Baseten reports the A10G's tensor rate below the A10's 125 TFLOPS."),
    _gddr("a40", 48, 696, 149.7, 149.7, 0.0, 299.3, 84, 1.74, "ampere", "NVLink 3 bridge (2 cards)", 112.5,
          "NVIDIA A40 datasheet: 48 GB GDDR6 with ECC, 696 GB/s; peak FP16 tensor with FP16 accumulate "
          "149.7/299.4 TFLOPS, BF16 with FP32 accumulate 149.7/299.4, INT8 299.3/598.6 TOPS (dense/sparse); "
          "10,752 CUDA cores (84 SMs); NVLink 112.5 GB/s bidirectional; boost 1740 MHz from third-party spec "
          "lists."),
    _gddr("l40", 48, 864, 181.05, 362.1, 362.0, 362.0, 142, 2.49, "ada", "PCIe Gen4 x16", 64,
          "NVIDIA L40 datasheet: 48 GB GDDR6 with ECC, 864 GB/s; FP16 and BF16 tensor 181.05/362.1 TFLOPS, FP8 "
          "362/724, INT8 362/724 TOPS (dense/sparse); 18,176 CUDA cores (142 SMs); PCIe Gen4 x16 64 GB/s, no "
          "NVLink. UNCERTAIN: the FP16-accumulate rate 362.1 assumes the L40 halves FP32 accumulate like "
          "GeForce Ada (181.05 = 142 x 2.49 GHz x 512); boost 2490 MHz from third-party spec lists."),
    Hardware(
        "a100-pcie-40gb", memory_gb=40, memory_bw=1555 * GB,
        fp16_flops=312 * TFLOPS, bf16_flops=312 * TFLOPS, fp8_flops=0.0, int8_ops=624 * TFLOPS, fp4_flops=0.0,
        interconnect="NVLink 3 bridge (pairs)", interconnect_bw=600 * GB,
        allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
        source="NVIDIA A100 40GB PCIe product brief / A100 datasheet: 40 GB HBM2, 1,555 GB/s; BF16/FP16 tensor "
               "312 TFLOPS dense, INT8 624 TOPS; NVLink bridge for 2 GPUs 600 GB/s (more than 2 GPUs talk over "
               "PCIe Gen4, 64 GB/s; not modelled); 108 SMs, boost 1410 MHz (A100 whitepaper).",
        memory_type="HBM", sm_count=108, boost_clock_ghz=1.41, arch="ampere"),
    Hardware(
        "a100-pcie-80gb", memory_gb=80, memory_bw=1935 * GB,
        fp16_flops=312 * TFLOPS, bf16_flops=312 * TFLOPS, fp8_flops=0.0, int8_ops=624 * TFLOPS, fp4_flops=0.0,
        interconnect="NVLink 3 bridge (pairs)", interconnect_bw=600 * GB,
        allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
        source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB PCIe: 80 GB HBM2e, 1,935 GB/s; BF16/FP16 tensor "
               "312 TFLOPS dense, INT8 624 TOPS; NVLink bridge for 2 GPUs 600 GB/s (more than 2 talk over PCIe "
               "Gen4; not modelled); 108 SMs, boost 1410 MHz (A100 whitepaper).",
        memory_type="HBM", sm_count=108, boost_clock_ghz=1.41, arch="ampere"),
    replace(HARDWARE["a100-40gb"], name="a100-sxm-40gb"),
    replace(HARDWARE["a100-80gb"], name="a100-sxm-80gb"),
    Hardware(
        "h100-nvl", memory_gb=94, memory_bw=3900 * GB,
        fp16_flops=835.5 * TFLOPS, bf16_flops=835.5 * TFLOPS, fp8_flops=1670.5 * TFLOPS,
        int8_ops=1670.5 * TFLOPS, fp4_flops=0.0,
        interconnect="NVLink 4 bridge (pairs)", interconnect_bw=600 * GB,
        allreduce_latency_s=_NVLINK_AR_LATENCY, default_step_overhead_s=_GPU_STEP_OVERHEAD,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (per GPU): 94 GB HBM3, 3.9 TB/s; "
               "BF16/FP16 tensor 1,671 TFLOPS with sparsity = 835.5 dense, FP8 3,341 sparse = 1,670.5 dense, INT8 "
               "1,670.5 TOPS dense; NVLink bridge 600 GB/s, PCIe Gen5 128 GB/s. UNCERTAIN: 132 SMs and boost "
               "1785 MHz are from third-party spec lists, not the datasheet.",
        memory_type="HBM", sm_count=132, boost_clock_ghz=1.785, arch="hopper"),
]})


def get_hardware(name: str) -> Hardware:
    """The preset called name; ConfigError listing the presets otherwise."""
    try:
        return HARDWARE[name]
    except (KeyError, TypeError):
        raise ConfigError("hardware", f"unknown hardware {name!r}", ", ".join(HARDWARE)) from None
