"""TensorRT engine settings: decided by a pure function (no TensorRT here), applied by the loaders.

``create_config`` is checked against a fake ``tensorrt`` module that records calls: that tests that
our settings are applied as decided (TF32 cleared, workspace, profiles, return values checked), not
TensorRT itself - the GPU tests do that where a GPU exists.
"""

from __future__ import annotations

import types

import pytest

from qvl_export.core.devices import DEVICES, Profile, Ranges, profiles
from qvl_export.core.errors import QvlError
from qvl_export.loading.config import parse_model_config
from qvl_export.runtimes.trt.loaders import create_config
from qvl_export.runtimes.trt.settings import engine_settings, trt_major

PROF = [Profile("prefill", {"input_ids": ((1, 1), (1, 64), (1, 128))})]


def test_tf32_cleared_and_typing_by_tensorrt_version():
    s10 = engine_settings("fp32", PROF, trt_major=10)
    assert s10.tf32 is False and s10.strongly_typed_flag is True and s10.workspace_bytes == 4 << 30
    s11 = engine_settings("int8", PROF, trt_major=11, workspace_gb=2)
    assert s11.tf32 is False and s11.strongly_typed_flag is False and s11.workspace_bytes == 2 << 30
    for precision in ("fp16", "bf16", "fp8"):  # fp32 islands of lower-precision graphs: TF32 off too
        assert engine_settings(precision, PROF, trt_major=10).tf32 is False
    assert engine_settings("fp16", PROF, trt_major=10, allow_tf32=True).tf32 is True
    assert trt_major("10.3.0.30") == 10 and trt_major("11.0.0") == 11


def test_refusals_name_the_problem():
    with pytest.raises(QvlError, match="profile"):
        engine_settings("fp32", [], trt_major=10)
    with pytest.raises(QvlError, match="TensorRT 10"):
        engine_settings("fp32", PROF, trt_major=8)
    with pytest.raises(QvlError, match="workspace"):
        engine_settings("fp32", PROF, trt_major=10, workspace_gb=0)
    with pytest.raises(QvlError, match="min <= opt <= max"):
        engine_settings("fp32", [Profile("bad", {"x": ((1, 8), (1, 4), (1, 16))})], trt_major=10)
    with pytest.raises(QvlError, match="int3"):
        engine_settings("int3", PROF, trt_major=10)


def test_workspace_capped_on_shared_memory_devices():
    nano = DEVICES["jetson-orin-nano"]  # 8 GB, 2 reserved: a quarter of 6 GB
    s = engine_settings("fp16", PROF, trt_major=10, usable_memory_gb=nano.usable_gb)
    assert s.workspace_bytes == int(1.5 * (1 << 30))
    assert engine_settings("fp16", PROF, trt_major=10, usable_memory_gb=128).workspace_bytes == 4 << 30


def test_decoder_profiles_become_settings(checkpoint):
    spec = parse_model_config(checkpoint("qwen2_vl"))
    s = engine_settings("int8", profiles(spec, "decoder", Ranges(max_seq=1024, opt_seq=256)), trt_major=10)
    assert [p.name for p in s.profiles] == ["prefill", "decode"]
    assert s.profiles[1].shapes["input_ids"][2] == (1, 1)


class _Recorder:
    """A fake tensorrt module + builder + config + network that records what is applied."""

    def __init__(self, inputs, add_profile_result=0):
        self.calls = []
        self.inputs = inputs
        self.add_profile_result = add_profile_result
        self.trt = types.SimpleNamespace(
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            BuilderFlag=types.SimpleNamespace(TF32="TF32"))
        rec = self

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                rec.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                rec.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, p):
                rec.calls.append(("add_optimization_profile", dict(p.shapes)))
                return rec.add_profile_result

        class OptProfile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        self.builder = types.SimpleNamespace(create_builder_config=Config, create_optimization_profile=OptProfile)
        self.network = types.SimpleNamespace(num_inputs=len(inputs),
                                             get_input=lambda i: types.SimpleNamespace(name=inputs[i]))


def test_create_config_applies_the_settings_only():
    rec = _Recorder(["input_ids"])
    create_config(rec.trt, rec.builder, rec.network, engine_settings("fp32", PROF, trt_major=10, workspace_gb=1))
    assert rec.calls == [("set_memory_pool_limit", "WORKSPACE", 1 << 30), ("clear_flag", "TF32"),
                         ("add_optimization_profile", {"input_ids": ((1, 1), (1, 64), (1, 128))})]
    rec = _Recorder(["input_ids"])
    create_config(rec.trt, rec.builder, rec.network, engine_settings("fp32", PROF, trt_major=10, allow_tf32=True))
    assert ("set_flag", "TF32") in rec.calls


def test_create_config_checks_profiles():
    with pytest.raises(QvlError, match="rejected the prefill"):
        rec = _Recorder(["input_ids"], add_profile_result=-1)
        create_config(rec.trt, rec.builder, rec.network, engine_settings("fp32", PROF, trt_major=10))
    with pytest.raises(QvlError, match="lacks"):
        rec = _Recorder(["tokens"])
        create_config(rec.trt, rec.builder, rec.network, engine_settings("fp32", PROF, trt_major=10))
