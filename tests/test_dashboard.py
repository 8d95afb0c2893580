"""The dashboard in a real headless Chromium: it opens, starts a job from the form, shows the
loss curve growing while the job runs and the job succeeding, and chats with the new model.

Chromium comes from the system (`apt-get install chromium`, which `.ci/run` does); Playwright
drives it through `executable_path`, since its own browser download is not reachable."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import QA, chat, write_jsonl
from test_jobs_api import KEY, Server

playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a system Chromium: apt-get install chromium (.ci/run does)")
def test_dashboard_starts_a_job_shows_its_curve_and_chats(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [chat(q, a) for q, a in QA * 2])
    server = Server(tiny_model, tmp_path / "home").start()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{server.port}/")
            assert page.title() == "finesmith"
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelector('#job-model').options.length > 0")
            page.set_input_files("#job-file", data)
            page.fill("#job-epochs", "10")
            page.fill("#job-suffix", "browser")
            page.click("#job-form button[type=submit]")
            page.wait_for_function("document.querySelector('#job-message').textContent.startsWith('started ftjob-')")
            job_id = page.text_content("#job-message").split()[-1]

            # the curve grows while the job runs: two different point counts, read a poll apart
            counts = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = page.query_selector("#curve polyline.series-loss")
                if line is not None:
                    count = int(line.get_attribute("data-points"))
                    if not counts or count != counts[-1]:
                        counts.append(count)
                status = page.text_content(f"#jobs tr[data-job='{job_id}'] td:nth-child(4)") or ""
                if status == "succeeded" and len(counts) >= 2:
                    break
                time.sleep(0.25)
            assert len(counts) >= 2 and counts == sorted(counts), counts
            page.wait_for_function(f"document.querySelector(\"#jobs tr[data-job='{job_id}'] td:nth-child(4)\")"
                                   ".textContent === 'succeeded'", timeout=120_000)
            ft_model = page.text_content(f"#jobs tr[data-job='{job_id}'] td:nth-child(5)")
            assert ft_model.startswith("ft:tiny-llama0:browser:")
            page.wait_for_timeout(1200)  # the next poll has the full curve
            final = int(page.get_attribute("#curve polyline.series-loss", "data-points"))
            record = json.loads((tmp_path / "home" / "jobs" / job_id / "run" / "run.json").read_text())
            assert final == record["result"]["steps"] == record["schedule"]["total_steps"] >= counts[-1]
            assert page.query_selector(f"#runs tr td:text-is('{job_id} (job)')") is not None

            # chat with the new model
            page.wait_for_function(f"[...document.querySelector('#chat-model').options].some(o => o.value === '{ft_model}')")
            page.select_option("#chat-model", ft_model)
            page.fill("#chat-input", "What colour is the sky?")
            page.click("#chat-form button[type=submit]")
            page.wait_for_selector("#chat-log .reply", timeout=60_000)
            assert page.text_content("#chat-log .reply").startswith(ft_model + ": ")
            assert not errors, errors
            browser.close()
    finally:
        server.stop()
