"""'auto' precision: bf16 only where the device has bf16 units, fp32 elsewhere and in every
exact mode; an explicit bf16 on an emulating device is obeyed with a warning."""

import math
import warnings

import pytest

from mmca import hardware
from mmca.engine import precision


@pytest.fixture(autouse=True)
def fresh_cache():
    precision._auto.cache_clear()
    precision.measured_bf16_speedup.cache_clear()
    yield
    precision._auto.cache_clear()
    precision.measured_bf16_speedup.cache_clear()


def with_flags(monkeypatch, flags):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)


def test_auto_takes_bf16_where_the_cpu_has_bf16_units(monkeypatch):
    with_flags(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
    choice = precision.resolve_precision("auto", "cpu")
    assert choice.precision == "bf16" and "avx512_bf16" in choice.reason
    with_flags(monkeypatch, {"avx2", "amx_bf16"})
    precision._auto.cache_clear()
    assert precision.resolve_precision("auto", "cpu").precision == "bf16"


def test_auto_takes_fp32_where_bf16_is_emulated(monkeypatch):
    with_flags(monkeypatch, {"avx2", "fma"})
    choice = precision.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "emulated" in choice.reason


@pytest.mark.parametrize("speedup, expected", [(0.05, "fp32"), (3.0, "bf16")])
def test_auto_falls_back_on_the_probe_where_the_flags_are_unknown(monkeypatch, speedup, expected):
    with_flags(monkeypatch, None)
    monkeypatch.setattr(precision, "_timed_product", lambda dtype, dev: 1.0 if dtype.is_floating_point
                        and dtype.itemsize == 4 else 1.0 / speedup)
    choice = precision.resolve_precision("auto", "cpu")
    assert choice.precision == expected and f"{speedup:.2f}x" in choice.reason


def test_exact_modes_never_take_bf16_from_auto(monkeypatch):
    with_flags(monkeypatch, {"avx512_bf16"})
    assert precision.resolve_precision("auto", "cpu", exact=True).precision == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_warns_with_the_measured_factor(monkeypatch):
    with_flags(monkeypatch, {"avx2"})
    monkeypatch.setattr(precision, "_timed_product", lambda dtype, dev: 1.0 if dtype.itemsize == 4 else 20.0)
    with pytest.warns(UserWarning, match="20.0x slower"):
        assert precision.resolve_precision("bf16", "cpu").precision == "bf16"
    with_flags(monkeypatch, {"avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16", "cpu").precision == "bf16"


def test_the_real_probe_gives_one_finite_ratio_per_process():
    speedup = precision.measured_bf16_speedup("cpu")
    assert math.isfinite(speedup) and speedup > 0
    assert precision.measured_bf16_speedup("cpu") == speedup  # timed once: "auto" decides once per run
    with pytest.raises(ValueError, match="precision must be"):
        precision.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("capability, env", [("AVX2", {}), ("AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"})])
def test_a_process_held_below_the_cpus_bf16_units_is_probed(monkeypatch, capability, env):
    """ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU: the flags no longer say
    what runs, the probe does (here it finds bf16 emulated, 20x slower)."""
    with_flags(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for key in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(precision, "_timed_product", lambda dtype, dev: 1.0 if dtype.itemsize == 4 else 20.0)
    choice = precision.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "runs below it" in choice.reason and "0.05x" in choice.reason
