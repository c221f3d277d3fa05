"""What this machine offers, and the precision and device chosen from it: the one place `auto` is decided.

One vocabulary of precision names for training and decoding:
  32    float32
  bf16  bfloat16 autocast (Lightning's bf16-mixed)
  16    float16 autocast, with a gradient scaler in training (Lightning's 16-mixed; CUDA only)
  int8  int8 linear layers, activations quantized on the fly (decoding on a CPU only)
  auto  decided by `choose_precision` from what the hardware does natively, and logged with the reason

Why: on a CPU without native bfloat16 (AVX2, or AVX-512 without its BF16 extension) a bf16 matmul is
emulated and measured 44-300x slower than fp32; with AVX512-BF16 or AMX it is 4-7x faster. So the
choice is the machine's, made at run time, never a constant tuned on whichever machine we had. Where the
CPU's flags claim native bf16 (x86's AMX or AVX512-BF16, Arm's BF16), a timed bf16 matmul checks them: a
cap on the kernels' instructions (ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon: 0.005x fp32) makes it emulated
all the same.
On a CPU the model's width counts too: a reduced precision saves matmul time, which grows as d_model
squared per token, and costs casts and quantization, which grow as d_model, plus a oneDNN kernel
compiled for every new matmul shape in bf16; below CPU_REDUCED_MIN_D_MODEL the costs win.
"""
import functools
import logging
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass

import torch

from seq2seq import Seq2SeqError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32", "bf16", "16", "int8")
LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "16": torch.float16}  # 32 and int8 run without autocast
X86_BF16 = ("AMX", "AVX512-BF16")  # x86 CPUs with native bf16, which `auto` decodes in int8 all the same
# `auto` on a CPU keeps narrower models in fp32. Measured on a 2-core AMX Xeon (docs/benchmarks.md), bf16 / fp32:
# d_model 64 (experiment=smoke) training 0.45-0.50x in wall time, greedy decoding 0.74x (int8 0.67x);
# d_model 128 training 1.01x; d_model 256 (model=small) training 2.07x. On a Zen 5 EPYC (AVX512-BF16):
# d_model 64 training 0.80x. On a 2-core AVX2 EPYC, int8 / fp32 decoding at d_model 64: 0.77-0.97x greedy and
# 0.90-0.99x beam 5 in batches of 1-128 sentences (both with their small steps compiled; at d_model 256 1.47-2.61x)
CPU_REDUCED_MIN_D_MODEL = 128


@dataclass(frozen=True)
class Machine:
    """The facts the choices depend on; `probe_machine()` reads them, tests fake them."""

    cpu_model: str
    cpu_isa: str  # the best of AMX, AVX512-BF16, AVX-512, AVX2, or torch's own word for it
    cpu_native_bf16: bool  # AVX512-BF16 or AMX: bf16 matmuls at several times the fp32 rate
    threads: int
    cuda: bool
    cuda_bf16: bool
    gpu: str  # the CUDA device's name, "" without one
    gpus: int = 0  # CUDA devices torch can use
    cpu_int8: bool = True  # this torch build and CPU run int8 decoding (seq2seq/int8.py: int8_kernel)
    isa_caps: str = ""  # instruction-set caps set in the environment (`isa_caps()`), "" for none

    def describe(self) -> str:
        gpu = f"GPU {self.gpu} (bf16: {'yes' if self.cuda_bf16 else 'no'})" if self.cuda else "no GPU"
        caps = f", capped by {self.isa_caps}" if self.isa_caps and self.isa_caps not in self.cpu_isa else ""
        return f"CPU {self.cpu_model} ({self.cpu_isa}{caps}), {self.threads} threads, {gpu}, torch {torch.__version__}"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name: /proc/cpuinfo's model name (x86 Linux), lscpu's (Arm Linux: "Neoverse-V1"), sysctl's
    (macOS: "Apple M2"), or the architecture where none says."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    for command, prefix in ((["lscpu"], "Model name:"), (["sysctl", "-n", "machdep.cpu.brand_string"], "")):
        for line in command_output(command).splitlines():
            if line.startswith(prefix) and line[len(prefix):].strip():
                return line[len(prefix):].strip()
    return platform.processor() or platform.machine()


