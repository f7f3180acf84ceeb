"""`python -m hotswap_engine.agent`: serve the agent's HTTP API until SIGTERM.

Settings: `hotswap_engine.agent.settings` (flags and `HOTSWAP_AGENT_*`; table in docs/settings.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web
from pydantic import ValidationError
from pydantic_settings import SettingsError

from hotswap_engine.agent.api import build_app
from hotswap_engine.agent.runner import UpdateRunner
from hotswap_engine.agent.service import AgentService
from hotswap_engine.agent.settings import AgentSettings, describe, load

log = logging.getLogger("hotswap_engine.agent")

# How long the HTTP server waits for open requests once SIGTERM came (aiohttp's default is 60 s).
# Status long-polls answer at once then; a request still running after this is cancelled. Far below
# the pod's termination grace period, so the agent exits on SIGTERM, not on the kubelet's SIGKILL.
SHUTDOWN_TIMEOUT_S = 3.0


async def serve(cfg: AgentSettings) -> None:
    service = AgentService(cfg, UpdateRunner(cfg))
    runner = web.AppRunner(
        build_app(service, cfg.bearer_token), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
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
    service.begin_shutdown()
    await runner.cleanup()
    await service.close()


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load(argv)
    except (ValidationError, SettingsError) as e:
        sys.exit(f"python -m hotswap_engine.agent: invalid settings: {describe(e)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
