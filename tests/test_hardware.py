"""The precision and device chosen from the hardware (its answers faked), and int8 decoding against fp32."""
import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import sacrebleu
import torch

import seq2seq.hardware
import seq2seq.int8
from seq2seq import Seq2SeqError
from seq2seq.hardware import (Machine, choose_precision, cpu_budget, cpu_int8_kernels, fit_threads_to_cpu_budget,
                              precision_name, resolve_device, rows_per_block, share_cpu_budget,
                              training_accelerator, training_precision)
from seq2seq.int8 import Int8Linear, Int8SelfAttention, Int8Transformer, int8_kernel, int_mm_exact
from seq2seq.model import ModelConfig, Transformer
from seq2seq.search import SearchConfig, beam_search, search_batch
from seq2seq.translator import Translator
from tests.conftest import run_py

AVX2 = Machine("AMD EPYC", "AVX2", cpu_native_bf16=False, threads=2, cuda=False, cuda_bf16=False, gpu="")
AVX512 = Machine("Intel Xeon", "AVX-512", cpu_native_bf16=False, threads=2, cuda=False, cuda_bf16=False, gpu="")
ZEN5 = Machine("AMD EPYC", "AVX512-BF16", cpu_native_bf16=True, threads=2, cuda=False, cuda_bf16=False, gpu="")
AMX = Machine("Intel Xeon", "AMX", cpu_native_bf16=True, threads=2, cuda=False, cuda_bf16=False, gpu="")
H200 = Machine("Intel Xeon", "AMX", cpu_native_bf16=True, threads=16, cuda=True, cuda_bf16=True, gpu="NVIDIA H200",
               gpus=1)
T4 = Machine("Intel Xeon", "AVX-512", cpu_native_bf16=False, threads=4, cuda=True, cuda_bf16=False, gpu="Tesla T4",
             gpus=2)


@pytest.mark.parametrize("machine, device, training_choice, decoding_choice", [
    (AVX2, "cpu", "32", "int8"),
    (AVX512, "cpu", "32", "int8"),
    (ZEN5, "cpu", "bf16", "int8"),
    (AMX, "cpu", "bf16", "int8"),
    (H200, "cuda", "bf16", "bf16"),
    (T4, "cuda", "16", "16"),
])
def test_auto_follows_the_hardware(machine, device, training_choice, decoding_choice):
    for training, expected in ((True, training_choice), (False, decoding_choice)):
        precision, reason = choose_precision("auto", device, training, machine)
        assert precision == expected
        assert reason  # logged with the choice


@pytest.mark.parametrize("machine", [AVX2, AVX512, ZEN5, AMX])
def test_auto_keeps_a_narrow_model_in_fp32_on_a_cpu(machine):
    """Below CPU_REDUCED_MIN_D_MODEL, casts and kernel set-up cost a CPU more than bf16 or int8 saves."""
    narrow, wide = seq2seq.hardware.CPU_REDUCED_MIN_D_MODEL - 1, seq2seq.hardware.CPU_REDUCED_MIN_D_MODEL
    for training in (True, False):
        precision, reason = choose_precision("auto", "cpu", training, machine, d_model=narrow)
        assert precision == "32" and f"d_model {narrow}" in reason
        assert choose_precision("auto", "cpu", training, machine, d_model=wide) == \
            choose_precision("auto", "cpu", training, machine)  # as wide as that: the machine decides alone
        assert choose_precision("bf16", "cpu", training, machine, d_model=narrow)[0] == "bf16"  # asked: as asked
    assert choose_precision("auto", "cuda", True, H200, d_model=narrow)[0] == "bf16"  # a GPU: the width does not count


def test_a_torch_without_int8_kernels_decodes_without_them_and_refuses_int8_in_one_line():
    no_int8 = dataclasses.replace(AVX2, cpu_int8=False)
    precision, reason = choose_precision("auto", "cpu", False, no_int8)
    assert precision == "32" and "no int8 kernels" in reason
    with pytest.raises(Seq2SeqError, match=r"precision=int8: torch .* has no quantized CPU kernels"):
        choose_precision("int8", "cpu", False, no_int8)
    assert cpu_int8_kernels()  # this torch has them (the other tests decode in int8)
    precision, reason = choose_precision("auto", "cpu", False, dataclasses.replace(AMX, cpu_int8=False))
    assert precision == "bf16" and "no int8 kernels" in reason  # native bf16 is the next fastest


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """A container's CPU quota (joblib reads it; LOKY_MAX_CPU_COUNT stands in for one here) caps torch's threads."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    try:
        assert cpu_budget() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting wins
        fit_threads_to_cpu_budget()
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        fit_threads_to_cpu_budget()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "4")  # a budget above torch's count leaves it alone
        fit_threads_to_cpu_budget()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_cpu_processes_share_a_quota_instead_of_the_cores(monkeypatch):
    """DDP ranks on CPUs: each gets its share of the CPUs the process may use, where that is fewer than it sees."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)  # 16 cores seen
    monkeypatch.setattr(seq2seq.hardware, "cpu_budget", lambda: 16)  # no quota: Lightning's own rule stands
    share_cpu_budget(2)
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setattr(seq2seq.hardware, "cpu_budget", lambda: 4)  # a 4-CPU quota: 2 threads each
    share_cpu_budget(2)
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    share_cpu_budget(2)
    assert os.environ["OMP_NUM_THREADS"] == "3"


class FakeLibc:
    """Records mallopt calls; answers as glibc does (1: taken)."""

    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


