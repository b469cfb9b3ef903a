"""Engines as Ray actors (`microserve up --ray`) on a local 3-node Ray cluster (ray.cluster_utils:
each node its own raylet and resources): 1 prefill + 2 decode engines placed by role on three
nodes, KV over NIXL, the router in the `up` process. Greedy outputs token-identical to one engine
with KV bytes moved on every prefill->decode pair; an engine actor killed under load comes back and
re-registers with no request hanging; the admin API starts and stops engine actors under load
with no failed request."""
from __future__ import annotations

import asyncio
import re
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: `pip install -e '.[test]'` (or '.[ray]') installs it")

from conftest import STORIES  # noqa: E402
from test_microserving import metric  # noqa: E402
from test_router import (PROMPTS, STORY, admin, assert_engines_clean, complete, greedy,  # noqa: E402
                         stream)
from microserve.launch import (EngineSpec, LocalLauncher, RayLauncher, StartupError, free_port, spawn,  # noqa: E402
                               stop, wait_healthy)

TOKEN = "test-admin-token"
MIB = 2**20


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """The Ray cluster (head: 1 CPU, {"prefill": 1}; two workers: 2 CPUs, {"decode": 2} each), this
    process connected to it as a second driver, `microserve up --ray` on it, and a local reference
    engine (through the launcher too)."""
    pytest.importorskip("nixl", reason="nixl is not installed (the test extra installs it): KV moves over NIXL here")
    from ray.cluster_utils import Cluster
    tmp = tmp_path_factory.mktemp("ray")
    node = dict(object_store_memory=80 * MIB)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"prefill": 1},
                                                                include_dashboard=False, **node))
    up = ref = None
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"decode": 2}, **node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="microserve", log_to_driver=False)
        local = LocalLauncher(str(tmp), startup_timeout_s=90)
        ref = local.start([EngineSpec(STORIES, args=["--page-size", "4"], name="ref")], wait=False)[0]
        up = spawn("up", ["up", "--ray", cluster.address, "--ray-place-by-role", "--model", STORIES, "--engines", "3",
                          "--prefill", "1", "--strategy", "pd", "--admin-token", TOKEN, "--timeout-s", "10",
                          "--log-dir", str(tmp / "logs"), "--kv-transport", "nixl", "--debug-api", "--page-size", "4",
                          "--num-threads", "1", "--recv-lease-s", "10"], free_port(), str(tmp / "up.log"))
        wait_healthy([up], timeout=120)  # the router answers /health 200 once an engine answered it
        local.wait_healthy()

        async def references():
            return {p: (await complete(ref.url, greedy(p)))[1]["choices"][0]["token_ids"] for p in PROMPTS}
        yield {"url": up.url, "ref": asyncio.run(references()), "log": up.log_path}
    finally:
        if up is not None:
            stop([up], grace=30)
        if ref is not None:
            local.stop()
        ray.shutdown()
        cluster.shutdown()


def state(url: str) -> dict:
    st, s = asyncio.run(admin(url, "/admin/state"))
    assert st == 200, s
    return s


def actor(engine: dict):
    return ray.get_actor(engine["launched"]["actor"], namespace="microserve")


def test_across_nodes_token_identical_with_kv_on_every_pair(up):
    engines = state(up["url"])["engines"]
    assert sorted(e["role"] for e in engines) == ["decode", "decode", "prefill"]
    assert len({e["launched"]["node"] for e in engines}) == 3, engines  # one engine per node
    roles = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    for e in engines:  # placed by role: each on a node that offers its role
        assert e["role"] in roles[e["launched"]["node"]], (e, roles)

    async def go():
        # pd picks the least loaded decode engine: one long request keeps the first one busy, so the
        # others go to the second one as well
        long = asyncio.create_task(complete(up["url"], greedy(STORY, max_tokens=150, ignore_eos=True)))
        while not any(e["running"] for e in (await admin(up["url"], "/admin/state"))[1]["engines"]):
            await asyncio.sleep(0.02)
        for _ in range(2):  # the second round also meets prefix caches
            outs = await asyncio.gather(*(complete(up["url"], greedy(p)) for p in PROMPTS))
            for (st, r), p in zip(outs, PROMPTS):
                assert st == 200, r
                assert r["choices"][0]["token_ids"] == up["ref"][p]
        ids, _, err = await stream(up["url"], greedy(PROMPTS[0]))
        assert err is None and ids == up["ref"][PROMPTS[0]]
        assert (await long)[0] == 200
    asyncio.run(go())
    prefill = [e["url"] for e in engines if e["role"] == "prefill"]
    decode = [e["url"] for e in engines if e["role"] == "decode"]
    sent = metric(prefill[0], "microserve_kv_sent_bytes_total")
    received = [metric(d, "microserve_kv_received_bytes_total") for d in decode]
    assert all(r > 0 for r in received), received  # both pairs prefill -> decode carried KV, across nodes
    assert sent == sum(received)
    assert_engines_clean([e["url"] for e in engines])


