"""The engine in-process on real weights (stories260K): chunked prefill and prefix hits change
nothing, preemption and abort keep KV accounting exact, sampling options do what they say, and the
prefix tree evicts, locks and peeks as documented."""
from __future__ import annotations

import pickle
import random
from collections import defaultdict

import pytest
import torch

from conftest import STORIES, STORY_END
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.errors import ServeError
from microserve.kv.radix import PrefixTree, evict_by_scan

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high. Lily's mom "
         "said, \"Lily, let's go to the park.\" Lily was sad. She did not know what to do. Then, she had "
         "an idea. She went to the tree and climbed up to get the ball.")
PROMPTS = ["Once upon a time", "Tom had a red ball", "The sun was", "Lily and Ben went to the park. They saw",
           "One day, a little bird", "The cat", "Sue liked to draw. She drew a big house and", "Max was a dog"]


def make_engine(**kw) -> Engine:
    kw.setdefault("num_pages", 64)
    return Engine(EngineConfig(model=STORIES, kv_transport="none", **kw))


@pytest.fixture(scope="module")
def tok():
    e = make_engine(num_pages=4)
    yield e.tokenizer
    e.close()


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Keep a copy of the logits each request is sampled from (the engine still computes them)."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    run = engine.runner.run

    def recording_run(batch):
        logits, reqs, sent = run(batch)
        for i, r in enumerate(reqs):
            seen[r.rid].append(logits[i].clone())
        return logits, reqs, sent
    engine.runner.run = recording_run
    return seen


def drain(engine: Engine, max_steps: int = 5000) -> dict[str, list]:
    """Step until idle (failing, not hanging, if it never gets there). Returns outputs by request."""
    outs: dict[str, list] = defaultdict(list)
    for _ in range(max_steps):
        if not engine.has_work():
            return outs
        for o in engine.step():
            outs[o.rid].append(o)
    raise AssertionError(f"engine still busy after {max_steps} steps: deadlock or livelock")


def assert_kv_clean(engine: Engine) -> dict:
    a = engine.cache.check()  # free + cached + owned == total
    assert a["owned"] == 0 and a["live_seqs"] == 0 and a["free"] + a["cached"] == a["total"], a
    assert a["evictable"] == a["cached"], a  # nothing holds a lock any more
    return a


def generate(engine: Engine, prompt: list[int], rid: str = "r", **params):
    params.setdefault("temperature", 0.0)
    req = engine.add_request(rid, prompt, SamplingParams(**params))
    outs = drain(engine)[rid]
    assert outs[-1].finished
    return req, outs


def greedy(params: dict | None = None) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, **(params or {})})


# ---- chunked prefill and prefix hits ------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tok):
    """Whole prefill, no prefix cache: the tokens and sampled logits of STORY."""
    e = make_engine(enable_prefix_caching=False)
    logits = record_logits(e)
    prompt = tok.encode(STORY)
    assert len(prompt) > 90
    req, _ = generate(e, prompt, max_tokens=24, ignore_eos=True)
    assert e.stats.steps == 24  # one prefill step, then 23 decodes
    return prompt, req.output_ids, torch.stack(logits["r"])


# Within 1e-5 in torch's sense (|a - b| <= 1e-5 + 1e-5 * |b|): stories260K's logits reach ~22, where
# one fp32 ulp is 1.9e-6 and a different GEMM shape (a 7-token chunk instead of the whole prompt)
# alone moves them by ~1.4e-5. Any real error (a wrong mask, position or slot) moves them by 1e-2 or more.
def assert_same(ref, ids, logits):
    _, ref_ids, ref_logits = ref
    assert ids == ref_ids
    assert len(logits) == len(ref_logits)
    torch.testing.assert_close(torch.stack(logits), ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 16, 33])