@pytest.fixture
def clean_malloc_env(monkeypatch):
    """No malloc settings of the user's in the environment, and glibc's answers faked."""
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD", seq2seq.hardware.MALLOC_OPT_OUT):
            monkeypatch.delenv(name)
    monkeypatch.setattr(seq2seq.hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(seq2seq.hardware.platform, "libc_ver", lambda: ("glibc", "2.36"))
    libc = FakeLibc()
    monkeypatch.setattr(seq2seq.hardware, "c_library", lambda: libc)
    return libc


def test_glibc_keeps_freed_memory_unless_the_user_set_malloc(clean_malloc_env, monkeypatch):
    """Both thresholds raised (mmap: big buffers from the heap; trim: the heap kept), where nobody chose otherwise."""
    keep = seq2seq.hardware.keep_freed_memory.__wrapped__  # not the once-a-process answer
    assert "keeping freed memory" in keep()
    kept = seq2seq.hardware.KEPT_BYTES
    assert clean_malloc_env.calls == [(seq2seq.hardware.M_MMAP_THRESHOLD, kept),
                                      (seq2seq.hardware.M_TRIM_THRESHOLD, kept)]
    for name, value, said in [("MALLOC_ARENA_MAX", "2", "MALLOC_ARENA_MAX=2"),
                              ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0", "GLIBC_TUNABLES"),
                              ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "libjemalloc"),
                              (seq2seq.hardware.MALLOC_OPT_OUT, "system", "at its defaults")]:
        clean_malloc_env.calls.clear()
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert said in keep()
        assert clean_malloc_env.calls == []
    monkeypatch.setattr(seq2seq.hardware.platform, "libc_ver", lambda: ("", ""))  # musl, say
    assert "not glibc" in keep() and clean_malloc_env.calls == []
    monkeypatch.setattr(seq2seq.hardware, "c_library", lambda: FakeLibc(answer=0))
    monkeypatch.setattr(seq2seq.hardware.platform, "libc_ver", lambda: ("glibc", "2.17"))
    assert "defaults" in keep()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the page-fault count of a glibc Linux process")
def test_kept_memory_serves_the_next_big_buffer_without_page_faults():
    """The real glibc: a 64 MB buffer freed, then a 48 MB one asked for, three times. At glibc's defaults (over its
    32 MB ceiling: mmap'd) every one of the 48 MB's 12,288 pages faults in each time; with the memory kept, it lies in
    the 64 MB just freed and almost none do. (Not 64 MB again, nor 48 MB after 48 MB: an aligned request of a freed
    block's own size may not fit the hole it left once a small allocation has taken a few bytes of it, and then the
    heap grows instead.)"""
    import resource

    if seq2seq.hardware.platform.libc_ver()[0] != "glibc" or seq2seq.hardware.users_malloc_settings():
        pytest.skip("glibc's malloc at the user's own settings")
    seq2seq.hardware.keep_freed_memory.__wrapped__()
    faults = []
    for _ in range(3):
        torch.ones(16 * 2 ** 20)  # 64 MB, written, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(12 * 2 ** 20)  # 48 MB, written
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults) < 1000, faults


def test_the_reason_names_what_the_cpu_lacks():
    assert choose_precision("auto", "cpu", True, AVX2) == ("32", "this CPU has no native bf16 (AVX2)")


@pytest.mark.parametrize("speedup, native", [(0.0048, False), (0.52, False), (2.3, True)])
def test_flags_claiming_native_bf16_are_checked_by_a_measured_matmul(speedup, native, monkeypatch):
    """0.0048x: ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon; 0.52x: AVX512_CORE_BF16 there; 2.3x: no cap."""
    monkeypatch.setattr(seq2seq.hardware, "cpu_isa", lambda: ("AMX", True))
    monkeypatch.setattr(seq2seq.hardware, "bf16_matmul_speedup", lambda: speedup)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    machine = seq2seq.hardware.probe_machine()
    assert machine.cpu_native_bf16 is native
    precision, reason = choose_precision("auto", "cpu", training=True, machine=machine, d_model=256)
    assert precision == ("bf16" if native else "32")
    if not native:
        assert f"bf16 matmuls measured {speedup:.2g}x fp32 here under ONEDNN_MAX_CPU_ISA=AVX2" in reason
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in machine.describe()


def test_flags_without_native_bf16_are_taken_at_their_word(monkeypatch):
    """No matmul is timed where the flags already say fp32 (most CPUs): nothing to check."""
    monkeypatch.setattr(seq2seq.hardware, "cpu_isa", lambda: ("AVX2", False))
    monkeypatch.setattr(seq2seq.hardware, "bf16_matmul_speedup", lambda: pytest.fail("timed a matmul"))
    assert not seq2seq.hardware.probe_machine().cpu_native_bf16


ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes sve {extra} rng\n"
               "CPU part\t: 0xd40\n")


@pytest.mark.parametrize("arch, extra, claimed", [("aarch64", "bf16 i8mm", True), ("aarch64", "i8mm", False),
                                                  ("x86_64", "bf16", False)])
