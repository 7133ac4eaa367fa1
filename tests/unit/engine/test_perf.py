"""Roofline performance model: the shapes of its curves, and the datasheet ratios it must keep."""

import pytest

from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import PerfModel, required_tp


def test_decode_step_grows_with_batch_but_throughput_grows_more():
    p = PerfModel.from_names("mistral-7b", "A100-80G")
    step1 = p.decode_step_s(1, 512)
    step64 = p.decode_step_s(64, 64 * 512)
    assert step64 > step1
    assert 64 / step64 > 10 * (1 / step1)  # batching amortises the weight reads


def test_decode_step_grows_with_context():
    p = PerfModel.from_names("llama-2-13b", "A100-80G")
    assert p.decode_step_s(8, 8 * 4000) > p.decode_step_s(8, 8 * 100)


@pytest.mark.parametrize("model", ["mistral-7b", "llama-3-8b"])
def test_h100_decodes_faster_than_a10_by_about_the_bandwidth_ratio(model):
    a10 = PerfModel.from_names(model, "A10")
    h100 = PerfModel.from_names(model, "H100")
    speedup = a10.decode_step_s(1, 256) / h100.decode_step_s(1, 256)
    bw_ratio = hw.GPUS["H100"].hbm_bytes_per_s / hw.GPUS["A10"].hbm_bytes_per_s
    # The fixed per-step overhead keeps it slightly under the pure bandwidth ratio (5.6x).
    assert 0.8 * bw_ratio <= speedup <= 1.05 * bw_ratio


def test_prefill_matches_published_tensorrt_llm_latency_within_a_quarter():
    # TensorRT-LLM: LLaMA-7B, batch 1, A100 FP16: 16 ms for 128 tokens, 133 ms for 2048 tokens.
    p = PerfModel.from_names("mistral-7b", "A100-80G")
    assert p.prefill_s(2048) == pytest.approx(0.133, rel=0.25)
    assert p.prefill_s(128) == pytest.approx(0.016, rel=0.4)


def test_kv_bytes_per_token_match_the_model_shapes():
    assert hw.MODELS["mistral-7b"].kv_bytes_per_token == 128 * 1024
    assert hw.MODELS["llama-2-13b"].kv_bytes_per_token == 800 * 1024
    assert hw.MODELS["llama-3-70b"].kv_bytes_per_token == 320 * 1024


def test_cold_load_is_slower_than_warm_load():
    p = PerfModel.from_names("mistral-7b", "A10")
    assert p.load_s(warm=False) > 5 * p.load_s(warm=True)
    # vLLM reports 30-100 s per full reload; sleep-mode wake-ups take 0.1-6 s.
    assert 15 <= p.load_s(warm=False) <= 100
    assert 0.1 <= p.load_s(warm=True) <= 6


def test_70b_needs_tensor_parallelism_and_a_model_too_big_is_refused():
    m70 = hw.MODELS["llama-3-70b"]
    assert required_tp(m70, hw.GPUS["A100-80G"]) >= 2
    with pytest.raises(ValueError, match="does not fit"):
        PerfModel(m70, hw.GPUS["A100-80G"], tp=1)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: .*A10"):
        PerfModel.from_names("mistral-7b", "V100")
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        PerfModel.from_names("gpt-5", "A10")
