"""A stand-in for the inference container without vLLM: the launcher's control socket in front of
one plain receiver per tensor-parallel rank, each owning preallocated parameters on its device.

    python -m hotswap_testing.plain_launcher --control-socket S --base CKPT --tp 2 --device cuda

Same protocol as `vllm_launcher` (its `ControlServer`: `POST /apply`, `GET /healthz`, paused after a
failed apply until a successful one), so the real agent drives it unchanged. `PlainEngine` offers the
weight-transfer lifecycle the way vLLM 0.26 does (no weight version): on update_weights every rank r
connects a `HandoffReceiver` to the endpoint with `{rank}` → r (device cuda:r, or cpu), fills its
parameters (poisoned first, so a chunk that never arrives cannot pass a check) and says done.
With `digests` each rank fingerprints its parameters as received (`received`, as vLLM's workers do);
`collective_rpc("hotswap_checksums")` answers sha256 per rank and parameter, like the worker
extension's fallback for vLLM's compute_weight_checksums. One more route for tests:
`GET /verify?checkpoint=PATH` compares every rank's parameters byte for byte with a checkpoint:
`{"ok": bool, "mismatched": {rank: [names]}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from hotswap_engine.digest import fingerprint
from hotswap_engine.handoff import HandoffReceiver
from hotswap_engine.inference.vllm_launcher import ControlServer

from hotswap_testing.plain_receiver import POISON, allocate, flat_bytes, load_expected, receive, verify

log = logging.getLogger("hotswap_testing.plain_launcher")


class PlainEngine:
    """The part of vLLM's engine client the control server uses, over plain receivers."""

    def __init__(self, base: Path, tp: int, device: str) -> None:
        self.devices = [
            torch.device(f"cuda:{r}") if device == "cuda" else torch.device("cpu") for r in range(tp)
        ]
        self.params = [allocate(base, d) for d in self.devices]
        self.paused = False
        self.applies = 0
        self.session = False
        self.reports: list[dict[str, Any]] = []

    async def check_health(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return self.paused

    async def pause_generation(self, mode: str = "keep", clear_cache: bool = True) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    # vLLM's weight-transfer lifecycle as the launcher calls it (vLLM 0.26's signatures).
    async def init_weight_transfer_engine(self, request: Any) -> None:
        self.session = False

    async def start_weight_update(self) -> None:
        if self.session:
            raise RuntimeError("start_weight_update called while a weight update is already active")
        self.session = True
        self.reports = []

    async def update_weights(self, request: Any) -> None:
        info = request.update_info
        try:
            self.reports = await asyncio.to_thread(
                self._apply_all,
                str(info["endpoint"]),
                str(info["version"]),
                float(info["timeout"]),
                bool(info.get("digests", False)),
            )
        except BaseException:
            self.session = False  # as vLLM's worker: a failed update_weights ends the session
            raise

    async def finish_weight_update(self) -> None:
        if not self.session:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update")
        self.session = False

    async def collective_rpc(self, method: str, timeout: float | None = None) -> list[dict[str, Any]]:
        if method == "hotswap_checksums":
            return await asyncio.to_thread(self._checksums)
        assert method == "hotswap_report", method
        return self.reports

    def _checksums(self) -> list[dict[str, Any]]:
        return [
            {
                f"tp{rank}:{name}": hashlib.sha256(flat_bytes(t).cpu().numpy().data).hexdigest()
                for name, t in params.items()
            }
            for rank, params in enumerate(self.params)
        ]

    def _apply_all(
        self, endpoint: str, version: str, timeout: float, digests: bool = False
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(self.devices)

        def one(rank: int) -> None:
            try:
                results[rank] = self._apply(
                    rank, endpoint.replace("{rank}", str(rank)), version, timeout, digests
                )
            except BaseException as e:  # reported below
                results[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in range(len(self.devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [
            f"rank {r}: {type(e).__name__}: {e}"
            for r, e in enumerate(results)
            if isinstance(e, BaseException)
        ]
        if errors:
            raise RuntimeError("; ".join(errors))
        self.applies += 1
        return [r for r in results if isinstance(r, dict)]

    def _apply(
        self, rank: int, endpoint: str, version: str, timeout: float, digests: bool = False
    ) -> dict[str, Any]:
        device = self.devices[rank]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        params = self.params[rank]
        for t in params.values():
            flat_bytes(t).fill_(POISON)
        t0 = time.perf_counter()
        with HandoffReceiver(endpoint, rank, device, timeout=timeout) as rx:
            try:
                got, nbytes, touched = receive(rx, params)
                if got != version:
                    raise ValueError(f"the sender offers {got}, asked for {version}")
                missing = sorted(set(params) - touched)
                if missing:
                    raise ValueError(f"no bytes arrived for {missing[:10]}")
            except Exception as e:
                rx.fail(f"{type(e).__name__}: {e}")
                raise
            rx.done()
        report: dict[str, Any] = {
            "rank": rank,
            "version": version,
            "tensors": len(touched),
            "bytes": nbytes,
            "seconds": time.perf_counter() - t0,
        }
        if digests:
            report["received"] = {name: fingerprint(t) for name, t in params.items()}
        return report

    def verify(self, checkpoint: Path) -> dict[str, Any]:
        mismatched: dict[str, list[str]] = {}
        for rank, (device, params) in enumerate(zip(self.devices, self.params, strict=True)):
            bad = verify(params, load_expected(checkpoint, device))
            if bad:
                mismatched[str(rank)] = bad[:20]
        return {"ok": not mismatched, "mismatched": mismatched, "applies": self.applies}


class PlainControlServer(ControlServer):
    engine: PlainEngine

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/verify", self.handle_verify)
        return app

    async def handle_verify(self, request: web.Request) -> web.Response:
        checkpoint = Path(request.query["checkpoint"])
        if self._lock.locked():
            return web.json_response({"ok": False, "error": "an apply is running"}, status=409)
        return web.json_response(await asyncio.to_thread(self.engine.verify, checkpoint))


async def serve(args: argparse.Namespace) -> None:
    engine = PlainEngine(args.base, args.tp, args.device)
    server = PlainControlServer(engine, str(args.control_socket))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("plain launcher: %d ranks on %s, control socket %s", args.tp, args.device, args.control_socket)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--control-socket", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True, help="checkpoint whose headers shape the parameters")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s plain-launcher: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