def test_arm_bf16_is_read_from_the_cpu_features(arch, extra, claimed, tmp_path, monkeypatch):
    """Graviton 3 lists bf16 among its Features; Graviton 2 does not; an x86 CPU is not read this way."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(ARM_CPUINFO.format(extra=extra))
    monkeypatch.setattr(seq2seq.hardware.platform, "machine", lambda: arch)
    assert seq2seq.hardware.arm_bf16(str(cpuinfo)) is claimed


@pytest.mark.parametrize("speedup, native", [(0.3, False), (1.9, True)])
def test_an_arm_cpu_claiming_bf16_is_timed_like_any_other(speedup, native, monkeypatch):
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    monkeypatch.setattr(seq2seq.hardware, "arm_bf16", lambda: True)
    monkeypatch.setattr(seq2seq.hardware, "bf16_matmul_speedup", lambda: speedup)
    machine = seq2seq.hardware.probe_machine()
    assert "Arm BF16" in machine.cpu_isa and machine.cpu_native_bf16 is native
    precision, _ = choose_precision("auto", "cpu", training=True, machine=machine, d_model=256)
    assert precision == ("bf16" if native else "32")
    precision, _ = choose_precision("auto", "cpu", training=False, machine=machine, d_model=256)
    assert precision == ("bf16" if native else "int8")  # int8 over native bf16 was measured on x86 only


def test_the_cpu_model_of_an_arm_machine_comes_from_lscpu(tmp_path, monkeypatch):
    """Arm's /proc/cpuinfo names no model; lscpu does ("Neoverse-V1"), and a benchmark prints it."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(ARM_CPUINFO.format(extra="bf16"))
    lscpu = "Architecture:             aarch64\nVendor ID:                ARM\nModel name:               Neoverse-V1\n"
    monkeypatch.setattr(seq2seq.hardware, "command_output", lambda command: lscpu if command == ["lscpu"] else "")
    assert seq2seq.hardware.cpu_model(str(cpuinfo)) == "Neoverse-V1"
    monkeypatch.setattr(seq2seq.hardware, "command_output", lambda command: "")
    assert seq2seq.hardware.cpu_model(str(cpuinfo)) == (seq2seq.hardware.platform.processor()
                                                         or seq2seq.hardware.platform.machine())


def test_isa_caps_name_the_variables_set(monkeypatch):
    for name in seq2seq.hardware.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert seq2seq.hardware.isa_caps() == ""
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert seq2seq.hardware.isa_caps() == "ONEDNN_MAX_CPU_ISA=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2"


@pytest.mark.slow
def test_bf16_emulated_under_a_onednn_cap_is_measured_slower_than_fp32():
    """The measurement itself, in a process whose oneDNN may use AVX2 only: bf16 is emulated there."""
    result = subprocess.run([sys.executable, "-c", "from seq2seq.hardware import bf16_matmul_speedup as s; print(s())"],
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True,
                            check=True)
    assert float(result.stdout) < 0.5


@pytest.mark.parametrize("requested", ["32", 32, "32-true", "bf16", "bf16-mixed"])
def test_explicit_choices_win_over_auto(requested):
    for machine in (AVX2, AMX):
        assert choose_precision(requested, "cpu", True, machine)[0] == precision_name(requested)


def test_bf16_asked_for_on_a_cpu_without_it_runs_but_says_so():
    precision, reason = choose_precision("bf16", "cpu", True, AVX2)
    assert precision == "bf16" and "no native bf16" in reason


@pytest.mark.parametrize("requested, device, training, message", [
    ("int8", "cpu", True, "precision=int8 is for decoding on a CPU"),
    ("int8", "cuda", False, "precision=int8 is for decoding on a CPU"),
    ("16", "cpu", False, "precision=16 needs a CUDA GPU"),
    ("16-mixed", "cpu", True, "precision=16 needs a CUDA GPU"),
    ("fp16", "cuda", True, "precision=fp16: expected one of auto, 32, bf16, 16, int8"),
])
def test_impossible_choices_are_one_line(requested, device, training, message):
    with pytest.raises(Seq2SeqError, match=message):
        choose_precision(requested, device, training, H200)


def test_training_precision_speaks_lightnings_names():
    assert training_precision("auto", "cpu", AVX2) == "32-true"
    assert training_precision("auto", "cpu", AMX) == "bf16-mixed"
    assert training_precision("auto", "gpu", T4) == "16-mixed"
    assert training_precision("auto", training_accelerator("auto", 1, H200), H200) == "bf16-mixed"
    assert training_precision(32, "gpu", H200) == "32-true"
    assert training_precision("auto", "cpu", AMX, d_model=64) == "32-true"


def test_training_accelerator(caplog, monkeypatch):
    """trainer=auto (the default) trains on the CUDA GPU when there is one, else on the CPU, and says so once;
    a GPU that is not there, or too few of them, is one line before any work, not Lightning's traceback."""
    monkeypatch.setattr(seq2seq.hardware, "_LOGGED", set())  # each choice is logged once per process
    with caplog.at_level(logging.INFO, logger="seq2seq.hardware"):
        assert training_accelerator("auto", 1, H200) == "gpu"
        assert training_accelerator("auto", 1, AMX) == "cpu"
    assert "training on cuda: NVIDIA H200" in caplog.text
    assert f"training on cpu: no CUDA GPU that torch {torch.__version__} can use" in caplog.text
    assert training_accelerator("cpu", 2, H200) == "cpu"  # DDP on 2 CPU processes, on a GPU machine too
    assert training_accelerator("gpu", 2, T4) == training_accelerator("cuda", "auto", T4) == "gpu"
    with pytest.raises(Seq2SeqError, match="^trainer.accelerator=gpu: this machine has no CUDA GPU .*trainer=auto"):
        training_accelerator("gpu", 1, AVX2)
    with pytest.raises(Seq2SeqError, match="^trainer.devices=2: only 1 CUDA GPU"):
        training_accelerator("auto", 2, H200)
    with pytest.raises(Seq2SeqError, match="^trainer.accelerator=mps: expected one of auto, cpu, gpu, cuda"):
        training_accelerator("mps", 1, AMX)


