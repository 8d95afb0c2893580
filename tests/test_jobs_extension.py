"""finesmith's own job settings (`method.<type>.finesmith`): a reinforcement job may say how its
answers are sampled, as `grpo.temperature`, `grpo.top_p` and `grpo.max_new_tokens` do in a config."""

from __future__ import annotations

import pytest

from finesmith.serve.http import APIError
from finesmith.serve.jobs import extension
from finesmith.serve.worker import reinforcement_config


def test_reinforcement_jobs_set_their_sampling_and_it_reaches_the_grpo_config():
    settings = extension({"method": "lora", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16}, "reinforcement")
    assert settings == {"method": "lora", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16}
    job = {"hyperparameters": {}, "method": {"type": "reinforcement", "grader": {"type": "string_check"},
                                             "finesmith": settings}}
    config: dict = {}
    reinforcement_config(config, job)
    assert config["grpo"]["temperature"] == 0.7 and config["grpo"]["top_p"] == 0.9
    assert config["grpo"]["max_new_tokens"] == 16


@pytest.mark.parametrize("kind, value, param", [
    ("reinforcement", {"temperature": 0}, "temperature"), ("reinforcement", {"temperature": 2.5}, "temperature"),
    ("reinforcement", {"top_p": 1.5}, "top_p"), ("reinforcement", {"max_new_tokens": 0}, "max_new_tokens"),
    ("reinforcement", {"max_new_tokens": 2.5}, "max_new_tokens"), ("reinforcement", {"temperature": True}, "temperature"),
    ("supervised", {"temperature": 0.7}, "temperature")])
def test_sampling_settings_out_of_range_or_on_other_jobs_are_a_400_naming_the_field(kind, value, param):
    with pytest.raises(APIError) as refused:
        extension(value, kind)
    assert refused.value.status == 400 and refused.value.param == f"method.{kind}.finesmith.{param}"


def test_a_fine_tune_of_a_fine_tune_is_named_after_the_original_base():
    from finesmith.serve.jobs import fine_tuned_name

    job = {"id": "ftjob-d066e7f2c786bacee4196eb2", "suffix": "grpo"}
    assert fine_tuned_name({**job, "model": "smollm2-135m-instruct"}) == "ft:smollm2-135m-instruct:grpo:d066e7f2"
    assert fine_tuned_name({**job, "model": "ft:smollm2-135m-instruct:grpo-sft:354de38c"}) == \
        "ft:smollm2-135m-instruct:grpo:d066e7f2"