def test_chunked_prefill_matches_whole_prefill(reference, chunk):
    prompt = reference[0]
    e = make_engine(max_num_batched_tokens=chunk, enable_prefix_caching=False)
    logits = record_logits(e)
    req, _ = generate(e, prompt, max_tokens=24, ignore_eos=True)
    assert e.stats.steps == -(-len(prompt) // chunk) + 23  # the prompt really went in chunks
    assert_same(reference, req.output_ids, logits["r"])
    assert_kv_clean(e)


@pytest.mark.parametrize("chunk", [2048, 16, 7])
def test_prefix_hit_matches_miss(reference, tok, chunk):
    prompt = reference[0]
    e = make_engine(max_num_batched_tokens=chunk)
    logits = record_logits(e)
    # Warm the cache with a request sharing only the first 64 tokens, then one with the whole story.
    generate(e, prompt[:64] + tok.encode("The end.", add_special_tokens=False), rid="warm", max_tokens=4)
    assert e.cache.peek(prompt) == 64
    req, outs = generate(e, prompt, max_tokens=24, ignore_eos=True)
    assert req.num_cached_tokens == 64 and outs[-1].num_cached_tokens == 64
    assert_same(reference, req.output_ids, logits["r"])
    assert_kv_clean(e)
    # The same prompt again hits everything cached (its own output included) but the last token.
    logits.clear()
    req, _ = generate(e, prompt, rid="again", max_tokens=24, ignore_eos=True)
    assert req.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert_same(reference, req.output_ids, logits["again"])
    assert_kv_clean(e)


def test_prefix_match_never_covers_the_whole_prompt(tok):
    e = make_engine()
    prompt = tok.encode(STORY)[:48]  # exactly three pages
    first, _ = generate(e, prompt, max_tokens=8)
    assert e.cache.peek(prompt) == 48 and e.match(prompt) == 32
    again, _ = generate(e, prompt, rid="again", max_tokens=8)
    assert again.num_cached_tokens == 32  # the last page is recomputed into a private page
    assert again.output_ids == first.output_ids
    assert_kv_clean(e)


# ---- preemption and abort --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preemption_cases(tok):
    """Five requests and what each yields alone on a roomy engine."""
    cases = [(f"r{i}", tok.encode(p), greedy({"max_tokens": 20 + 9 * i, "ignore_eos": i % 2 == 0}))
             for i, p in enumerate(PROMPTS[:5])]
    e = make_engine(num_pages=64)
    expected = {}
    for rid, prompt, params in cases:
        req, _ = generate(e, prompt, rid=rid, **vars(params))
        expected[rid] = req.output_ids
    return cases, expected


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_by_recompute_under_a_tiny_pool(preemption_cases, prefix_caching):
    cases, expected = preemption_cases
    # 5 pages of 16 tokens for five requests that grow to 30-65 tokens each
    e = make_engine(num_pages=5, max_num_batched_tokens=64, enable_prefix_caching=prefix_caching)
    for rid, prompt, params in cases:
        e.add_request(rid, prompt, params)
    outs = drain(e)
    assert e.scheduler.num_preemptions > 0, "the pool was big enough: nothing was preempted"
    for rid, _, _ in cases:
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason in ("stop", "length")
        assert [t for o in outs[rid] for t in o.new_token_ids] == expected[rid], rid
    assert_kv_clean(e)


def test_abort_frees_everything_at_once(tok):
    e = make_engine(num_pages=16, max_num_batched_tokens=40, max_num_seqs=4)
    prompts = [tok.encode(STORY)] + [tok.encode(p) for p in PROMPTS]
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, greedy({"max_tokens": 100}))
    for _ in range(6):  # mid chunked prefill for some, decoding for others, still waiting for the rest
        e.step()
    assert e.scheduler.running and e.scheduler.waiting
    assert e.cache.accounting()["owned"] > 0
    for i in range(len(prompts)):
        assert e.abort(f"r{i}")
    assert not e.has_work() and not e.requests
    assert_kv_clean(e)
    assert not e.abort("r0") and not e.abort("never-seen")
    # and it keeps serving, with the same result as a fresh engine
    req, _ = generate(e, tok.encode(PROMPTS[0]), rid="after", max_tokens=20)
    fresh, _ = generate(make_engine(), tok.encode(PROMPTS[0]), rid="after", max_tokens=20)
    assert req.output_ids == fresh.output_ids
    assert_kv_clean(e)