def command_output(command: list[str]) -> str:
    """A command's stdout, or "" where it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def arm_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an Arm CPU with the BF16 extension (Graviton 3 and 4, Neoverse V1, V2, N2, Apple M2
    and later): `bf16` among the Features of /proc/cpuinfo on Linux, hw.optional.arm.FEAT_BF16 on macOS."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return False
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            return any(line.startswith("Features") and "bf16" in line.split(":", 1)[1].split() for line in f)
    except OSError:
        return command_output(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"]).strip() == "1"


def cpu_isa() -> tuple[str, bool]:
    """(the best matmul ISA torch can use here, whether the flags claim native bf16; `probe_machine` times it)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX", True
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16", True
    if torch.cpu._is_avx512_supported():
        return "AVX-512", False
    if torch.cpu._is_avx2_supported():
        return "AVX2", False
    if arm_bf16():
        return f"{torch.backends.cpu.get_cpu_capability()}, Arm BF16", True
    return torch.backends.cpu.get_cpu_capability(), False


# Environment variables that cap the instructions a library's kernels use, whatever the CPU has: oneDNN (torch's
# bf16 matmuls), ATen's own kernels, MKL (fp32 matmuls), fbgemm (int8) and CTranslate2.
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                     "FBGEMM_ENABLE_INSTRUCTIONS", "CT2_FORCE_CPU_ISA")


def isa_caps() -> str:
    """The instruction-set caps set in this process's environment, e.g. "ONEDNN_MAX_CPU_ISA=AVX2"; "" for none."""
    return ", ".join(f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name))


def bf16_matmul_speedup(n: int = 512) -> float:
    """How many times faster an n x n bf16 matmul runs than fp32 here: best of 3 after a warm-up.

    The CPU's flags say what it has; this says what the kernels make of it. On an AMX Xeon, 2.2-2.3x; with
    ONEDNN_MAX_CPU_ISA=AVX2 set, 0.01x (bf16 emulated); with AVX512_CORE_BF16, 0.71x (docs/benchmarks.md).
    A warm-up product already 20 times slower than fp32's best ends the measurement (0.15 s, not 0.6 s).
    """
    a = torch.randn(n, n)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        best = float("inf")
        for rep in range(4):  # the first is a warm-up (oneDNN compiles its kernel then)
            start = time.perf_counter()
            x @ x
            elapsed = time.perf_counter() - start
            if rep == 0 and dtype == torch.bfloat16 and elapsed > 20 * timings[torch.float32]:
                return timings[torch.float32] / elapsed
            if rep:
                best = min(best, elapsed)
        timings[dtype] = best
    return timings[torch.float32] / timings[torch.bfloat16]


def cpu_int8_kernels() -> bool:
    """Whether this torch build and CPU run int8 decoding (one tiny Int8Linear, built and run): through
    PyTorch's quantized CPU kernels, whose removal PyTorch has announced (torch>=2.3 is all we ask for),
    or, without them, through torch._int_mm on a CPU with VNNI (`seq2seq.int8.int8_kernel`)."""
    from seq2seq.int8 import Int8Linear  # here: the model code is not needed to read the machine otherwise

    try:
        Int8Linear(torch.nn.Linear(2, 2))(torch.ones(1, 2))
        return True
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def probe_machine() -> Machine:
    isa, native_bf16 = cpu_isa()
    caps = isa_caps()
    if native_bf16:  # the flags claim it; a cap or a hypervisor can keep the kernels from it
        speedup = bf16_matmul_speedup()
        if speedup < 1:
            under = f" under {caps}" if caps else ""
            native_bf16, isa = False, f"{isa}, but bf16 matmuls measured {speedup:.2g}x fp32 here{under}"
    cuda = torch.cuda.is_available()
    return Machine(cpu_model=cpu_model(), cpu_isa=isa, cpu_native_bf16=native_bf16, threads=torch.get_num_threads(),
                   cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                   gpu=torch.cuda.get_device_name() if cuda else "", gpus=torch.cuda.device_count() if cuda else 0,
                   cpu_int8=cpu_int8_kernels(), isa_caps=caps)


def precision_name(value) -> str:
    """Our name for a precision given in either vocabulary: 32, "32", "32-true" -> "32"; "bf16-mixed" -> "bf16"."""
    name = str(value)
    for ours, lightnings in LIGHTNING_PRECISION.items():
        if name == lightnings:
            return ours
    if name not in PRECISIONS:
        raise Seq2SeqError(f"precision={value}: expected one of {', '.join(PRECISIONS)}")
    return name