def test_blocks_of_logits_fit_a_cpus_cache_and_a_gpus_memory():
    assert rows_per_block(torch.device("cpu"), 8000, cpu_rows=64) == 64
    assert rows_per_block(torch.device("cuda", 1), 8000, cpu_rows=64) == 2 ** 26 // 8000  # 8,388 rows, 256 MB fp32
    assert rows_per_block(torch.device("cuda"), 2 ** 27, cpu_rows=64) == 1


def test_devices():
    assert resolve_device("auto", AMX) == torch.device("cpu")
    assert resolve_device("cpu", H200) == torch.device("cpu")
    with pytest.raises(Seq2SeqError, match="device=cuda: this machine has no CUDA GPU"):
        resolve_device("cuda", AMX)
    with pytest.raises(Seq2SeqError, match="device=tpu: expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", AMX)


def use_kernel(kernel: str, monkeypatch) -> None:
    """Build int8 layers with this kernel; torch._int_mm only where it is exact (it is never used elsewhere)."""
    if kernel == "int_mm" and not int_mm_exact():
        pytest.skip("torch._int_mm saturates on this CPU, which therefore never uses it")
    monkeypatch.setattr(seq2seq.int8, "int8_kernel", lambda: kernel)


@pytest.mark.parametrize("kernel", ["fixed", "int_mm"])
def test_int8_model_is_close_to_fp32(tiny_model, kernel, monkeypatch):
    use_kernel(kernel, monkeypatch)
    torch.manual_seed(0)
    src = torch.randint(4, tiny_model.cfg.vocab_size, (3, 7))
    tgt = torch.randint(4, tiny_model.cfg.vocab_size, (3, 5))
    int8 = Int8Transformer(tiny_model)
    with torch.no_grad():
        ref, low = tiny_model(src, tgt), int8(src, tgt)
    assert (ref - low).abs().max() < 0.05 * ref.abs().max()
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in int8.modules())
    assert tiny_model.encoder_layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the original untouched


@pytest.mark.parametrize("kernel", ["fixed", "int_mm"])
def test_int8_self_attention_is_one_stacked_product_with_the_outputs_of_separate_ones(tiny_model, kernel,
                                                                                    monkeypatch):
    use_kernel(kernel, monkeypatch)
    int8 = Int8Transformer(tiny_model)
    for layer in [*int8.encoder_layers, *int8.decoder_layers]:
        assert isinstance(layer.self_attn, Int8SelfAttention) and not hasattr(layer.self_attn, "q_proj")
        assert layer.self_attn.qkv_proj.out_features == 3 * tiny_model.cfg.d_model
    for layer in int8.decoder_layers:
        assert not isinstance(layer.cross_attn, Int8SelfAttention)  # its keys and values come from the memory
    float_attn = tiny_model.decoder_layers[0].self_attn
    q_proj, kv_proj = Int8Linear(float_attn.q_proj), Int8Linear(float_attn.kv_proj)  # the products kept apart
    torch.manual_seed(0)
    x = torch.randn(3, 5, tiny_model.cfg.d_model) * torch.logspace(-2, 2, 3)[:, None, None]
    with torch.no_grad():
        stacked = int8.decoder_layers[0].self_attn.project_qkv(x)
        separate = (float_attn.split_heads(q_proj(x)), *(float_attn.split_heads(t) for t in kv_proj(x).chunk(2, -1)))
    for a, b in zip(stacked, separate):
        assert torch.equal(a, b)


# fbgemm's fixed-scale kernel; the anchored dynamic one (qnnpack on ARM, an older torch); torch._int_mm (a torch
# without quantized kernels)
@pytest.mark.parametrize("engine, kernel", [("x86", "fixed"), ("x86", "dynamic"), ("qnnpack", "dynamic"),
                                            ("x86", "int_mm")])
def test_int8_linear_quantizes_each_row_on_its_own(engine, kernel, monkeypatch):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"quantization engine {engine} is not in this torch build")
    monkeypatch.setattr(torch.backends.quantized, "engine", engine)
    assert int8_kernel() == ("fixed" if engine == "x86" else "dynamic")  # what this torch picks by itself
    use_kernel(kernel, monkeypatch)
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(4, 6, 32) * torch.logspace(-2, 2, 4)[:, None, None]  # rows of very different sizes
    int8 = Int8Linear(linear)
    assert int8.kernel == kernel
    with torch.no_grad():
        ref, out = linear(x), int8(x)
        small_alone = int8(x[0])  # the smallest rows, without the large ones that a batch-wide scale would follow
    assert torch.equal(small_alone, out[0])
    assert ((out - ref).abs().amax(-1) <= 0.03 * ref.abs().amax(-1)).all()  # each row within 3% of its own size


@pytest.mark.parametrize("has_vnni, exact, kernel", [(True, True, "int_mm"), (False, True, ""), (True, False, "")])
def test_a_torch_without_quantized_kernels_multiplies_through_int_mm_where_the_cpu_allows(has_vnni, exact, kernel,
                                                                                         monkeypatch):
    monkeypatch.setattr(seq2seq.int8, "quantized_ops", lambda: False)
    monkeypatch.setattr(seq2seq.int8, "vnni", lambda: has_vnni)
    monkeypatch.setattr(seq2seq.int8, "int_mm_exact", lambda: exact)
    assert int8_kernel() == kernel
    assert cpu_int8_kernels() == bool(kernel)  # what `auto` and precision=int8 go by
    if not kernel:
        with pytest.raises(NotImplementedError, match="VNNI"):
            Int8Linear(torch.nn.Linear(4, 4))