# ---- sampling -------------------------------------------------------------------------------------
def test_same_seed_same_output_whatever_the_batch(tok):
    e = make_engine()
    prompt = tok.encode(PROMPTS[1])
    params = dict(max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone, _ = generate(e, prompt, rid="a", **params)
    again, _ = generate(e, prompt, rid="b", **params)
    assert alone.output_ids == again.output_ids
    # now inside a batch of other sampled requests
    for i, p in enumerate(PROMPTS[2:6]):
        e.add_request(f"other{i}", tok.encode(p), SamplingParams(max_tokens=30, temperature=1.0))
    batched = e.add_request("c", prompt, SamplingParams(**params))
    drain(e)
    assert batched.output_ids == alone.output_ids
    other, _ = generate(e, prompt, rid="d", **{**params, "seed": 99})
    assert other.output_ids != alone.output_ids
    greedy_ids, _ = generate(e, prompt, rid="g", max_tokens=40, temperature=0.0, ignore_eos=True)
    assert alone.output_ids != greedy_ids.output_ids  # it really sampled
    assert_kv_clean(e)


def test_tiny_temperature_is_greedy_and_fails_nobody(tok):
    """Logits / 1e-45 overflow to inf: such a request once failed the whole step, and with it every
    request in the batch."""
    e = make_engine()
    prompt = tok.encode(PROMPTS[0])
    ref, _ = generate(e, prompt, rid="ref", max_tokens=12)
    for i, t in enumerate((1e-45, 1e-30, 1e-6)):
        e.add_request(f"tiny{i}", prompt, SamplingParams(max_tokens=12, temperature=t, seed=i))
    bystander = e.add_request("other", tok.encode(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=1.0))
    outs = drain(e)
    for i in range(3):
        assert outs[f"tiny{i}"][-1].finish_reason == "length"
        assert [t for o in outs[f"tiny{i}"] for t in o.new_token_ids] == ref.output_ids
    assert bystander.finish_reason == "length" and bystander.error is None
    assert_kv_clean(e)


def test_stop_strings_cut_the_text(tok):
    e = make_engine()
    prompt = tok.encode("Once upon a time")
    full, _ = generate(e, prompt, rid="full", max_tokens=40)
    assert full.text.startswith(", there was a little girl named Lily. She loved")
    # "named Lily" spans several tokens; the earliest of several stop strings wins, whatever the order
    req, outs = generate(e, prompt, rid="s", max_tokens=40, stop=["loved", "named Lily"])
    assert req.finish_reason == "stop" and outs[-1].finish_reason == "stop"
    streamed = "".join(o.text for o in outs)
    assert streamed == req.text == ", there was a little girl "
    assert len(req.output_ids) < 40
    req, outs = generate(e, prompt, rid="s2", max_tokens=40, stop=["park"])
    assert "".join(o.text for o in outs) == full.text[:full.text.index("park")]
    assert_kv_clean(e)


def test_stop_token_ids_and_max_tokens(tok):
    e = make_engine()
    prompt = tok.encode("Once upon a time")
    full, _ = generate(e, prompt, rid="full", max_tokens=30, ignore_eos=True)
    assert full.finish_reason == "length" and len(full.output_ids) == 30
    stop_tok = full.output_ids[6]
    k = full.output_ids.index(stop_tok)
    req, outs = generate(e, prompt, rid="s", max_tokens=30, stop_token_ids=[stop_tok])
    assert req.finish_reason == "stop" and req.output_ids == full.output_ids[:k + 1]
    assert outs[-1].num_output_tokens == k + 1
    for n in (1, 2, 17):
        req, outs = generate(e, prompt, rid=f"m{n}", max_tokens=n)
        assert req.finish_reason == "length" and req.output_ids == full.output_ids[:n]
        assert sum(len(o.new_token_ids) for o in outs) == n and outs[-1].num_output_tokens == n
    assert_kv_clean(e)


def test_stories_stops_on_bos_and_ignore_eos_runs_on(tok):
    e = make_engine()
    prompt = tok.encode(STORY_END)
    assert e.eos_ids == {1, 2}
    req, outs = generate(e, prompt, rid="eos", max_tokens=100)
    assert req.finish_reason == "stop" and outs[-1].finish_reason == "stop"
    assert req.output_ids[-1] == 1 and 1 not in req.output_ids[:-1]
    n = len(req.output_ids)
    assert n < 100 and req.text.endswith("They played together every day.")
    # the text is the detokenized output, without the stop token
    assert "".join(o.text for o in outs) == tok.decode(req.token_ids)[len(tok.decode(prompt)):]
    on, _ = generate(e, prompt, rid="on", max_tokens=n + 10, ignore_eos=True)
    assert on.finish_reason == "length" and len(on.output_ids) == n + 10
    assert on.output_ids[:n] == req.output_ids
    assert_kv_clean(e)


def test_invalid_sampling_and_prompts_are_rejected(tok):
    e = make_engine()
    ok = tok.encode("The cat")
    for prompt, params in [([], {}), ([600], {}), (ok, {"max_tokens": 0}), (ok, {"temperature": -1}),
                           (ok, {"temperature": float("nan")}), (ok, {"temperature": float("inf")}),
                           (ok, {"seed": 2**64}), (ok, {"seed": -2**63 - 1}),
                           (ok, {"top_p": 0.0}), (ok, {"top_p": 1.5}), ([5] * e.max_model_len, {"max_tokens": 1})]:
        with pytest.raises(ServeError) as ei:
            e.add_request("bad", prompt, SamplingParams(**params))
        assert ei.value.status == 400
    assert not e.has_work() and not e.requests
    assert_kv_clean(e)


def test_max_tokens_beyond_context_stops_at_max_model_len(tok):
    """As vLLM: a prompt that fits with max_tokens past the context is served and ends at
    max_model_len with finish_reason "length"; only a prompt leaving no room is refused."""
    e = make_engine(max_model_len=40, page_size=4)
    prompt = tok.encode(PROMPTS[3])
    req, outs = generate(e, prompt, max_tokens=10_000, ignore_eos=True)
    assert req.finish_reason == "length" and outs[-1].finish_reason == "length"
    assert len(req.token_ids) == e.max_model_len == 40
    assert outs[-1].num_output_tokens == len(req.output_ids) == 40 - len(prompt)
    assert req.params.max_tokens == 40 - len(prompt)  # clamped up front, as the router does
    exact, _ = generate(e, prompt, rid="exact", max_tokens=40 - len(prompt), ignore_eos=True)
    assert exact.output_ids == req.output_ids
    last, _ = generate(e, prompt + req.output_ids[:40 - len(prompt) - 1], rid="last", max_tokens=5, ignore_eos=True)
    assert last.output_ids == req.output_ids[-1:]  # a prompt of max_model_len - 1 tokens gets one
    with pytest.raises(ServeError) as ei:
        e.add_request("full", req.token_ids, SamplingParams(max_tokens=1))
    assert (ei.value.status, ei.value.param, ei.value.code) == (400, "prompt", "context_length_exceeded")
    assert_kv_clean(e)


# ---- the prefix tree ------------------------------------------------------------------------------
def toks(*pages: int, ps: int = 4) -> list[int]:
    """Token ids spelling the given page labels (page label p -> ps tokens p*100, p*100+1, ...)."""
    return [p * 100 + i for p in pages for i in range(ps)]


def evictable_count(tree: PrefixTree) -> int:
    out, stack = 0, list(tree.root.children.values())
    while stack:
        n = stack.pop()
        out += n.lock == 0
        stack.extend(n.children.values())
    return out


def test_radix_lru_evicts_unlocked_leaves_only():
    t = PrefixTree(4)
    path_a, _ = t.insert(toks(1, 2, 3), [10, 11, 12])  # 1-2-3
    path_b, _ = t.insert(toks(1, 5), [10, 15])  # 1-5 (shares page 10)
    path_c, _ = t.insert(toks(7, 8), [17, 18])  # 7-8
    assert t.num_nodes == 6 and t.num_evictable == 6 == evictable_count(t)
    t.match(toks(7, 8))
    t.match(toks(1, 2, 3))  # most recent; 1-5 is now the least recently used branch
    # Leaves first, LRU first: page 15 (leaf of 1-5), then 18 (leaf of 7-8), then 17 (7, now a leaf).
    assert t.evict(1) == [15]
    assert t.evict(2) == [18, 17]
    assert t.num_nodes == 3 and t.pages() == {10, 11, 12}
    # a locked path is never evicted, however old; asking for more than is evictable takes what is
    t.lock(path_a[-1])
    assert t.num_evictable == 0 == evictable_count(t)
    assert t.evict(5) == []
    t.unlock(path_a[-1])
    assert t.num_evictable == 3
    assert t.evict(5) == [12, 11, 10]  # deepest first: a prefix outlives what extends it
    assert t.num_nodes == 0 and t.num_evictable == 0 and t.peek(toks(1, 2, 3)) == 0


@pytest.mark.parametrize("seed", range(6))
def test_radix_kept_heap_evicts_exactly_as_a_full_scan(seed):
    """Random inserts, matches, locks, unlocks and evictions: every eviction takes the same pages,
    in the same order, as a full scan of the leaves would (on a copy of the tree at that moment)."""
    rnd = random.Random(seed)
    t, held, next_page = PrefixTree(4), [], 0
    for _ in range(400):
        op = rnd.random()
        labels = [rnd.randint(1, 4) for _ in range(rnd.randint(1, 4))]
        if op < 0.35:
            pages = list(range(next_page, next_page + len(labels)))
            next_page += len(labels)
            path, _ = t.insert(toks(*labels), pages)
            if rnd.random() < 0.5:
                t.lock(path[-1])
                held.append(path[-1])
        elif op < 0.55:
            path = t.match(toks(*labels))
            if path and rnd.random() < 0.3:
                t.lock(path[-1])
                held.append(path[-1])
        elif op < 0.75 and held:
            t.unlock(held.pop(rnd.randrange(len(held))))
        else:
            n = rnd.randint(1, 6)
            copy = pickle.loads(pickle.dumps(t))  # ids differ in the copy; last_access never ties between leaves
            assert t.evict(n) == evict_by_scan(copy, n)
            assert t.pages() == copy.pages()
        assert t.num_evictable == evictable_count(t)


def test_radix_lock_counts():
    t = PrefixTree(4)
    path, _ = t.insert(toks(1, 2, 3), [10, 11, 12])
    other, _ = t.insert(toks(1, 4), [10, 14])
    t.lock(path[-1])
    t.lock(path[-1])
    t.lock(other[-1])
    assert [n.lock for n in path] == [3, 2, 2] and other[-1].lock == 1
    assert t.num_evictable == 0
    t.unlock(path[-1])
    assert [n.lock for n in path] == [2, 1, 1] and t.num_evictable == 0
    t.unlock(path[-1])
    assert [n.lock for n in path] == [1, 0, 0] and t.num_evictable == 2 == evictable_count(t)
    assert sorted(t.evict(10)) == [11, 12]  # page 10 is held by the other branch's lock
    t.unlock(other[-1])
    assert t.num_evictable == 2 == evictable_count(t)
    with pytest.raises(AssertionError):
        t.unlock(other[-1])


def test_radix_peek_is_read_only():
    t = PrefixTree(4)
    t.insert(toks(1, 2, 3), [10, 11, 12])
    t.insert(toks(1, 5), [10, 15])
    t.match(toks(1, 5))  # 1-5 recent, 1-2-3 old

    def snapshot():
        out, stack = [], [t.root]
        while stack:
            n = stack.pop()
            out.append((n.key, n.page, n.lock, n.last_access, tuple(n.children)))
            stack.extend(n.children.values())
        return sorted(out, key=repr), t.num_nodes, t.num_evictable

    before = snapshot()
    assert t.peek(toks(1, 2, 3)) == 12
    assert t.peek(toks(1, 2) + [201, 202]) == 8  # a partial page is never a hit
    assert t.peek(toks(1, 2, 3) + [300]) == 12
    assert t.peek(toks(1, 2)[:-1]) == 4
    assert t.peek(toks(9)) == 0 and t.peek([]) == 0
    assert snapshot() == before
    assert t.evict(1) == [12]  # peeking 1-2-3 did not make it recent


def test_kv_cache_publish_and_release_keep_accounting(tok):
    """Two sequences computing the same pages: the second's duplicates stay private and are freed."""
    e = make_engine(num_pages=12)
    c = e.cache
    prompt = tok.encode(STORY)[:40]
    seqs = [c.match(prompt, 39) for _ in range(2)]
    for s in seqs:
        assert s.cached_len == 0 and c.allocate(s, 40)
    assert c.check()["owned"] == 6
    c.publish(seqs[0], prompt, 40)
    c.publish(seqs[1], prompt, 40)  # same tokens, other pages: duplicates, still owned by seqs[1]
    a = c.check()
    assert a["cached"] == 2 and a["owned"] == 4 and a["evictable"] == 0
    assert c.peek(prompt) == 32
    for s in seqs:
        c.release(s)
    a = assert_kv_clean(e)
    assert a["cached"] == 2 and a["free"] == 10
    # a request too big for free pages alone evicts the cached ones
    s = c.match(tok.encode("Max was a dog"), 3)
    assert c.allocate(s, 12 * 16) and c.check()["cached"] == 0
    assert not c.allocate(s, 12 * 16 + 1)
    c.release(s)
    assert assert_kv_clean(e)["free"] == 12