def choose_precision(requested, device: str, training: bool, machine: Machine,
                     d_model: int | None = None) -> tuple[str, str]:
    """The precision to run at, and why: `auto` decided from the hardware and the model's width; an explicit
    choice checked.

    Args: requested in either vocabulary (`precision_name`); device "cpu" or "cuda" (the accelerator's type);
    training: True for `run.py train` (int8 is for decoding only); d_model: the model's width (None: not
    known, taken as wide enough).
    Returns: (one of 32, bf16, 16, int8; a reason to log).
    """
    name = precision_name(requested)
    if name == "int8" and (training or device != "cpu"):
        raise Seq2SeqError("precision=int8 is for decoding on a CPU; use 32, bf16 or auto "
                           f"for {'training' if training else 'a GPU'}")
    if name == "int8" and not machine.cpu_int8:
        raise Seq2SeqError(f"precision=int8: torch {torch.__version__} has no quantized CPU kernels "
                           "(torch.ops.quantized), and torch._int_mm needs a CPU with VNNI; use auto or 32")
    if name == "16" and device == "cpu":
        raise Seq2SeqError("precision=16 needs a CUDA GPU (float16 on a CPU is emulated and slow); "
                           "use auto, 32 or bf16")
    if name != "auto":
        if name == "bf16" and device == "cpu" and not machine.cpu_native_bf16:
            return name, (f"as asked, though this CPU has no native bf16 ({machine.cpu_isa}): "
                          "expect it to be many times slower than precision=32")
        return name, "as asked"
    if device == "cuda":
        if machine.cuda_bf16:
            return "bf16", f"{machine.gpu or 'this GPU'} computes in bf16 natively"
        return "16", f"{machine.gpu or 'this GPU'} has no bf16: float16 with a gradient scaler"
    if d_model is not None and d_model < CPU_REDUCED_MIN_D_MODEL:
        return "32", (f"d_model {d_model} < {CPU_REDUCED_MIN_D_MODEL}: on a CPU a model this narrow runs fastest "
                      "in fp32 (casts and kernel set-up outweigh the smaller matmuls)")
    if training:
        if machine.cpu_native_bf16:
            return "bf16", f"this CPU has native bf16 ({machine.cpu_isa})"
        return "32", f"this CPU has no native bf16 ({machine.cpu_isa})"
    if machine.cpu_native_bf16 and machine.cpu_isa not in X86_BF16:
        # Arm's BF16: its int8 is the quantized engine's dynamic kernel (qnnpack), anchored; neither measured there
        return "bf16", f"this CPU has native bf16 ({machine.cpu_isa})"
    if machine.cpu_int8:
        # int8 on every x86 CPU whose torch has the kernels, native bf16 or not. On a 2-core AMX Xeon (2026-12-07,
        # docs/benchmarks.md) int8 decoded 1.3-3.9x as fast as bf16 from one sentence a call to 32, and in
        # 500-line batches 0.95-1.02x, but beam 5 forced to 20 tokens 0.78-0.95x: its fp32 key/value cache is twice
        # bf16's to reorder. bf16 pays oneDNN's 35-75 us a product however few the rows. AVX512-BF16 without
        # AMX (Zen 4/5) has that cost too and a slower bf16 product; measured there before int8's compiled steps
        # (int8 3-8% ahead, then bf16 after per-row scales), not since
        if machine.cpu_native_bf16:
            return "int8", (f"int8 linear layers (integer dot products), though this CPU has native bf16 "
                            f"({machine.cpu_isa}): int8 measured faster in small batches on an AMX CPU, level in "
                            "large ones")
        return "int8", f"this CPU has no native bf16 ({machine.cpu_isa}): int8 linear layers (integer dot products)"
    if machine.cpu_native_bf16:
        return "bf16", f"this CPU has native bf16 ({machine.cpu_isa}) and torch {torch.__version__} no int8 kernels"
    return "32", f"this CPU has no native bf16 ({machine.cpu_isa}) and torch {torch.__version__} no int8 kernels"


