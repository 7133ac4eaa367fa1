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


@pytest.mark.parametrize(
    "ref",
    hw.GPU_REFERENCES,
    ids=lambda r: f"{r.model}-{r.gpu}-tp{r.tp}-{r.kind}-b{r.batch}-{r.tokens}",
)
def test_gpu_step_times_are_within_a_fifth_of_their_published_figures(ref):
    p = PerfModel.from_names(ref.model, ref.gpu, ref.tp)
    if ref.kind == "prefill":
        got = p.prefill_s(ref.tokens)
    else:
        got = p.decode_step_s(ref.batch, ref.batch * ref.tokens)
    assert got == pytest.approx(ref.seconds, rel=0.20), ref.source


@pytest.mark.parametrize("model,gpu", [("mistral-7b", "A10"), ("llama-2-13b", "A100-80G")])
def test_step_time_is_monotone_in_sequences_context_and_chunk(model, gpu):
    p = PerfModel.from_names(model, gpu)
    by_batch = [p.step_s(b, b * 1000) for b in (1, 2, 8, 32, 128)]
    assert by_batch == sorted(by_batch) and by_batch[0] < by_batch[-1]
    by_ctx = [p.step_s(16, 16 * c) for c in (16, 256, 1024, 4096)]
    assert by_ctx == sorted(by_ctx) and by_ctx[0] < by_ctx[-1]
    by_chunk = [p.step_s(16, 16 * 512, [(c, 0)]) for c in (16, 256, 1024, 2048)]
    assert by_chunk == sorted(by_chunk) and by_chunk[0] < by_chunk[-1]


def test_a_prompt_chunk_slows_the_decodes_sharing_its_step_more_the_bigger_it_is():
    p = PerfModel.from_names("mistral-7b", "A100-80G")
    alone = p.step_s(32, 32 * 1000)
    added = [p.step_s(32, 32 * 1000, [(c, 0)]) - alone for c in (64, 512, 2048)]
    assert 0 < added[0] < added[1] < added[2]
    # A long prompt's chunk is compute bound: it costs the 32 decodes several decode steps.
    assert added[2] > 5 * alone


def test_a_later_chunk_of_a_prompt_costs_more_than_the_first_for_its_attention():
    p = PerfModel.from_names("llama-7b", "A100-80G")
    assert p.step_s(0, 0, [(2048, 6144)]) > p.step_s(0, 0, [(2048, 0)])


def test_cpu_only_costs_live_in_the_cpu_profile_not_in_the_gpu_defaults():
    gpu = PerfModel.from_names("mistral-7b", "H100").eff
    assert gpu.seq_overhead_s == 0 and gpu.request_overhead_s == 0
    cpu = PerfModel.from_names("tiny-llama", "cpu-2core").eff
    assert cpu.seq_overhead_s > 0 and cpu.request_overhead_s > 0


def test_tensor_parallel_step_pays_all_reduces_that_grow_with_tokens():
    m, g = hw.MODELS["llama-3-70b"], hw.GPUS["A100-80G"]
    p4 = PerfModel(m, g, 4)
    p8 = PerfModel(m, g, 8)
    # More GPUs share the weight reads: a decode step at batch 1 gets faster, not 2x faster.
    assert 0.5 * p4.decode_step_s(1, 100) < p8.decode_step_s(1, 100) < p4.decode_step_s(1, 100)
    assert p4._tp_overhead_s(2048) > p4._tp_overhead_s(1) > 0


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