def needs_onednn() -> None:
    if seq2seq.int8.int8_kernel() != "fixed" or not seq2seq.int8.onednn_qlinear():
        pytest.skip("this torch build has no fbgemm fixed-scale kernel or no oneDNN int8 linear")


def test_onednn_and_fbgemm_int8_products_are_the_same_bit_for_bit_extreme_values_included():
    """Rows at +-1 against weights at +-127: without VNNI, u8 x s8 pairs are summed in 16 bits, where 7-bit rows
    (1..127) keep the sums from saturating in both libraries."""
    needs_onednn()
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64).sign())  # every weight quantizes to +-127
    layer = Int8Linear(linear)
    rows = torch.cat([torch.ones(2, 64), -torch.ones(2, 64), torch.randn(2, 64).sign(), torch.rand(300, 64) * 2 - 1])
    assert torch.equal(layer.onednn_product(rows), layer.fbgemm_product(rows))
    exact = (rows * 63).round() @ (linear.weight * 127).t() * (1 / 63) * (linear.weight.abs().amax(1) / 127)
    assert torch.allclose(layer.fbgemm_product(rows), exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pays", [True, False])
def test_an_int8_linear_of_many_rows_multiplies_through_onednn_where_it_pays_with_the_same_output(pays, monkeypatch):
    needs_onednn()
    monkeypatch.setattr(seq2seq.int8, "onednn_pays", lambda: pays)
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(32, 16))
    calls = []
    onednn_product = layer.onednn_product
    monkeypatch.setattr(layer, "onednn_product", lambda rows: calls.append(len(rows)) or onednn_product(rows))
    x = torch.randn(seq2seq.int8.ONEDNN_ROWS + 7, 32) * torch.logspace(-2, 2, seq2seq.int8.ONEDNN_ROWS + 7)[:, None]
    with torch.no_grad():
        many, few = layer(x), layer(x[:5])
        monkeypatch.setattr(seq2seq.int8, "onednn_pays", lambda: False)
        assert torch.equal(layer(x), many) and torch.equal(few, many[:5])  # fbgemm alone: the same bits
    assert calls == ([len(x)] if pays else [])


def test_whether_onednn_pays_is_timed_once_a_process_and_never_without_its_ops(monkeypatch):
    needs_onednn()
    seq2seq.int8.onednn_pays.cache_clear()
    state = torch.random.get_rng_state()
    assert seq2seq.int8.onednn_pays() in (True, False)
    assert torch.equal(torch.random.get_rng_state(), state)  # its random layer left the caller's draws alone
    assert seq2seq.int8.onednn_pays.cache_info().misses == 1 and seq2seq.int8.onednn_pays() in (True, False)
    assert seq2seq.int8.onednn_pays.cache_info().hits == 1
    seq2seq.int8.onednn_pays.cache_clear()
    monkeypatch.setattr(seq2seq.int8, "onednn_qlinear", lambda: False)
    assert seq2seq.int8.onednn_pays() is False
    seq2seq.int8.onednn_pays.cache_clear()


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_packed_weight_calls_are_compiled_by_torchscript_and_give_the_eager_bits(engine, monkeypatch):
    """Called from TorchScript, a quantized op skips ~17 us of Python overhead a call; a compile that failed would fall
    back to eager in silence, so this says that it compiled, and that the compiled layers give the same bits."""
    if engine not in torch.backends.quantized.supported_engines or not seq2seq.int8.quantized_ops():
        pytest.skip(f"quantization engine {engine} is not in this torch build")
    monkeypatch.setattr(torch.backends.quantized, "engine", engine)
    functions = (seq2seq.int8.packed_linear, seq2seq.int8.packed_scaled, seq2seq.int8.packed_feed_forward,
                 seq2seq.int8.packed_encoder_layers, seq2seq.int8.packed_decoder_layers)
    assert all(isinstance(seq2seq.int8.compiled(f), torch.jit.ScriptFunction) for f in functions)
    torch.manual_seed(0)
    ffn = seq2seq.int8.Int8FeedForward(seq2seq.model.FeedForward(32, 64))
    x = torch.randn(2, 3, 32) * torch.logspace(-3, 3, 3)[:, None]  # (B, T, D), rows of very different sizes
    with torch.no_grad():
        compiled_out = ffn(x), ffn.w1(x)
        assert ffn.w1.kernel == ("fixed" if engine == "x86" else "dynamic")
        monkeypatch.setattr(seq2seq.int8, "compiled", lambda function: function)  # eager
        assert all(torch.equal(a, b) for a, b in zip(compiled_out, (ffn(x), ffn.w1(x))))


def varargs(*xs):  # TorchScript compiles no *args
    return xs


def test_what_torchscript_cannot_compile_runs_eager():
    assert seq2seq.int8.compiled(varargs) is varargs


@pytest.mark.parametrize("speedup, pays", [(1.2, True), (0.97, True), (0.9, False)])
def test_onednn_is_used_unless_its_product_times_clearly_slower(speedup, pays, monkeypatch):
    """Its timing wanders by +-20% on a virtual machine: only a clearly slower oneDNN leaves the work to fbgemm."""
    needs_onednn()
    seq2seq.int8.onednn_pays.cache_clear()
    monkeypatch.setattr(seq2seq.int8, "onednn_speedup", lambda: speedup)
    assert seq2seq.int8.onednn_pays() is pays
    seq2seq.int8.onednn_pays.cache_clear()


