"""The dashboard at `/`: jobs and local runs with live loss and eval curves, a run's compare
report, a form to start a job from an uploaded file, and a chat box for any served model.

One static page and one script, shipped in the wheel (`finesmith/resources/dashboard/`),
no CDN: the page talks to the same `/v1` API as any client (files, jobs, models, chat) plus
two read-only endpoints here, which read runs through `load_run` like every other reader:

- `GET /v1/finesmith/runs`: every run (jobs' runs and the folders under `--runs`), with
  state, method, objective, steps and losses;
- `GET /v1/finesmith/runs/{id}/metrics`: its loss and eval-loss curves from `metrics.jsonl`;
- `GET /v1/finesmith/reports` and `/v1/finesmith/reports/{id}`: compare reports
  (`report.html` folders written by `finesmith compare`) of the jobs (a job with a validation
  file ends with one) and found under `--runs`.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from finesmith.errors import FinesmithError


def _asset(name: str) -> str:
    return resources.files("finesmith").joinpath("resources", "dashboard", name).read_text(encoding="utf-8")


def run_id(folder: Path) -> str:
    return hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]


def run_folders(store: Any, roots: list[Path]) -> dict[str, tuple[Path, str | None, str]]:
    """id -> (run folder, job id or None, the folder as clients see it), jobs first (newest
    first), then `roots`' runs by name. Clients see `jobs/JOB/run` or the path under its root:
    never where this machine keeps it."""
    found: dict[str, tuple[Path, str | None, str]] = {}
    if store is not None:
        jobs, _ = store.jobs(limit=100)
        for job in jobs:
            folder = Path(job["output"]) / "run"
            if (folder / "run.json").is_file():
                found[run_id(folder)] = (folder, job["id"], f"jobs/{job['id']}/run")
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
        for folder in candidates:
            if (folder / "run.json").is_file():
                shown = folder.name if folder == root else f"{root.name}/{folder.name}"
                found.setdefault(run_id(folder), (folder, None, shown))
    return found


def run_summary(folder: Path, job: str | None, shown: str) -> dict[str, Any]:
    """The listing's row of a run; a run whose record cannot be read is listed as `damaged`,
    with the reason in one line (the others are listed as usual)."""
    from finesmith.run import load_run
    from finesmith.serve.http import strip_paths

    base = {"id": run_id(folder), "name": folder.parent.name if job else folder.name, "job": job, "folder": shown}
    try:
        run = load_run(folder)
        record = run.record
        result = record.result or {}
        return {**base, "state": record.state, "method": record.method.get("name"),
                "objective": record.config.get("objective", "sft"), "base": run.base_spec,
                "steps": result.get("steps"), "total_steps": record.schedule.get("total_steps"),
                "final_loss": result.get("final_loss"), "eval_loss": result.get("eval_loss"),
                "created": record.created, "error": None}
    except Exception as exc:  # one damaged folder must not hide the others
        reason = str(exc) if isinstance(exc, FinesmithError) else f"run.json is damaged ({type(exc).__name__}: {exc})"
        reason = strip_paths(reason.replace(str(folder), shown), folder.parent)
        return {**base, "state": "damaged", "method": None, "objective": None, "base": None, "steps": None,
                "total_steps": None, "final_loss": None, "eval_loss": None, "created": None,
                "error": " ".join(reason.split())[:300]}


def curves(folder: Path) -> dict[str, list[list[float]]]:
    """`{"loss": [[step, loss], ...], "eval_loss": [...]}` from the run's metrics."""
    out: dict[str, list[list[float]]] = {"loss": [], "eval_loss": []}
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in out:
            if key in entry and entry.get("step") is not None:
                out[key].append([entry["step"], entry[key]])
    return out


def reports(roots: list[Path], store: Any = None) -> dict[str, tuple[Path, str]]:
    """id -> (report file, its path under its root as clients see it): the jobs' compare reports
    (`jobs/JOB/compare`, made when a job with a validation file ends), then those under `roots`."""
    found = {}
    if store is not None:
        jobs, _ = store.jobs(limit=100)
        for job in jobs:
            path = Path(job["output"]) / "compare" / "report.html"
            if path.is_file():
                found[run_id(path.parent)] = (path, f"jobs/{job['id']}/compare")
    for root in roots:
        if root.is_dir():
            for path in sorted(root.glob("*/report.html")) + sorted(root.glob("report.html")):
                found[run_id(path.parent)] = (path, str(path.relative_to(root.parent)))
    return found


# A compare report is a file under --runs: whatever it holds must not run as the dashboard,
# which keeps the API key in its storage. Loaded on its own it is a sandboxed document (a unique
# origin, no scripts); the dashboard shows it in an <iframe sandbox> for the same reason.
REPORT_HEADERS = {"Content-Security-Policy": "sandbox; default-src 'none'; script-src 'none'; "
                                             "style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def add_dashboard(app: FastAPI, store: Any, roots: list[Path]) -> None:
    """The page, its script and the read-only run endpoints on `app`."""
    from finesmith.serve.http import APIError

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _asset("index.html")

    @app.get("/dashboard/app.js")
    def script() -> Response:
        return Response(_asset("app.js"), media_type="text/javascript")

    @app.get("/v1/finesmith/runs")
    def list_runs() -> dict[str, Any]:
        return {"object": "list", "data": [run_summary(folder, job, shown)
                                           for folder, job, shown in run_folders(store, roots).values()]}

    @app.get("/v1/finesmith/runs/{rid}/metrics")
    def run_metrics(rid: str) -> dict[str, Any]:
        found = run_folders(store, roots).get(rid)
        if found is None:
            raise APIError(404, f"no run with id {rid}", param="id", code="run_not_found")
        return {"id": rid, **curves(found[0])}

    @app.get("/v1/finesmith/reports")
    def list_reports() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": k, "name": shown if shown.startswith("jobs/") else p.parent.name,
                                            "path": shown} for k, (p, shown) in reports(roots, store).items()]}

    @app.get("/v1/finesmith/reports/{rid}", response_class=HTMLResponse)
    def report(rid: str) -> Response:
        found = reports(roots, store).get(rid)
        if found is None:
            raise APIError(404, f"no compare report with id {rid}", param="id", code="report_not_found")
        return HTMLResponse(found[0].read_text(encoding="utf-8", errors="replace"), headers=REPORT_HEADERS)
