"""The SBC process: configuration, SIP transports, transactions, management.

``SbcNode`` wires the pieces together on one asyncio loop: the transport layer
hands parsed messages to the transaction layer, whose events go to the
transaction user (today the LocalResponder); the transaction layer's outputs go
back to the transport layer and its next deadline becomes one loop timer.

Signals: SIGTERM and SIGINT stop gracefully; SIGHUP reloads the configuration
file. A file that does not load is refused with its problems logged, and the
running configuration stays in force; so does the old one when the new
listeners cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from pathlib import Path

from aiohttp import web

from sbc.b2bua.local import LocalResponder
from sbc.cli import setup_logging
from sbc.config.loader import ConfigError, default_config, load_config
from sbc.config.schema import Config
from sbc.sip.message import Request, Response, make_response
from sbc.sip.transaction import (
    CancelReceived,
    Output,
    RequestReceived,
    TransactionLayer,
)
from sbc.transport.base import Flow, ListenAddress, Transport, TransportConfig, is_reliable
from sbc.transport.certificates import (
    CertificatePaths,
    client_context,
    ensure_self_signed,
    server_context,
)
from sbc.transport.layer import TransportLayer
from sbc.web.app import LoopMonitor, create_app

logger = logging.getLogger(__name__)


def transport_config(config: Config) -> TransportConfig:
    return TransportConfig(
        listen=tuple(
            ListenAddress(Transport(listener.transport.value), str(listener.address), listener.port)
            for listener in config.sip.listen
        ),
        idle_timeout=float(config.sip.tcp_idle_timeout),
        max_connections=config.sip.max_connections,
    )


def certificate_paths(config: Config) -> CertificatePaths:
    tls = config.sip.tls
    if tls.certificate is not None and tls.private_key is not None:
        return CertificatePaths(tls.certificate, tls.private_key)
    return ensure_self_signed(config.state_dir, ("localhost", "127.0.0.1", "::1"))


class SbcNode:
    """One running SBC: everything ``sbc run`` starts, stoppable and reloadable."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.transactions = TransactionLayer()
        self.responder = LocalResponder(server=config.sip.user_agent)
        self.monitor = LoopMonitor()
        self.transport: TransportLayer | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self._tls_paths: CertificatePaths | None = None
        self._runner: web.AppRunner | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stopping = False
        self.stopped = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.monitor.start()
        await self._start_transport(self.config)
        await self._start_management(self.config)
        logger.info("- sbc started: %s", ", ".join(self._describe_listeners()))

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        logger.info("- stopping")
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.transport is not None:
            await self.transport.stop()
        await self.monitor.stop()
        self.stopped.set()
        logger.info("- stopped")

    def _describe_listeners(self) -> list[str]:
        out = []
        if self.transport is not None:
            for listener in self.transport.listeners:
                out.append(f"sip {listener.transport.value} {listener.host}:{listener.port}")
        mgmt = self.config.management.listen
        out.append(f"management http://{mgmt.address}:{mgmt.port}")
        return out

    async def _start_transport(self, config: Config) -> None:
        tcfg = transport_config(config)
        server_ssl = None
        if any(listen.transport is Transport.TLS for listen in tcfg.listen):
            self._tls_paths = certificate_paths(config)
            server_ssl = server_context(self._tls_paths)
        layer = TransportLayer(
            tcfg, self._on_message, server_ssl=server_ssl, client_ssl=client_context()
        )
        await layer.start()
        self.transport = layer
        self._server_ssl = server_ssl

    async def _start_management(self, config: Config) -> None:
        app = create_app(self.health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        listen = config.management.listen
        site = web.TCPSite(runner, str(listen.address), listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    # -- health -------------------------------------------------------------------------

    def health(self) -> dict[str, object]:
        """What /healthz reports: ok only while SIP is bound and the loop is responsive."""
        bound = self.transport is not None and self.transport.bound
        responsive = self.monitor.responsive()
        return {
            "ok": bound and responsive and not self._stopping,
            "sip_bound": bound,
            "loop_responsive": responsive,
            "loop_lag_ms": round(self.monitor.lag * 1000, 1),
            "transactions": len(self.transactions),
        }

    # -- signalling ---------------------------------------------------------------------

    def _on_message(self, message: Request | Response, flow: Flow) -> None:
        now = time.monotonic()
        out = self.transactions.receive(message, flow, now, reliable=is_reliable(flow.transport))
        self._dispatch(out, now)

    def _dispatch(self, out: Output, now: float) -> None:
        for event in out.events:
            if isinstance(event, RequestReceived):
                response = self.responder.respond(event.request)
                if response is not None:
                    out = out + self.transactions.send_response(event.transaction, response, now)
            elif isinstance(event, CancelReceived):
                # RFC 3261 9.2: 200 to a CANCEL that matches, 481 to one that does not;
                # every INVITE is answered at once today, so nothing is left to end.
                status = 481 if event.invite is None else 200
                response = make_response(event.request, status, to_tag=None)
                out = out + self.transactions.send_response(event.transaction, response, now)
        for outgoing in out.messages:
            message, flow = outgoing.message, outgoing.destination
            if isinstance(message, Response) and isinstance(flow, Flow) and self.transport:
                self.transport.send_response_nowait(message, flow)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.transactions.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is None or self._stopping:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.monotonic())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = time.monotonic()
        self._dispatch(self.transactions.handle_timers(now), now)

    # -- reload -------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file; True if the new one is in force."""
        if self.config_path is None:
            logger.info("- reload: running on the embedded default, nothing to re-read")
            self._reload_certificates()
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                logger.error("x reload refused: %s", line)
            logger.error("x the running configuration stays in force")
            return False
        old = self.config
        if new == old:
            self._reload_certificates()
            logger.info("- reload: configuration unchanged")
            return True
        setup_logging(new.log.level.value, new.log.format.value)
        self.responder = LocalResponder(server=new.sip.user_agent)
        if new.sip != old.sip or new.state_dir != old.state_dir:
            if not await self._replace_transport(new, old):
                return False
        else:
            self._reload_certificates()
        if new.management != old.management and not await self._replace_management(new, old):
            return False
        self.config = new
        logger.info("- configuration reloaded from %s", self.config_path)
        return True

    def _reload_certificates(self) -> None:
        """Load renewed certificate files into the live context: new handshakes use
        them, established TLS connections are not touched."""
        if self._server_ssl is not None and self._tls_paths is not None:
            try:
                self._server_ssl.load_cert_chain(
                    self._tls_paths.certificate, self._tls_paths.private_key
                )
            except (OSError, ssl.SSLError) as exc:
                logger.error("x TLS certificate reload failed, keeping the old one: %s", exc)

    async def _replace_transport(self, new: Config, old: Config) -> bool:
        if self.transport is not None:
            await self.transport.stop()
        try:
            await self._start_transport(new)
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.error("x reload refused: cannot start SIP listeners: %s", exc)
            await self._start_transport(old)
            return False
        return True

    async def _replace_management(self, new: Config, old: Config) -> bool:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            await self._start_management(new)
        except OSError as exc:
            logger.error("x reload refused: cannot start management listener: %s", exc)
            await self._start_management(old)
            return False
        return True


async def serve(config: Config, config_path: Path | None) -> int:
    node = SbcNode(config, config_path)
    try:
        await node.start()
    except OSError as exc:
        logger.error("x cannot start: %s", exc)
        await node.stop()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(node.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(node.reload()))
    await node.stopped.wait()
    return 0


def run(config_path: Path | None) -> int:
    """``sbc run``: load the configuration (or the embedded default) and serve."""
    try:
        config = load_config(config_path) if config_path else default_config()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print("sbc: configuration refused, not starting", file=sys.stderr)
        return 2
    setup_logging(config.log.level.value, config.log.format.value)
    try:
        import uvloop

        return uvloop.run(serve(config, config_path))
    except ImportError:
        return asyncio.run(serve(config, config_path))
