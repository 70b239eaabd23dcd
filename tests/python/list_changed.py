#!/usr/bin/env python3
"""The official MCP Python SDK (PyPI `mcp`) sees installs change its tool list.

Usage: python list_changed.py MCP_URL API_KEY SLUG

In one streamable-HTTP session: lists the tools, installs SLUG with
`marketplace__install_server`, waits for `notifications/tools/list_changed`, lists
again, uninstalls, waits for the next notification, lists again; prints ONE JSON object:

    {"before": [...], "after_install": [...], "after_uninstall": [...], "notifications": N}

Any failure (also a notification that never comes) exits non-zero. Driven by
tests/python_sdk.rs.
"""

import asyncio
import json
import sys
import traceback

from mcp import ClientSession

from client import connect, dump

WAIT_S = 20
OVERALL_TIMEOUT_S = 90


async def run(url, key, slug):
    changed = asyncio.Event()
    count = {"n": 0}

    async def on_message(message):
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/tools/list_changed":
            count["n"] += 1
            changed.set()

    async def names(session):
        return sorted(t.name for t in (await session.list_tools()).tools)

    out = {}
    async with connect(url, {"Authorization": f"Bearer {key}"}) as (read, write):
        async with ClientSession(read, write, message_handler=on_message) as session:
            await session.initialize()
            out["before"] = await names(session)

            r = dump(await session.call_tool("marketplace__install_server", {"slug": slug}))
            if r.get("isError"):
                raise RuntimeError(f"install failed: {r}")
            await asyncio.wait_for(changed.wait(), WAIT_S)
            changed.clear()
            out["after_install"] = await names(session)

            r = dump(await session.call_tool("marketplace__uninstall_server", {"slug": slug}))
            if r.get("isError"):
                raise RuntimeError(f"uninstall failed: {r}")
            await asyncio.wait_for(changed.wait(), WAIT_S)
            out["after_uninstall"] = await names(session)
    out["notifications"] = count["n"]
    return out


def main():
    if len(sys.argv) != 4:
        print("usage: list_changed.py MCP_URL API_KEY SLUG", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(asyncio.wait_for(run(*sys.argv[1:4]), OVERALL_TIMEOUT_S))
    except BaseException as e:  # noqa: BLE001 - report everything, including exception groups
        print(f"python MCP client failed: {e!r}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