def test_onednn_speedup_times_a_pass_of_each_kernel_over_layers_of_each_shape(monkeypatch):
    needs_onednn()
    calls = []
    for product in ("fbgemm_product", "onednn_product"):
        kernel = getattr(Int8Linear, product)
        monkeypatch.setattr(Int8Linear, product, lambda self, rows, kernel=kernel, product=product:
                            calls.append((product, self.in_features, self.out_features)) or kernel(self, rows))
    assert 0.1 < seq2seq.int8.onednn_speedup(16) < 10
    shapes = [(16, 48), (16, 64), (64, 16)]
    assert calls == [(product, *shape) for _ in range(6) for product in ("fbgemm_product", "onednn_product")
                     for shape in shapes]


@pytest.mark.parametrize("kernel", ["fixed", "int_mm"])
def test_int8_beam_search_gives_each_sentence_what_it_gets_alone(tiny_model, kernel, monkeypatch):
    """Through the KV cache too: a sentence's hypotheses and scores do not depend on the sentences batched
    with it (a batch-wide activation scale changed tokens here, and scores by up to 0.02)."""
    use_kernel(kernel, monkeypatch)
    torch.manual_seed(0)
    src = torch.randint(4, tiny_model.cfg.vocab_size, (6, 12))
    src[1, 5:], src[3, 2:] = tiny_model.cfg.pad_id, tiny_model.cfg.pad_id
    search = SearchConfig(beam_size=3, nbest=3, max_len_a=0, max_len_b=8)
    int8 = Int8Transformer(tiny_model)
    batched = beam_search(int8, src, tiny_model.pad_mask(src), search)
    for sentence, hyps in zip(src, batched):
        alone = sentence[sentence.ne(tiny_model.cfg.pad_id)][None]  # (1, its own length)
        [hyps_alone] = beam_search(int8, alone, tiny_model.pad_mask(alone), search)
        assert [tokens for tokens, _ in hyps] == [tokens for tokens, _ in hyps_alone]
        assert [score for _, score in hyps] == pytest.approx([score for _, score in hyps_alone], abs=1e-5)


def small_int8_model(engine: str, pre_norm: bool, monkeypatch, **layers) -> Int8Transformer:
    """An int8 copy of a small random Transformer, on the quantization engine named (skipped where torch lacks it)."""
    if engine not in torch.backends.quantized.supported_engines or not seq2seq.int8.quantized_ops():
        pytest.skip(f"quantization engine {engine} is not in this torch build")
    monkeypatch.setattr(torch.backends.quantized, "engine", engine)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, pad_id=0, d_model=32, n_heads=4, d_ff=64, dropout=0.0, pre_norm=pre_norm,
                      max_len=64, **layers)
    return Int8Transformer(Transformer(cfg).eval())