def test_engine_actor_killed_under_load_comes_back(up):
    before = state(up["url"])["engines"]
    victim = next(e for e in before if e["role"] == "decode")

    async def go():
        body = {"prompt": STORY, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        jobs = [asyncio.create_task(stream(up["url"], body)) for _ in range(3)]
        jobs += [asyncio.create_task(complete(up["url"], body)) for _ in range(3)]
        await asyncio.sleep(0.5)
        ray.kill(actor(victim), no_restart=False)  # Ray restarts it
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 40)  # none hangs
        for r in results:
            assert not isinstance(r, BaseException), r
            if isinstance(r[0], int):  # a completion (retried elsewhere) or a clear error
                st, b = r
                assert st == 200 or (st >= 500 and "unavailable" in b["error"]["message"]), b
            else:
                ids, text, err = r
                assert err is None or "unavailable" in err["message"] or "engine" in err["message"], err
    asyncio.run(go())
    deadline = time.monotonic() + 60
    while True:  # the restarted actor's engine registered itself with the router at its new URL
        engines = state(up["url"])["engines"]
        back = next(e for e in engines if e["launched"]["name"] == victim["launched"]["name"])
        if back["url"] != victim["url"] and all(e["healthy"] for e in engines):
            break
        assert time.monotonic() < deadline, engines
        time.sleep(0.3)
    assert back["launched"]["restarts"] == 1 and len(engines) == 3

    async def serve():
        for p in PROMPTS:
            st, r = await complete(up["url"], greedy(p))
            assert st == 200 and r["choices"][0]["token_ids"] == up["ref"][p], r
        st, r = await complete(back["url"], greedy(PROMPTS[0]))  # the new engine itself serves
        assert st == 200 and r["choices"][0]["token_ids"] == up["ref"][PROMPTS[0]]
    asyncio.run(serve())
    assert_engines_clean([e["url"] for e in engines])  # accounting back to zero everywhere


def test_scale_up_and_down_through_the_admin_api_under_load(up):
    results: list = []

    async def go():
        stop_load = asyncio.Event()

        async def client(i: int):
            while not stop_load.is_set():
                p = PROMPTS[i % len(PROMPTS)]
                results.append((p, await complete(up["url"], greedy(p))))

        load = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(0.5)
        st, s = await admin(up["url"], "/admin/engines", {"role": "decode", "count": 1})
        assert st == 200, s
        new = [e for e in s["engines"] if e["launched"]["name"] not in names]
        assert len(s["engines"]) == 4 and len(new) == 1 and new[0]["role"] == "decode" and new[0]["healthy"]
        assert ray.get(actor(new[0]).info.remote())["url"] == new[0]["url"]  # a Ray actor runs it
        await asyncio.sleep(2.0)
        st, s = await admin(up["url"], "/admin/engines/remove", {"url": new[0]["url"]})  # drained, then stopped
        assert st == 200, s
        assert [e["launched"]["name"] for e in s["engines"]] == names
        st, s = await admin(up["url"], "/admin/engines/remove", {"role": "decode"})  # one of the first ones too
        assert st == 200 and len(s["engines"]) == 2, s
        await asyncio.sleep(1.0)
        st, s = await admin(up["url"], "/admin/engines", {"role": "decode", "count": 1})  # and back to 3
        assert st == 200 and len(s["engines"]) == 3, s
        await asyncio.sleep(1.0)
        stop_load.set()
        await asyncio.wait_for(asyncio.gather(*load), 30)
        return new[0]

    names = [e["launched"]["name"] for e in state(up["url"])["engines"]]
    removed = asyncio.run(go())
    assert len(results) > 20
    for p, (st, r) in results:  # no failed request, and each one token-identical
        assert st == 200, r
        assert r["choices"][0]["token_ids"] == up["ref"][p]
    deadline = time.monotonic() + 10
    while True:  # its actor is gone
        try:
            actor(removed)
        except ValueError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    engines = state(up["url"])["engines"]
    assert all(e["healthy"] for e in engines)
    assert_engines_clean([e["url"] for e in engines])
    log = open(up["log"]).read()
    assert re.search(r"started 1 decode engine", log) and re.search(r"stopped engine \S+ \(http", log)


def test_a_start_that_cannot_succeed_fails_fast_through_the_python_api(up, tmp_path):
    """RayLauncher from Python, on the same cluster: an engine that exits fails with its own error
    (not retried by Ray), one that no node can take fails after the placement timeout; no actor is left."""
    t0, deployments = time.monotonic(), []
    with RayLauncher(log_dir=str(tmp_path), startup_timeout_s=60) as launcher:
        deployments.append(launcher.deployment)
        with pytest.raises(StartupError, match="no-such-model"):
            launcher.start([EngineSpec(str(tmp_path / "no-such-model"), "decode")])
        assert launcher.engines == []
    with RayLauncher(log_dir=str(tmp_path), startup_timeout_s=2) as launcher:
        deployments.append(launcher.deployment)
        with pytest.raises(StartupError, match="no Ray node took"):
            launcher.start([EngineSpec(STORIES, resources={"no-such-resource": 1})])
        assert launcher.engines == []
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while [a for a in ray.util.list_named_actors(all_namespaces=True)
           if any(a["name"].startswith(f"microserve-{d}-") for d in deployments)]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
