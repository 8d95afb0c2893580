"""Where metrics go: `metrics.jsonl` always; TensorBoard, Weights & Biases, MLflow on request.

The optional trackers are imported only when `report_to` names them, so a run that does
not ask for one never loads (or contacts) it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, TextIO

from finesmith.errors import FinesmithError

# report_to name -> (module that must be importable, pip package that provides it)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow")}


def check_trackers_installed(names: list[str]) -> None:
    """Fail before training starts if a requested tracker is not installed."""
    for name in names:
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise FinesmithError(f"report_to: {name} is not installed; run `pip install {package}` "
                                 f"or remove {name} from report_to")


class MetricsLog:
    """Appends JSON records to `metrics.jsonl` and forwards numeric ones to the trackers."""

    def __init__(self, output: Path, report_to: list[str], run_config: dict[str, Any], resume_step: int | None = None):
        check_trackers_installed(report_to)
        output.mkdir(parents=True, exist_ok=True)
        self.path = output / "metrics.jsonl"
        if resume_step is not None:
            drop_records_after(self.path, resume_step)
        self.file: TextIO = self.path.open("a", encoding="utf-8")
        self.trackers = [_open_tracker(name, output, run_config) for name in report_to]

    def write(self, record: dict[str, Any]) -> None:
        """Log one record; it must have a `step`."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(numbers, int(record["step"]))

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def drop_records_after(path: Path, step: int) -> None:
    """Remove lines logged after `step` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class _TensorBoard:
    def __init__(self, output: Path, run_config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))

    def log(self, numbers: dict[str, float], step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output: Path, run_config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project="finesmith", name=output.name, dir=str(output), config=run_config)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output: Path, run_config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=output.name)
        mlflow.log_params({k: str(v)[:250] for k, v in run_config.items()})

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(numbers, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _open_tracker(name: str, output: Path, run_config: dict[str, Any]) -> Any:
    return {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}[name](output, run_config)