def training_precision(requested, accelerator: str, machine: Machine, d_model: int | None = None) -> str:
    """Lightning's name for the precision to train at on `accelerator` ("cpu" or "gpu", as `training_accelerator`
    decided), logged with why."""
    device = "cuda" if accelerator == "gpu" else "cpu"
    precision, reason = choose_precision(requested, device, training=True, machine=machine, d_model=d_model)
    log_choice(f"training precision {precision}: {reason}")
    return LIGHTNING_PRECISION[precision]


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")  # trainer.accelerator: Lightning's names that this project trains on


def training_accelerator(requested, devices, machine: Machine) -> str:
    """Lightning's accelerator to train on, logged once with why: `auto` (trainer=auto, the default) the CUDA
    GPU when there is one, else the CPU; cpu, gpu and cuda as given, checked here, where Lightning would stop
    with a traceback (a GPU asked for on a machine without one, more GPUs than it has).

    Args: requested: trainer.accelerator; devices: trainer.devices (an int is checked against the GPUs here).
    Returns: "gpu" or "cpu".
    """
    if requested not in ACCELERATORS:
        raise Seq2SeqError(f"trainer.accelerator={requested}: expected one of {', '.join(ACCELERATORS)} "
                           "(auto: the CUDA GPU when there is one, else the CPU)")
    if requested == "cpu" or (requested == "auto" and not machine.cuda):
        why = "trainer.accelerator=cpu" if requested == "cpu" else f"no CUDA GPU that torch {torch.__version__} can use"
        log_choice(f"training on cpu: {why}")
        return "cpu"
    if not machine.cuda:
        raise Seq2SeqError(f"trainer.accelerator={requested}: this machine has no CUDA GPU that torch "
                           f"{torch.__version__} can use; use trainer=auto or trainer=cpu")
    if isinstance(devices, int) and devices > machine.gpus:
        raise Seq2SeqError(f"trainer.devices={devices}: only {machine.gpus} CUDA GPU(s) here")
    log_choice(f"training on cuda: {machine.gpu or 'the CUDA GPU'}"
               f"{f' (trainer.accelerator={requested})' if requested != 'auto' else ''}")
    return "gpu"


