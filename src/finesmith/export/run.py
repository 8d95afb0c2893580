"""`finesmith export`: one run folder in, one self-contained export folder out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finesmith.errors import FinesmithError
from finesmith.folders import fresh_folder
from finesmith.export import FORMATS, QUANTS
from finesmith.export.card import model_card
from finesmith.export.gguf import check_exportable, export_gguf
from finesmith.export.merge import RunInfo, copy_adapter, inspect_run, load_merged, save_hf
from finesmith.export.verify import Check, verify_adapter, verify_gguf, verify_hf
from finesmith.model.methods import load_for_inference
from finesmith.run import write_export_record


@dataclass
class ExportResult:
    """Where the export went, its main files, and the checks (when verified)."""

    output: Path
    files: list[str]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def export_run(run: str, fmt: str, output: str, quant: str = "f16", verify: bool = False,
               overwrite: bool = False) -> ExportResult:
    """Export a run folder and write a model card next to it.

    Args:
        run: folder written by `finesmith train`.
        fmt: `hf` (merged safetensors model), `adapter` (PEFT folder) or `gguf`.
        output: folder to create.
        quant: GGUF matrix encoding, `f16` or `q8_0` (GGUF only).
        verify: reload the export and compare it numerically with the run.
        overwrite: replace a non-empty `output`.

    Returns:
        An `ExportResult`; `result.ok` is False when a check is out of tolerance.
    """
    if fmt not in FORMATS:
        raise FinesmithError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise FinesmithError(f"unknown GGUF quantisation '{quant}'; use one of {', '.join(QUANTS)}")
    info = inspect_run(run)
    if fmt == "adapter" and not info.adapter:
        raise FinesmithError(f"{run} is a full fine-tune with no adapter; use --format hf or gguf")
    if fmt == "adapter":
        target = prepare_folder(Path(output), overwrite, info, fmt)
        copy_adapter(info, target)
        files = sorted(p.name for p in target.iterdir())
    else:
        model, tokenizer = load_merged(info.folder)
        if fmt == "gguf":
            check_exportable(model.config)  # before creating anything
        target = prepare_folder(Path(output), overwrite, info, fmt)
        if fmt == "gguf":
            files = export_gguf(model, tokenizer, target, gguf_name(info, quant), quant, info.folder.name)
        else:
            save_hf(model, tokenizer, target)
            files = sorted(p.name for p in target.iterdir())
        del model
    checks = verify_export(info, fmt, target, quant) if verify else []
    (target / "README.md").write_text(model_card(info, fmt, files, checks), encoding="utf-8")
    return ExportResult(target, files, checks)


def gguf_name(info: RunInfo, quant: str) -> str:
    return f"{info.folder.name}-{quant}.gguf"


def verify_export(info: RunInfo, fmt: str, target: Path, quant: str) -> list[Check]:
    """Compare the written export with the run as training left it (adapter on base, or full)."""
    reference, tokenizer = load_for_inference(str(info.folder))
    if fmt == "adapter":
        return verify_adapter(reference, tokenizer, info.base_model, target)
    if fmt == "gguf":
        return verify_gguf(reference, tokenizer, target / gguf_name(info, quant), quant)
    return verify_hf(reference, tokenizer, target)


def prepare_folder(output: Path, overwrite: bool, info: RunInfo, fmt: str) -> Path:
    """Create the export folder and its record; never write into the run itself or over other files."""
    run = info.folder
    if output.resolve() == run.resolve() or run.resolve().is_relative_to(output.resolve()):
        raise FinesmithError(f"--output {output} is or contains the run folder; choose a new folder")
    fresh_folder(output, overwrite)
    write_export_record(output, {"run": str(run.resolve()), "format": fmt, "method": info.method,
                                 "base_model": info.base_model})
    return output
