"""`python -m hotswap_engine.agent`: serve the agent's HTTP API until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from hotswap_engine.agent.api import build_app
from hotswap_engine.agent.config import AgentConfig, parse_args
from hotswap_engine.agent.runner import UpdateRunner
from hotswap_engine.agent.service import AgentService

log = logging.getLogger("hotswap_engine.agent")


async def serve(cfg: AgentConfig) -> None:
    service = AgentService(cfg, UpdateRunner(cfg))
    runner = web.AppRunner(build_app(service, cfg.token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    log.info("agent of pod %s listening on %s:%d", cfg.pod_name, cfg.host, cfg.port)
    await service.recover()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await service.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