def resolve_device(device: str, machine: Machine) -> torch.device:
    """`auto`: the CUDA GPU when there is one, else the CPU; `cpu`, `cuda`, `cuda:N` as given, checked."""
    if device == "auto":
        return torch.device("cuda" if machine.cuda else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise Seq2SeqError(f"device={device}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise Seq2SeqError(f"device={device}: expected auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not machine.cuda:
            raise Seq2SeqError(f"device={device}: this machine has no CUDA GPU that torch {torch.__version__} "
                               "can use; use device=cpu or device=auto")
        if resolved.index is not None and resolved.index >= machine.gpus:
            raise Seq2SeqError(f"device={device}: only {machine.gpus} CUDA device(s) here")
    return resolved


GPU_BLOCK_ELEMENTS = 2 ** 26  # logits a GPU computes per block: at most this many (256 MB in fp32), for memory alone


def rows_per_block(device: torch.device, vocab_size: int, cpu_rows: int) -> int:
    """Rows of a (rows, V) block of logits to compute at a time: on a CPU `cpu_rows`, so that the block stays
    in the CPU's cache through the passes over it; on a GPU, which has no such cache to keep and pays a
    kernel launch for each pass over each block, as many as GPU_BLOCK_ELEMENTS allows."""
    return cpu_rows if device.type == "cpu" else max(1, GPU_BLOCK_ELEMENTS // vocab_size)


def cpu_budget() -> int:
    """The CPUs this process may use: the fewest of the machine's, its affinity mask's and a container's CPU
    quota (cgroup v1 or v2: `docker --cpus`, a Kubernetes limit), as joblib counts them. torch counts cores."""
    with warnings.catch_warnings():  # joblib's import probes for semaphores and warns where it cannot make
        warnings.simplefilter("ignore")  # one (a process limit): its parallel mode, which we do not use
        from joblib import cpu_count

    return cpu_count()


def fit_threads_to_cpu_budget() -> None:
    """One torch thread per CPU this process may use, where torch would start more: it does not read a
    container's CPU quota, and threads beyond the quota only wait for each other (measured in a 1-CPU
    quota on a 2-core Xeon: beam 5 at 61-74 sentences/s with torch's 2 threads, 87-95 with 1).
    OMP_NUM_THREADS, when set, wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    budget, threads = cpu_budget(), torch.get_num_threads()
    if threads > budget:
        log.info("threads %d: the CPUs this process may use (torch would start %d)", budget, threads)
        torch.set_num_threads(budget)


def share_cpu_budget(processes: int) -> None:
    """Before Lightning starts `processes` CPU processes on this machine: it gives each cores // processes
    threads, from the cores it sees (OMP_NUM_THREADS unset); where a container's quota allows fewer CPUs,
    each gets its share of the quota instead, through OMP_NUM_THREADS, which Lightning and the processes
    it starts then keep."""
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    budget = cpu_budget()
    if processes > 1 and budget < visible and not os.environ.get("OMP_NUM_THREADS"):
        share = max(1, budget // processes)
        log.info("threads %d in each of %d processes: the CPUs they may use (%d) shared", share, processes, budget)
        os.environ["OMP_NUM_THREADS"] = str(share)


# glibc's mallopt parameters (malloc.h), and how much freed memory `keep_freed_memory` lets it keep: mallopt takes
# an int, so 2 GB at most
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_BYTES = 2 ** 31 - 1
MALLOC_OPT_OUT = "SEQ2SEQ_MALLOC"  # =system: leave the C library's malloc as it is


def c_library():
    """The C library this process runs on, through ctypes (tests put a fake in its place)."""
    import ctypes

    return ctypes.CDLL(None)


def users_malloc_settings() -> str:
    """The malloc settings the user made, "" for none: glibc's MALLOC_ variables or malloc tunables, another
    allocator preloaded (jemalloc, tcmalloc, mimalloc)."""
    chosen = [f"{name}={value}" for name, value in sorted(os.environ.items())
              if name.startswith("MALLOC_") and value]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        chosen.append(f"LD_PRELOAD={os.environ['LD_PRELOAD']}")
    return ", ".join(chosen)


@functools.cache
def keep_freed_memory() -> str:
    """Let glibc's malloc keep the memory a batch frees for the next batch (up to KEPT_BYTES), once a process;
    returns what the allocator does now, for the log and the benchmarks' machine line.

    By default glibc hands every allocation over a threshold (128 KB, rising with use to 32 MB at most) to the
    kernel, and back when it is freed; the next batch's buffers are then fresh pages, each zeroed by the kernel
    at its first touch (a page fault). Beam search's key/value caches are 60-140 MB a layer at 2,000 rows, and
    a training step's activations come and go alike. Measured on a 2-core AVX2 EPYC VM (docs/benchmarks.md):
    beam 5 forced to 20 tokens, 500 lines, 338,000 page faults and 1.2 s of kernel time in 6 s, and 1.16-1.34x
    faster with the memory kept; training model=small 7.8 million page faults -> 0.6 million (its speed within
    the VM's noise; HF Marian's 1.07-1.26x). PyTorch's performance tuning guide recommends jemalloc or TCMalloc
    for this reuse; this is glibc's own switch for it (mallopt), with nothing to install. The price: a process
    keeps the memory of its largest batch. The user's own malloc settings win (`users_malloc_settings`), and
    SEQ2SEQ_MALLOC=system leaves glibc at its defaults."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's own malloc (not glibc: left as it is)"
    users = users_malloc_settings()
    if users:
        return f"malloc as the environment sets it ({users})"
    if os.environ.get(MALLOC_OPT_OUT, "").lower() == "system":
        return f"glibc malloc at its defaults ({MALLOC_OPT_OUT}=system)"
    libc = c_library()
    if libc.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES):
        return (f"glibc malloc keeping freed memory for reuse, up to {KEPT_BYTES / 2 ** 30:.0f} GB "
                f"({MALLOC_OPT_OUT}=system for its defaults)")
    return "glibc malloc at its defaults (mallopt refused the thresholds)"


@functools.cache
def this_machine() -> Machine:
    """`probe_machine()`, once per process."""
    return probe_machine()


_LOGGED: set = set()


def use_freed_memory() -> None:
    """`keep_freed_memory`, logged once: what training and decoding call before their first batch."""
    log_choice(f"memory: {keep_freed_memory()}")


def log_choice(line: str) -> None:
    """Log a choice and its reason once per process (a Translator decodes many batches; sweeps train many
    runs): `training precision bf16: ...`, `training on cuda: ...`."""
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.info("%s", line)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 2.0) -> float:
    """GFLOP/s of square matmuls of this dtype, the machine's practical peak: n grows from 256 to at most
    4096 while one product takes under `seconds` / 10, so an emulated dtype (bf16 on AVX2: 0.3 GFLOP/s)
    is measured in about a second instead of hours."""
    n, per_product = 256, 0.0
    while True:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warm-up
        reps = 3 if per_product == 0 else max(3, min(50, int(seconds / per_product / 8)))
        per_product = float("inf")
        # The fastest product: a VM's slow spells only lengthen the others (the same 2-core VM measured 67
        # and 174 GFLOP/s fp32 as a mean over reps, minutes apart).
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            per_product = min(per_product, time.perf_counter() - start)
        if n >= 4096 or per_product * 8 * 10 > seconds:  # the next size would take too long: this one stands
            return 2 * n ** 3 / per_product / 1e9
        n *= 2


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


INT8_KERNELS = {"fixed": "fbgemm's int8 GEMM at one fixed activation scale",
                "dynamic": "the quantized engine's dynamic int8 GEMM",
                "int_mm": "torch._int_mm (VNNI integer dot products)",
                "": "none in this torch build for this CPU: int8 decoding is not offered"}


def auto_choices(machine: Machine, d_model: int | None) -> list[str]:
    """What `auto` picks here, as lines `run.py machine` prints: the precision for training and for
    decoding on each device this machine has, with the reasons logged when they are picked, then where
    `trainer=auto` trains and `device=auto` decodes. d_model: the model's width (None: wide enough)."""
    devices = ["cpu"] + (["cuda"] if machine.cuda else [])
    lines = [f"precision=auto{f' for d_model {d_model}' if d_model else ''}:"]
    for device in devices:
        for training in (True, False):
            precision, reason = choose_precision("auto", device, training, machine, d_model)
            lines.append(f"  {'training' if training else 'decoding'} on {device:<4}  {precision:<4}  {reason}")
    none = '' if machine.cuda else ' (no CUDA GPU that this torch can use)'
    lines.append(f"trainer=auto trains on {'cuda' if machine.cuda else 'cpu'}{none}")
    lines.append(f"device=auto decodes on {resolve_device('auto', machine)}{none}")
    return lines


def machine_command(d_model: int | None, peaks: bool) -> None:
    """`run.py machine`: what this machine offers (the machine line every log and benchmark starts with,
    threads, int8 kernel, matmul peaks) and what `auto` picks on it, on stdout."""
    from seq2seq.int8 import ONEDNN_ROWS, int8_kernel, onednn_pays, onednn_qlinear  # the model code, only here

    machine = this_machine()
    omp = os.environ.get("OMP_NUM_THREADS")
    lines = [f"machine: {machine.describe()}",
             f"threads: {torch.get_num_threads()} (CPUs this process may use: {cpu_budget()}"
             f"{f'; OMP_NUM_THREADS={omp}' if omp else ''})",
             f"int8 kernel: {INT8_KERNELS[int8_kernel()]} (quantized engine {torch.backends.quantized.engine})"]
    if int8_kernel() == "fixed" and onednn_qlinear():
        lines[-1] += (f"; oneDNN's from {ONEDNN_ROWS} rows a call, timed no slower here" if onednn_pays() else
                      "; oneDNN's timed slower here")
    if peaks:  # machine_report's lines: the peaks, then malloc's state
        lines += machine_report(machine).splitlines()[1:]
        if machine.cuda:
            lines += machine_report(machine, "cuda").splitlines()[1:-1]
    else:
        lines.append(f"memory: {keep_freed_memory()}")
    print("\n".join(lines + auto_choices(machine, d_model)), flush=True)


def machine_report(machine: Machine, device: str = "cpu") -> str:
    """What a benchmark prints first: the machine, its ISA, threads, GPU, measured matmul peaks, and malloc's
    state, set first as seq2seq's own commands set it (`keep_freed_memory`), so that every system the benchmark
    runs has it."""
    peaks = {name: matmul_peak(dtype, device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    where = "GPU" if str(device).startswith("cuda") else "CPU"
    return (f"machine: {machine.describe()}\n"
            f"{where} matmul peak: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s\n"
            f"memory: {keep_freed_memory()}")
