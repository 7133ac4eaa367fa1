"""vLLM-style prefix cache: freed blocks stay reusable until overwritten, oldest freed first."""

from test_sim import make_perf, make_request, run

from qlm_backend.engine.hardware import KV_BLOCK_TOKENS
from qlm_backend.engine.prefix_cache import PrefixCache, hit_tokens
from qlm_backend.engine.sim import SimEngine

B = KV_BLOCK_TOKENS


def test_cache_overwrites_the_oldest_entry_first_and_its_tail_first() -> None:
    c = PrefixCache()
    c.put("old", 4)
    c.put("new", 3)
    # The pool now has 5 free blocks: 2 of the 7 cached ones were handed out, both from "old".
    assert c.trim_to(5) == 2
    assert (c.peek("old"), c.peek("new"), c.total) == (2, 3, 5)
    assert c.trim_to(1) == 4  # "old" gone, then "new" loses its tail
    assert (c.peek("old"), c.peek("new"), len(c)) == (0, 1, 1)
    assert c.take("new") == 1 and c.total == 0


def test_hits_are_whole_blocks_and_leave_the_last_token_to_compute() -> None:
    assert hit_tokens(10, 5 * B) == 4 * B  # the last token needs its logits
    assert hit_tokens(2, 5 * B + 3) == 2 * B
    assert hit_tokens(3, 1) == 0


def _first_token_after_resume(eng: SimEngine, other_prompt: int) -> tuple[float, int]:
    """Run a request until its first token, abort it, optionally run another request of
    `other_prompt` tokens, then add it back (prompt + 1 token) and time its first token."""
    eng.add(make_request("r", prompt=4000, out=50), 0.0)
    run(eng, until=0.5)
    assert eng.has_request("r")
    eng.abort("r", 0.5)
    t = 0.5
    if other_prompt:
        eng.add(make_request("o", prompt=other_prompt, out=1), t)
        t = max(ev.time_s for ev in run(eng))
    hits_before = eng.stats.prefix_hit_tokens
    eng.add(make_request("r", prompt=4001, out=5), t)
    ev = run(eng)
    first = min(e.time_s for e in ev if e.request_id == "r")
    return first - t, eng.stats.prefix_hit_tokens - hits_before


def test_an_aborted_request_added_again_recomputes_only_what_the_cache_lost() -> None:
    cached_ttft, cached_hit = _first_token_after_resume(SimEngine(make_perf(kv_tokens=8192)), 0)
    assert cached_hit == 4000 // B * B  # every full block of its prompt was still there
    # Another request took most of the pool meanwhile: the resumed one lost its tail blocks.
    lost_ttft, lost_hit = _first_token_after_resume(SimEngine(make_perf(kv_tokens=8192)), 6000)
    assert 0 <= lost_hit < cached_hit
    assert cached_ttft < lost_ttft
    # Without prefix caching the whole context is computed again.
    eng = SimEngine(make_perf(kv_tokens=8192), prefix_caching=False)
    off_ttft, off_hit = _first_token_after_resume(eng, 0)
    assert off_hit == 0 and off_ttft > cached_ttft


def test_a_recompute_preemption_is_readmitted_from_the_cache() -> None:
    # Two requests whose decodes outgrow a small KV cache: the later one is preempted, and its
    # blocks (still cached, nothing else allocated them) are found again on re-admission.
    eng = SimEngine(make_perf(kv_tokens=64 * B), max_num_batched_tokens=8192)
    eng.add(make_request("a", prompt=30 * B, out=3 * B), 0.0)
    eng.add(make_request("b", prompt=30 * B, out=3 * B), 0.0)
    ev = run(eng)
    assert eng.stats.preemptions >= 1
    assert eng.stats.prefix_hit_tokens > 0
    assert {e.request_id for e in ev if e.finished} == {"a", "b"}
    assert eng.free_blocks == eng.total_blocks
