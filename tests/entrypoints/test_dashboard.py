"""/stats against /metrics on a live tiny-model server, and /dashboard in a real headless chromium.

KVSERVE_UPDATE_SCREENSHOTS=1 also writes the browser test's screenshot to docs/dashboard.png."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import STATS_KEY as KEY

AUTH = {"authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(stats_server):
    return stats_server


def _complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _run_batch(url: str, prompts: list[list[int]], max_tokens: int) -> None:
    threads = [threading.Thread(target=_complete, args=(url, p, max_tokens)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _metric(st: dict, name: str) -> float:
    return sum(v for k, v in st.items() if k == name or k.startswith(name + "{"))


@pytest.mark.slow  # it may start the shared live server (stats_server)
def test_stats_agree_with_metrics(server, tiny_dir):
    """After a batch of requests, /stats has /metrics' exact counts and gauges, and its step records add up
    to the tokens the requests computed (distinct prompts: no prefix-cache hits)."""
    before = server.wait_idle()
    base = httpx.get(f"{server.url}/stats", headers=AUTH).json()
    prompts = [[3 + i, 10, 11, 12, 13, 14, 15 + i] for i in range(6)]
    _run_batch(server.url, prompts, 5)
    deadline = time.time() + 10
    while True:  # the engine's gauges are a snapshot refreshed every 0.5 s while busy: wait for the one after
        st = server.wait_idle()
        if st["kvserve:prefix_cache_queries"] == before["kvserve:prefix_cache_queries"] + 42 or time.time() > deadline:
            break
        time.sleep(0.1)
    s = httpx.get(f"{server.url}/stats", headers=AUTH, params={"since": base["last_seq"]}).json()

    tot = s["totals"]
    assert tot["requests_finished"] == _metric(st, "kvserve:request_success_total") \
        == _metric(before, "kvserve:request_success_total") + 6
    assert tot["prompt_tokens"] == st["kvserve:prompt_tokens_total"] == before["kvserve:prompt_tokens_total"] + 42
    assert tot["generation_tokens"] == st["kvserve:generation_tokens_total"] \
        == before["kvserve:generation_tokens_total"] + 30
    assert tot["finished_by_reason"]["length"] == st['kvserve:request_success_total{finished_reason="length"}']
    lat = s["latency"]
    for name, key in (("ttft_seconds", "time_to_first_token_seconds"), ("e2e_seconds", "e2e_request_latency_seconds"),
                      ("tpot_seconds", "inter_token_latency_seconds")):
        q = lat[name]
        assert q["count"] == st[f"kvserve:{key}_count"]
        assert q["mean"] * q["count"] == pytest.approx(st[f"kvserve:{key}_sum"], rel=1e-6)
        assert 0 < q["p50"] <= q["p90"] <= q["p99"]
    assert lat["ttft_seconds"]["p99"] <= lat["e2e_seconds"]["p99"]
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions",
                 "prefix_cache_queries", "prefix_cache_hits"):
        assert s["engine"][name] == st[f"kvserve:{name}"], name

    steps = s["steps"]
    assert steps and all(r["seq"] > base["last_seq"] for r in steps)
    assert [r["seq"] for r in steps] == sorted(r["seq"] for r in steps)
    assert sum(r["prefill_tokens"] for r in steps) == 42
    assert sum(r["decode_tokens"] for r in steps) == 6 * 4  # the first token of each comes from its prefill
    assert max(r["batch_size"] for r in steps) > 1  # they ran together
    assert all(0 <= r["kv_cache_usage_perc"] <= 1 and 0 <= r["running"] <= 32 for r in steps)  # after the step
    assert s["throughput"]["decode_tokens_per_s"] > 0
    # the roofline of the same window: each step streams every weight, each token costs 2 FLOP a parameter
    tp, rl = s["throughput"], s["roofline"]
    from kvserve.loader import load_model

    lm = load_model(tiny_dir)  # what the server serves: a float checkpoint stays float
    assert rl["weight_gb_per_s"] == pytest.approx(tp["steps_per_s"] * lm.weight_bytes / 1e9)
    assert rl["gflop_per_s"] == pytest.approx(2 * lm.num_params * (tp["prefill_tokens_per_s"]
                                                                  + tp["decode_tokens_per_s"]) / 1e9)
    assert rl["line"].startswith("roofline: ") and "GB/s of weights read" in rl["line"]
    # a poller that saw everything gets no step again
    again = httpx.get(f"{server.url}/stats", headers=AUTH, params={"since": s["last_seq"]}).json()
    assert again["steps"] == [] and again["last_seq"] == s["last_seq"]


def test_stats_needs_the_key_and_the_dashboard_does_not(server):
    assert httpx.get(f"{server.url}/stats").status_code == 401
    assert httpx.get(f"{server.url}/stats", params={"since": -1}, headers=AUTH).status_code == 400
    r = httpx.get(f"{server.url}/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script" in r.text and "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere


def test_dashboard_page_is_package_data():
    """The page ships inside the package (setuptools package-data), not beside it."""
    from importlib import resources

    page = resources.files("kvserve.entrypoints.openai").joinpath("static/dashboard.html")
    assert page.is_file()
    text = (REPO / "pyproject.toml").read_text()
    assert '"kvserve.entrypoints.openai" = ["static/*.html"]' in text


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1250",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium never runs its manager, nothing is downloaded
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.mark.slow
def test_dashboard_in_chromium(server, tmp_path):
    """The page loads without console errors, draws every chart from /stats under load, and shows the
    numbers /metrics has once the load is over."""
    driver = _browser()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            _run_batch(server.url, [[5 + (i + j) % 40, 20, 21, 22, 23] for j in range(6)], 12)
            i += 6

    loader = threading.Thread(target=load)
    try:
        loader.start()
        driver.get(f"{server.url}/dashboard?key={KEY}&interval=250")
        deadline = time.time() + 30
        while time.time() < deadline:  # wait for polls that saw steps and finished requests
            d = driver.execute_script("return window.kvDashboard")
            if d["polls"] >= 3 and d["drawn"].get("c-steps") and d["drawn"].get("c-lat"):
                break
            time.sleep(0.2)
        stop.set()
        loader.join()
        st = server.wait_idle()
        want = _metric(st, "kvserve:request_success_total")
        deadline = time.time() + 15
        while time.time() < deadline:  # the page catches up with the idle server
            d = driver.execute_script("return window.kvDashboard")
            last = d["last"]
            if last["totals"]["requests_finished"] == want and last["engine"]["num_requests_running"] == 0:
                break
            time.sleep(0.2)
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        logs = driver.get_log("browser")
        tiles = driver.execute_script(  # in one go: each poll redraws the tiles
            "return Object.fromEntries([...document.querySelectorAll('.tile .v')]"
            ".map(e => [e.id, Number(e.dataset.value)]))")
        # data-parallel records (one ring, each replica's own steps): the charts sum the replicas' latest state
        def rec(replica, running, waiting, kv):
            return {"replica": replica, "time": 1.0, "running": running, "waiting": waiting,
                    "kv_cache_usage_perc": kv, "prefix_cache_hit_rate": 0.5}

        dp = driver.execute_script("return combined(arguments[0])",
                                   [rec(0, 2, 1, 0.2), rec(1, 3, 0, 0.4), rec(0, 1, 0, 0.1)])
    finally:
        stop.set()
        driver.quit()
    assert [(r["running"], r["waiting"]) for r in dp] == [(2, 1), (5, 1), (4, 0)]
    assert [r["kv_cache_usage_perc"] for r in dp] == pytest.approx([0.2, 0.3, 0.25])
    errors = [e for e in logs if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, json.dumps(errors, indent=1)
    assert d["errors"] == 0 and d["polls"] >= 3
    assert d["drawn"]["c-kv"] > 0 and d["drawn"]["c-queue"] > 0 and d["drawn"]["c-steps"] > 0
    assert d["drawn"]["c-tps"] > 0 and d["drawn"]["c-lat"] >= want  # ttft + tpot + e2e counts
    assert len(d["steps"]) > 0 and max(r["batch_size"] for r in d["steps"]) > 1
    assert tiles["v-requests-finished"] == want
    assert tiles["v-prompt-tokens"] == st["kvserve:prompt_tokens_total"]
    assert tiles["v-generation-tokens"] == st["kvserve:generation_tokens_total"]
    assert tiles["v-running"] == st["kvserve:num_requests_running"] == 0
    assert tiles["v-kv-usage"] == pytest.approx(100 * st["kvserve:kv_cache_usage_perc"])
    assert shot.stat().st_size > 10_000
    if os.environ.get("KVSERVE_UPDATE_SCREENSHOTS"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