def small_steps_decode_as_the_eager_layers(stepped, monkeypatch) -> None:
    """`stepped` (a SteppedTransformer) decodes a small batch through its compiled small steps, and with the same
    n-best lists and scores, bit for bit, as its eager layers (Transformer.decode_step), through beam reorders,
    dropped sentences, padding and a forced prefix."""
    cfg = stepped.cfg
    src = torch.randint(4, cfg.vocab_size, (5, 9))
    src[1, 4:], src[3, 2:] = cfg.pad_id, cfg.pad_id
    prefix = torch.full((5, 2), -1)
    prefix[2] = torch.tensor([7, 8])
    calls = []
    layer_step = seq2seq.int8.compiled(seq2seq.int8.packed_decoder_layers)
    monkeypatch.setattr(seq2seq.int8, "compiled", lambda f: (lambda *a: calls.append(1) or layer_step(*a))
                        if f is seq2seq.int8.packed_decoder_layers else f)
    searches = [SearchConfig(beam_size=3, nbest=3, max_len_a=0, max_len_b=8), SearchConfig(beam_size=1),
                SearchConfig(beam_size=2, max_len_a=0, max_len_b=24, min_len=24)]  # past the cache's first room
    with torch.inference_mode():
        compiled = [search_batch(stepped, src, search, prefix) for search in searches]
        assert calls
        monkeypatch.setattr(type(stepped), "decode_step", Transformer.decode_step)  # the eager layers
        assert compiled == [search_batch(stepped, src, search, prefix) for search in searches]


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_int8_small_steps_compiled_whole_decode_what_the_eager_layers_do(pre_norm, engine, monkeypatch):
    """The decoder layers of a small int8 step in one TorchScript call: what the eager int8 layers decode."""
    small_steps_decode_as_the_eager_layers(small_int8_model(engine, pre_norm, monkeypatch, n_enc_layers=1,
                                                            n_dec_layers=2), monkeypatch)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_fp32_small_steps_compiled_whole_decode_what_the_eager_layers_do(pre_norm, monkeypatch):
    """fp32 decoding on a CPU takes the same compiled small steps, with the float model's own weights (shared, not
    copied): what the eager layers decode."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, pad_id=0, d_model=32, n_heads=4, d_ff=64, dropout=0.0, pre_norm=pre_norm,
                      max_len=64, n_enc_layers=1, n_dec_layers=2)
    model = Transformer(cfg).eval()
    stepped = seq2seq.int8.stepped_copy(model)
    assert stepped.decoder_layers[1].ffn[2].weight.data_ptr() == model.decoder_layers[1].ffn[2].weight.data_ptr()
    src = torch.randint(4, cfg.vocab_size, (3, 7))
    with torch.inference_mode():
        scripted = search_batch(stepped, src, SearchConfig(beam_size=2))
        with monkeypatch.context() as m:  # a torch without TorchScript runs the same function eager
            m.setattr(seq2seq.int8, "compiled", lambda f: f)
            assert search_batch(stepped, src, SearchConfig(beam_size=2)) == scripted
    small_steps_decode_as_the_eager_layers(stepped, monkeypatch)


def test_translator_decodes_fp32_on_a_cpu_through_the_compiled_steps(tiny_model, tokenizer):
    """precision=32 on a CPU decodes with a SteppedTransformer sharing the model's weights, made once; int8 with the
    int8 copy; the texts are the eager model's."""
    from seq2seq.checkpoint import TextInfo

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    lines = ["the cat sat on the mat .", "a dog .", "the dog sat ."]
    for beam_size in (1, 3):
        texts = translator.translate(lines, SearchConfig(beam_size=beam_size, precision="32"))
        assert isinstance(translator.stepped_model, seq2seq.int8.SteppedTransformer)
        stepped, translator.stepped_model = translator.stepped_model, tiny_model  # the eager layers in its place
        assert translator.translate(lines, SearchConfig(beam_size=beam_size, precision="32")) == texts
        translator.stepped_model = stepped
    with translator.decoding(SearchConfig(precision="32")) as model:
        assert model is stepped  # kept
    if torch.backends.quantized.engine in ("x86", "fbgemm", "qnnpack") and seq2seq.int8.int8_kernel():
        with translator.decoding(SearchConfig(precision="int8")) as model:
            assert isinstance(model, Int8Transformer)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_int8_small_batches_encoded_whole_as_the_eager_layers_do(pre_norm, engine, monkeypatch):
    """The encoder's layers of a small batch in one TorchScript call: the same memory, bit for bit, as the eager
    layers, padding included; and only where the eager layers would run SDPA on packed weights (not at 8 positions
    or fewer with many rows, where they take the explicit softmax, nor with weights asked for)."""
    int8 = small_int8_model(engine, pre_norm, monkeypatch, n_enc_layers=2, n_dec_layers=1)
    cfg = int8.cfg
    calls = []
    encoder = seq2seq.int8.compiled(seq2seq.int8.packed_encoder_layers)
    monkeypatch.setattr(seq2seq.int8, "compiled", lambda f: (lambda *a: calls.append(a[0].shape[:2]) or encoder(*a))
                        if f is seq2seq.int8.packed_encoder_layers else f)
    for rows, length, store_weights, whole in ((5, 9, False, True), (1, 3, False, True), (200, 2, False, False),
                                               (5, 9, True, False)):
        src = torch.randint(4, cfg.vocab_size, (rows, length))
        src[0, length // 2:] = cfg.pad_id  # a padded row
        int8.encoder_layers[0].self_attn.store_weights = store_weights
        calls.clear()
        with torch.inference_mode():
            memory = int8.encode(src, int8.pad_mask(src))
            assert torch.equal(memory, Transformer.encode(int8, src, int8.pad_mask(src)))
        assert (calls == [(rows, length)]) == whole, (rows, length, store_weights, calls)


def test_int8_steps_compiled_whole_only_where_small_and_plain(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, pad_id=0, d_model=32, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=1,
                      dropout=0.0, pre_norm=True, max_len=64)
    int8 = Int8Transformer(Transformer(cfg).eval())
    if not int8.decoder_layers[0].ffn.w1.packed_for(1):
        pytest.skip("this torch's int8 products do not go through packed weights")
    calls = []
    monkeypatch.setattr(seq2seq.int8, "compiled", lambda f: (lambda *a: calls.append(len(a[0])) or f(*a))
                        if f is seq2seq.int8.packed_decoder_layers else f)
    src = torch.randint(4, cfg.vocab_size, (200, 6))
    with torch.no_grad():
        for rows, store_weights in ((1, False), (127, False), (128, False), (1, True)):
            calls.clear()
            int8.decoder_layers[0].cross_attn.store_weights = store_weights
            memory = int8.encode(src[:rows], int8.pad_mask(src[:rows]))
            int8.decode_step(torch.ones(rows, 1, dtype=torch.long), memory, None, [{}])
            compiled_whole = rows * cfg.n_heads < seq2seq.attention.STEP_MIN_VECTORS and not store_weights
            assert (rows in calls) == compiled_whole, (rows, store_weights, calls)


@pytest.mark.slow
def test_int8_translations_are_close_to_fp32(smoke_run, demo_corpus):
    """On the trained smoke model: most lines the same length within one token, and BLEU within a bound."""
    translator = Translator.from_checkpoint(smoke_run / "checkpoints" / "best.ckpt", device="cpu")
    src = demo_corpus["test"][0][:100]
    fp32 = translator.translate(src, beam_size=3, precision="32")
    int8 = translator.translate(src, beam_size=3, precision="int8")
    lengths = translator.tokenizer.encode(fp32), translator.tokenizer.encode(int8)
    assert sum(abs(len(a) - len(b)) <= 1 for a, b in zip(*lengths)) >= 0.9 * len(src)
    assert sacrebleu.corpus_bleu(int8, [fp32], tokenize="char").score > 90  # int8 against fp32 as reference


@pytest.mark.slow
def test_cli_takes_precision_32_and_bf16_and_refuses_a_missing_gpu(smoke_run):
    ckpt = f"ckpt={smoke_run}/checkpoints/best.ckpt"
    for precision in ("32", "bf16", "int8"):
        proc = run_py("translate", ckpt, f"precision={precision}", "beam_size=2", input="The cat eats the fish.\n")
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        assert f"decoding precision {precision}: as asked" in proc.stderr
    proc = run_py("translate", ckpt, input="The cat eats the fish.\n")
    assert proc.returncode == 0 and "decoding precision " in proc.stderr  # auto: the choice and its reason
    if not torch.cuda.is_available():
        proc = run_py("translate", ckpt, "device=cuda", input="The cat eats the fish.\n")
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            "error: device=cuda: this machine has no CUDA GPU that torch "
            f"{torch.__version__} can use; use device=cpu or device=auto"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["translate", "evaluate", "serve"])
