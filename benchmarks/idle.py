"""What an idle edge costs on the wire in a day.

    .venv/bin/python benchmarks/idle.py [--seconds S] [--scale K] [--json]

A real edge daemon with the default tier policies, bootstrapped and then left idle, talks to
a hub in its own process through a byte-counting TCP proxy. A day at the default
``long_poll_idle_s`` (900 s) would take a day to watch, so the daemon's timings run K times
faster (``long_poll_s``, ``long_poll_idle_s`` and the important tier's intervals divided by
K): the requests are the same, only closer together. After the long-poll has grown to its
idle length the run counts every request and every byte each way for S seconds, then
prints:

- bytes per idle exchange (request and answer, TCP payload) and the requests seen by route
  (an idle edge should send nothing but its long-poll);
- the day at the default timings: 86,400 / long_poll_idle_s exchanges, plus the day's
  scheduled extras (the config safety net every 6 h, the standard tier's daily pull), each
  at its measured size, plus TCP/IP headers (four 52-byte segments per exchange: request,
  answer and their ACKs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import CELL, running_hub, token_for

from support.proxy import FaultProxy
from syncengine.config import EdgeConfig
from syncengine.edge.daemon import CONFIG_INTERVAL_S, EdgeDaemon
from syncengine.edge.link import HubLink
from syncengine.tiers import DEFAULT_LONG_POLL_IDLE_S, DEFAULT_LONG_POLL_S, Tier

NODE = "idle-edge"
DAY_S = 86_400
TCP_IP_HEADERS = 52  # IPv4 20 + TCP 20 + timestamps 12
SEGMENTS_PER_EXCHANGE = 4


class CountingLink(HubLink):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent: list[str] = []

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        params = dict(kw.get("params") or ())
        self.sent.append(f"{path} {params.get('tier', '')}".strip())
        return await super()._call(method, path, **kw)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured idle time")
    parser.add_argument("--scale", type=float, default=60.0, help="timings run this much faster")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    idle_s = DEFAULT_LONG_POLL_IDLE_S / args.scale
    short_s = max(1, round(DEFAULT_LONG_POLL_S / args.scale))
    async with running_hub() as bench:
        token = await token_for(bench, NODE)
        host, port = bench.url.removeprefix("http://").split(":")
        with tempfile.TemporaryDirectory() as tmp:
            config = EdgeConfig.from_mapping(
                {
                    "node_id": NODE,
                    "region": "west",
                    "db": str(Path(tmp) / "edge.db"),
                    "hub_url": bench.url,
                    "token": token,
                    "subscriptions": [CELL],
                    "tier_policies": {
                        "critical": {
                            "long_poll_s": short_s,
                            "long_poll_idle_s": max(short_s, round(idle_s)),
                        },
                        "important": {
                            "push_interval_s": max(1, round(60 / args.scale)),
                            "pull_interval_s": max(1, round(60 / args.scale)),
                            "promise_s": 300,
                        },
                    },
                }
            )
            async with FaultProxy(target_host=host, target_port=int(port)) as proxy:
                link = CountingLink(f"http://127.0.0.1:{proxy.port}", token, node_id=NODE)
                async with link, EdgeDaemon(config, link=link):
                    # Warm up: bootstrap, first rounds, the long-poll growing to its idle length.
                    await asyncio.sleep(4 * idle_s)
                    sent0, up0, down0 = len(link.sent), proxy.stats.bytes_up, proxy.stats.bytes_down
                    started = time.monotonic()
                    await asyncio.sleep(args.seconds)
                    took = time.monotonic() - started
                    requests = link.sent[sent0:]
                    up, down = proxy.stats.bytes_up - up0, proxy.stats.bytes_down - down0
                # One config request and one empty standard pull, measured alone.
                async with HubLink(f"http://127.0.0.1:{proxy.port}", token, node_id=NODE) as probe:
                    b0 = proxy.stats.bytes_up + proxy.stats.bytes_down
                    await probe.config()
                    b1 = proxy.stats.bytes_up + proxy.stats.bytes_down
                    await probe.pull(tier=Tier.STANDARD, prefixes=[CELL], after=0, limit=1000)
                    b2 = proxy.stats.bytes_up + proxy.stats.bytes_down
    exchanges = max(1, len(requests))
    per_exchange = (up + down) / exchanges
    wire = per_exchange + SEGMENTS_PER_EXCHANGE * TCP_IP_HEADERS
    extras = {
        "config (safety net)": (DAY_S / CONFIG_INTERVAL_S, b1 - b0),
        "standard daily pull": (1, b2 - b1),
    }
    per_day = DAY_S / DEFAULT_LONG_POLL_IDLE_S * wire + sum(
        n * (size + SEGMENTS_PER_EXCHANGE * TCP_IP_HEADERS) for n, size in extras.values()
    )
    by_route: dict[str, int] = {}
    for r in requests:
        by_route[r] = by_route.get(r, 0) + 1
    result = {
        "measured_s": round(took, 1),
        "scale": args.scale,
        "requests": by_route,
        "payload_bytes_per_exchange": round(per_exchange),
        "wire_bytes_per_exchange": round(wire),
        "exchanges_per_day": round(DAY_S / DEFAULT_LONG_POLL_IDLE_S),
        "bytes_per_day": round(per_day),
        "target_bytes_per_day": 100 * 1024,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"idle edge, {took:.0f} s measured at {args.scale:g}x speed: requests {by_route}")
    print(
        f"  per idle exchange: {per_exchange:,.0f} bytes TCP payload, ~{wire:,.0f} with "
        "TCP/IP headers"
    )
    print(
        f"  a day at long_poll_idle_s = {DEFAULT_LONG_POLL_IDLE_S} s: "
        f"{result['exchanges_per_day']} exchanges + "
        + ", ".join(f"{n:g} {what} ({size} B)" for what, (n, size) in extras.items())
    )
    print(f"  = {per_day / 1024:,.1f} KB/day on the wire (target <= 100 KB)")
    if per_day > 100 * 1024:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
