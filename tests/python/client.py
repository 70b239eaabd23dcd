#!/usr/bin/env python3
"""An independent MCP client: the official Python SDK (PyPI `mcp`) against the marketplace.

Usage: python client.py MCP_URL API_KEY

Initializes a streamable-HTTP session with `Authorization: Bearer API_KEY`, lists the
tools, calls `units__convert` and `marketplace__get_balance`, calls an unknown tool, and
prints ONE JSON object on stdout:

    {"tools": [...], "convert": {"is_error": bool, "text": "...", "meta": {...}},
     "balance": {...}, "unknown_tool_error": "..."}

Any failure exits non-zero with the reason on stderr. Driven by tests/python_sdk.rs.
"""

import asyncio
import contextlib
import inspect
import json
import sys
import traceback

from mcp import ClientSession

try:  # SDK >= 2 (and late 1.x)
    from mcp.shared.exceptions import MCPError as SdkError
except ImportError:  # SDK 1.x
    from mcp.shared.exceptions import McpError as SdkError

OVERALL_TIMEOUT_S = 90


@contextlib.asynccontextmanager
async def connect(url, headers):
    """Yields (read, write) streams, whichever streamable-HTTP client API is installed."""
    import mcp.client.streamable_http as transport

    modern = getattr(transport, "streamable_http_client", None)
    if modern is not None and "http_client" in inspect.signature(modern).parameters:
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with create_mcp_http_client(headers=headers) as http:
            async with modern(url, http_client=http) as streams:
                yield streams[0], streams[1]
        return
    async with transport.streamablehttp_client(url, headers=headers) as streams:
        yield streams[0], streams[1]


def dump(result):
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def text_of(result):
    return "".join(c.get("text", "") for c in result.get("content", []) if c.get("type") == "text")


async def run(url, key):
    out = {}
    async with connect(url, {"Authorization": f"Bearer {key}"}) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            tools = await session.list_tools()
            out["tools"] = [t.name for t in tools.tools]

            convert = dump(await session.call_tool("units__convert", {"value": 10, "from": "km", "to": "mi"}))
            out["convert"] = {
                "is_error": bool(convert.get("isError", False)),
                "text": text_of(convert),
                "meta": convert.get("_meta"),
            }

            balance = dump(await session.call_tool("marketplace__get_balance", {}))
            if balance.get("isError"):
                raise RuntimeError(f"marketplace__get_balance failed: {balance}")
            out["balance"] = balance.get("structuredContent")

            try:
                unexpected = dump(await session.call_tool("nope__nothing", {}))
                out["unknown_tool_error"] = None
                out["unknown_tool_result"] = unexpected
            except SdkError as e:
                error = getattr(e, "error", None)
                out["unknown_tool_error"] = getattr(error, "message", None) or str(e)
    return out


def main():
    if len(sys.argv) != 3:
        print("usage: client.py MCP_URL API_KEY", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(asyncio.wait_for(run(sys.argv[1], sys.argv[2]), OVERALL_TIMEOUT_S))
    except BaseException as e:  # noqa: BLE001 - report everything, including exception groups
        print(f"python MCP client failed: {e!r}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