def test_a_precision_the_device_lacks_is_one_line_before_any_work(smoke_run, command, tmp_path):
    """precision=16 on a CPU is refused before a progress bar starts (translate, evaluate) or the service
    listens (serve: otherwise every request would fail), in one line."""
    (tmp_path / "src.en").write_text("The cat eats the fish.\n")
    (tmp_path / "ref.ja").write_text("猫は魚を食べる。\n")
    args = {"evaluate": [f"src={tmp_path}/src.en", f"ref={tmp_path}/ref.ja", f"output={tmp_path}/hyp.ja"],
            "serve": ["port=0"]}.get(command, [])
    proc = run_py(command, f"ckpt={smoke_run}/checkpoints/best.ckpt", "device=cpu", "precision=16", *args,
                  input="The cat eats the fish.\n", timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: precision=16 needs a CUDA GPU (float16 on a CPU is emulated and slow); use auto, 32 or bf16"]
    assert not (tmp_path / "hyp.ja").exists()


@pytest.mark.parametrize("machine, d_model, expected", [
    (AVX2, 256, ["training on cpu   32 ", "decoding on cpu   int8", "trainer=auto trains on cpu (no CUDA GPU",
                 "device=auto decodes on cpu (no CUDA GPU"]),
    (AMX, 256, ["training on cpu   bf16", "decoding on cpu   int8", "device=auto decodes on cpu (no CUDA GPU"]),
    (AMX, 64, ["training on cpu   32    d_model 64 < 128", "decoding on cpu   32    d_model 64 < 128"]),
    (H200, 256, ["training on cpu   bf16", "training on cuda  bf16  NVIDIA H200", "decoding on cuda  bf16",
                 "trainer=auto trains on cuda", "device=auto decodes on cuda"]),
    (T4, 256, ["training on cpu   32 ", "decoding on cpu   int8", "training on cuda  16    Tesla T4 has no bf16",
               "device=auto decodes on cuda"]),
])
def test_run_py_machine_says_what_auto_picks(machine, d_model, expected):
    lines = seq2seq.hardware.auto_choices(machine, d_model)
    assert lines[0] == f"precision=auto for d_model {d_model}:"
    for line in expected:  # each in its place: a training row, then the decoding row, per device
        assert sum(row.strip().startswith(line.strip()) for row in lines) == 1, (line, lines)
    assert len(lines) == 3 + 2 * (1 + machine.cuda)


@pytest.mark.slow
def test_run_py_machine(smoke_run):
    """The machine line, threads, int8 kernel, peaks, malloc's state and auto's choices for a checkpoint's width, as
    this process's own probe decides them; a missing checkpoint is one line."""
    proc = run_py("machine", f"ckpt={smoke_run}/checkpoints/best.ckpt")
    assert proc.returncode == 0, proc.stderr
    machine = seq2seq.hardware.this_machine()
    out = proc.stdout.splitlines()
    assert out[0] == f"machine: {machine.describe()}"
    assert out[1].startswith("threads: ") and out[2].startswith("int8 kernel: ")
    assert out[3].startswith("CPU matmul peak: fp32 ")
    assert out[4] == f"memory: {seq2seq.hardware.keep_freed_memory()}"
    assert out[5:] == seq2seq.hardware.auto_choices(machine, 64)  # the smoke model's width
    proc = run_py("machine", "ckpt=no/such.ckpt", "peaks=false")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == ["error: no/such.ckpt: checkpoint not found"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these)")


@cuda
def test_cuda_greedy_fp32_matches_the_cpu(smoke_run, demo_corpus):
    src = demo_corpus["test"][0][:50]
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    on_cpu = Translator.from_checkpoint(ckpt, device="cpu").translate(src, beam_size=1, precision="32")
    on_gpu = Translator.from_checkpoint(ckpt, device="cuda").translate(src, beam_size=1, precision="32")
    assert [h[0][0] for h in on_gpu] == [h[0][0] for h in on_cpu]


@cuda
def test_cuda_beam_search_with_the_kv_cache_equals_the_cpu(tiny_model):
    src = torch.randint(4, tiny_model.cfg.vocab_size, (4, 6))
    search = SearchConfig(beam_size=3, nbest=2, max_len_a=0, max_len_b=6)
    on_cpu = beam_search(tiny_model, src, tiny_model.pad_mask(src), search)
    gpu_model = Transformer(tiny_model.cfg).cuda().eval()
    gpu_model.load_state_dict(tiny_model.state_dict())
    on_gpu = beam_search(gpu_model, src.cuda(), gpu_model.pad_mask(src.cuda()), search)
    assert [[h for h, _ in hyps] for hyps in on_gpu] == [[h for h, _ in hyps] for hyps in on_cpu]


@cuda
def test_cuda_training_runs_and_resumes_with_the_cuda_rng(tmp_path, data_dir):
    from seq2seq.checkpoint import load_checkpoint
    from seq2seq.train import train
    from tests.conftest import compose_train

    cfg = compose_train(["experiment=smoke", "trainer=gpu", f"data_dir={data_dir}", f"output_dir={tmp_path}",
                         "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false"])
    train(cfg)
    assert "cuda_rng_state" in load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
