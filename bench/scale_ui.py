"""The MLflow UI's experiment page in Debian's headless Chromium: time until the run table has rendered its rows, and
a screenshot.

Chromium is driven over the DevTools protocol on 127.0.0.1 (``--remote-debugging-port``), through aiohttp's
WebSocket client (already installed with Ray): open the page in the model-training view, poll the DOM for the run
table's rows, capture the page. With basic auth the page's requests carry the credentials as a header.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.scale_stack import Stack, free_port

# The run table as MLflow's UI (ag-grid) draws it: logical rows (a row is split over pinned and centre containers, all
# with its row-index), the "N matching runs" footer, a "Load more" button.
TABLE_JS = """(() => {
  const rows = new Set(Array.from(document.querySelectorAll('.ag-row')).map(r => r.getAttribute('row-index'))).size;
  const body = document.body ? document.body.innerText : '';
  const m = body.match(/(\\d+) matching runs/);
  return JSON.stringify({rows: rows, matching: m ? Number(m[1]) : null, loadMore: body.includes('Load more')});
})()"""
# The parent run's expander: its children (the trials) are nested under it.
EXPAND_JS = """(() => {
  const b = document.querySelector('.ag-row button[data-component-id*="runnamecellrenderer"]');
  if (b) { b.click(); return true; }
  return false;
})()"""
TIMEOUT_S = 90.0
STABLE_S = 1.0  # the row count unchanged this long: the table has rendered


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def time_ui(stack: Stack, experiment_id: str, screenshot: Path, rows: int) -> dict[str, Any]:
    """Seconds from navigation to the run table rendered with every run counted (``rows`` runs matching), then to the
    parent's children drawn once it is expanded (row count stable for :data:`STABLE_S`); the rows drawn, whether a
    "Load more" shows, and a screenshot. ``{"ui_error": …}`` when Chromium is absent or the page never renders."""
    exe = chromium()
    if exe is None:
        return {"ui_s": None, "ui_error": "chromium is not installed"}
    url = f"{stack.tracking_uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="lsg-chromium-"))
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,1000",
            f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        socket_url = _page_socket(port)
        headers = {}
        if stack.auth:
            token = base64.b64encode(":".join(stack.auth).encode()).decode()
            headers = {"Authorization": f"Basic {token}"}
        out = asyncio.run(_measure(socket_url, url, headers, screenshot, rows))
    except Exception as exc:  # noqa: BLE001 - the UI row is one row of the table; the rest still counts
        out = {"ui_s": None, "ui_error": f"{type(exc).__name__}: {exc}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    out["ui_runs"] = rows
    return out


def _page_socket(port: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:  # noqa: S310
                pages = [p for p in json.loads(resp.read()) if p.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium's DevTools endpoint did not answer")
        time.sleep(0.2)


async def _measure(socket_url: str, url: str, headers: dict[str, str], screenshot: Path, runs: int) -> dict[str, Any]:
    import aiohttp  # deferred: heavy (aiohttp), the UI row only

    ids = itertools.count(1)
    async with aiohttp.ClientSession() as session, session.ws_connect(socket_url, max_msg_size=0) as ws:

        async def call(method: str, **params: Any) -> dict[str, Any]:
            msg_id = next(ids)
            await ws.send_json({"id": msg_id, "method": method, "params": params})
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg.get("id") == msg_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

        async def table() -> dict[str, Any]:
            result = await call("Runtime.evaluate", expression=TABLE_JS, returnByValue=True)
            return json.loads(result["result"]["value"])

        await call("Page.enable")
        if headers:
            await call("Network.enable")
            await call("Network.setExtraHTTPHeaders", headers=headers)
        t0 = time.perf_counter()
        await call("Page.navigate", url=url)
        state: dict[str, Any] = {}
        listed = None
        while time.perf_counter() - t0 < TIMEOUT_S:
            state = await table()
            if state["rows"] > 0 and state["matching"] == runs:
                listed = time.perf_counter() - t0
                break
            await asyncio.sleep(0.1)
        expanded = None
        if listed is not None:
            await call("Runtime.evaluate", expression=EXPAND_JS, returnByValue=True)
            seen, since = state["rows"], time.perf_counter()
            while time.perf_counter() - t0 < TIMEOUT_S:
                state = await table()
                now = time.perf_counter()
                if state["rows"] != seen:
                    seen, since = state["rows"], now
                elif seen > 1 and now - since >= STABLE_S:
                    expanded = since - t0
                    break
                await asyncio.sleep(0.1)
        shot = await call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return {"ui_s": expanded, "ui_listed_s": listed, "ui_rows": state.get("rows"), "ui_matching": state.get("matching"),
            "ui_load_more": state.get("loadMore"), "ui_screenshot": str(screenshot)}  # fmt: skip
