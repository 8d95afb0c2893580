"""Model specs: built-in alias (converted once, cached), folders, .gguf files, hub ids."""

from __future__ import annotations

import time

import pytest

from finesmith.errors import FinesmithError
from finesmith.model.load import BUILTIN_MODELS, load_model, load_tokenizer, resolve_model_path


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(FinesmithError, match="smollm2-135m-instruct"):
        resolve_model_path("gpt-99-tiny")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FinesmithError, match="not found"):
        resolve_model_path(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(FinesmithError, match="no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("how", ["offline mode", "unreachable hub"])
def test_hub_id_offline_fails_fast_with_one_clear_line(how, monkeypatch):
    if how == "offline mode":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    started = time.perf_counter()
    with pytest.raises(FinesmithError) as info:
        load_tokenizer("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "local model folder" in message
    assert "\n" not in message
    assert time.perf_counter() - started < 15  # no minute of download retries


def test_local_folder_loads(tiny_model):
    model = load_model(tiny_model)
    assert model.config.num_hidden_layers == 2


@pytest.mark.builtin
def test_builtin_alias_is_converted_once_and_cached(monkeypatch, tmp_path):
    import finesmith.model.load as load

    folder = load.builtin_folder("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    monkeypatch.setattr(load, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert load.builtin_folder("smollm2-135m-instruct") == folder
    assert "SmolLM2" in BUILTIN_MODELS["smollm2-135m-instruct"].description
