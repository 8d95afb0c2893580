"""Graders in the hosted API's shapes: templates, each grader type, error flags, the python
sandbox (a loop, an allocation, a socket each fail only their grading), multi formulas and
the GRPO reward adapter."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from finesmith.graders import formula
from finesmith.graders.grading import grade, validate
from finesmith.graders.python_grader import PythonLimits
from finesmith.graders.result import ERROR_FLAGS, GraderError, no_errors
from finesmith.graders.reward import reward_from_grader, reward_function
from finesmith.graders.similarity import fuzzy_ratio, lcs_length, wordnet_available
from finesmith.graders.templates import render, sample_namespace

FAST = PythonLimits(timeout_s=2.0, memory_mb=384)


def check(operation: str, reference: str = "{{ item.answer }}", input_: str = "{{ sample.output_text }}") -> dict:
    return {"type": "string_check", "name": "check", "input": input_, "reference": reference, "operation": operation}


def python(source: str, name: str = "py") -> dict:
    return {"type": "python", "name": name, "source": source}


def flags(result) -> list[str]:
    return [flag for flag in ERROR_FLAGS if result.errors[flag]]


# ---- templates ----------------------------------------------------------------------------------

def test_templates_render_nested_item_fields_and_the_sample() -> None:
    item = {"a": {"b": "deep"}, "n": 3, "xs": ["x0", {"k": "v"}], "odd key": "odd", "none": None}
    sample = sample_namespace('{"answer": "Paris", "n": 2}')
    assert render("{{item.a.b}}|{{ item.n }}|{{ item.xs[1].k }}|{{ item[\"odd key\"] }}", item, sample) == \
        "deep|3|v|odd"
    assert render("{{ sample.output_json.answer }} {{sample.output_json.n}}", item, sample) == "Paris 2"
    assert render("{{ sample.output_text }}", item, sample) == '{"answer": "Paris", "n": 2}'
    assert json.loads(render("{{ sample.output_json }}", item, sample)) == {"answer": "Paris", "n": 2}
    assert render("{{ item.a }}/{{ item.none }}", item, sample) == '{"b": "deep"}/null'  # non-strings as JSON
    assert render("verbatim {{ item.a.b }} {not a tag}", item, sample) == "verbatim deep {not a tag}"


def test_a_missing_variable_is_an_error_flag_not_a_crash() -> None:
    result = grade(check("eq", reference="{{ item.a.missing }}"), "x", {"a": {}})
    assert result.reward == 0.0 and flags(result) == ["invalid_variable_error"]
    assert "item.a.missing" in result.message
    no_item = grade(check("eq"), "x")  # no item at all
    assert flags(no_item) == ["invalid_variable_error"]
    not_json = grade(check("eq", reference="{{ sample.output_json.answer }}"), "plain text", {})
    assert flags(not_json) == ["sample_parse_error"] and not_json.reward == 0.0


def test_template_namespaces_are_checked_at_validation() -> None:
    with pytest.raises(GraderError, match=r"grader\.reference: .*namespace 'row'"):
        validate(check("eq", reference="{{ row.answer }}"))
    with pytest.raises(GraderError, match=r"grader\.input: .*whole namespace"):
        validate(check("eq", input_="{{ sample }}"))


# ---- string_check -------------------------------------------------------------------------------

@pytest.mark.parametrize(("operation", "answer", "expected"), [
    ("eq", "Paris", 1.0), ("eq", "paris", 0.0), ("eq", "Paris ", 0.0),
    ("ne", "Paris", 0.0), ("ne", "Rome", 1.0),
    ("like", "The answer is Paris.", 1.0), ("like", "the answer is paris", 0.0),
    ("ilike", "THE ANSWER IS PARIS", 1.0), ("ilike", "Rome", 0.0),
])
def test_string_check_operations(operation: str, answer: str, expected: float) -> None:
    result = grade(check(operation), answer, {"answer": "Paris"})
    assert result.ok and result.reward == expected and result.passed is (expected == 1.0)


def test_validation_names_the_field() -> None:
    with pytest.raises(GraderError, match=r"^grader\.operation: must be one of eq, ne, like, ilike"):
        validate(check("contains"))
    with pytest.raises(GraderError, match=r"^grader\.type: "):
        validate({"type": "regex", "name": "x"})
    with pytest.raises(GraderError, match=r"^grader\.reference: is required"):
        validate({"type": "string_check", "name": "x", "input": "a", "operation": "eq"})
    with pytest.raises(GraderError, match=r"^grader\.pass_threshold: is not a field of a string_check"):
        validate({**check("eq"), "pass_threshold": 1})
    with pytest.raises(GraderError, match=r"^grader\.name: "):
        validate({**check("eq"), "name": ""})
    assert validate(check("eq")) == check("eq")


# ---- text_similarity ----------------------------------------------------------------------------

def similar(metric: str, **extra) -> dict:
    return {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
            "reference": "{{ item.reference }}", "evaluation_metric": metric, **extra}


def test_fuzzy_match_is_rapidfuzz_ratio() -> None:
    # rapidfuzz's documented example: fuzz.ratio("this is a test", "this is a test!") == 96.55...
    assert fuzzy_ratio("this is a test", "this is a test!") == pytest.approx(0.9655172413793104)
    assert lcs_length("ABCBDAB", "BDCABA") == 4 and lcs_length("", "abc") == 0
    assert fuzzy_ratio("", "") == 1.0 and fuzzy_ratio("abc", "") == 0.0
    result = grade(similar("fuzzy_match", pass_threshold=0.9), "this is a test", {"reference": "this is a test!"})
    assert result.ok and result.reward == pytest.approx(0.9655172) and result.passed is True


@pytest.mark.parametrize("metric", ["bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                                    "rouge_l", "fuzzy_match"])
def test_similarity_metrics_score_identical_text_1_and_unrelated_text_low(metric: str) -> None:
    text = "the quick brown fox jumps over the lazy dog near the river bank"
    same = grade(similar(metric), text, {"reference": text})
    other = grade(similar(metric), "completely different words here", {"reference": text})
    assert same.ok and same.reward == pytest.approx(1.0)
    assert other.ok and 0.0 <= other.reward < 0.5  # characters in common still count for fuzzy_match


def test_rouge_and_bleu_values() -> None:
    item = {"reference": "the cat is on the mat"}
    rouge1 = grade(similar("rouge_1"), "the cat sat on the mat", item)
    assert rouge1.reward == pytest.approx(5 / 6)  # 5 of 6 unigrams shared, both sides
    bleu = grade(similar("bleu"), "the cat sat on the mat", item)
    import sacrebleu

    assert bleu.reward == pytest.approx(sacrebleu.sentence_bleu("the cat sat on the mat", [item["reference"]]).score
                                        / 100)


def test_meteor_and_cosine_are_refused_when_they_cannot_be_computed_here() -> None:
    if not wordnet_available():
        with pytest.raises(GraderError, match=r"grader\.evaluation_metric: meteor needs NLTK's WordNet"):
            validate(similar("meteor"))
    with pytest.raises(GraderError, match=r"grader\.evaluation_metric: cosine needs an embedding model"):
        validate(similar("cosine"))

    def embed(texts):  # a fake embedding: letter counts
        return [[t.count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts]

    assert validate(similar("cosine"), embed=embed)["evaluation_metric"] == "cosine"
    result = grade(similar("cosine"), "abc", {"reference": "abc"}, embed=embed)
    assert result.ok and result.reward == pytest.approx(1.0)


# ---- python graders -----------------------------------------------------------------------------

GOOD = """
import json
def grade(sample, item):
    answer = sample["output_json"]["answer"] if sample["output_json"] else sample["output_text"]
    return 1.0 if answer == item["reference"] else 0.25
"""


def test_python_grader_gets_sample_and_item() -> None:
    assert grade(python(GOOD), '{"answer": "42"}', {"reference": "42"}, limits=FAST).reward == 1.0
    result = grade(python(GOOD), "41", {"reference": "42"}, limits=FAST)
    assert result.ok and result.reward == 0.25 and result.execution_time > 0


@pytest.mark.parametrize(("source", "flag", "message"), [
    ("def grade(sample, item):\n    return 1 / 0\n", "python_grader_runtime_error", "ZeroDivisionError"),
    ("def grade(sample, item):\n    return 'high'\n", "python_grader_runtime_error", "not a number"),
    ("def grade(sample, item):\n    return float('nan')\n", "python_grader_runtime_error", "not a finite number"),
    ("import sys\ndef grade(sample, item):\n    sys.exit(3)\n", "python_grader_runtime_error", "SystemExit"),
    ("import os\ndef grade(sample, item):\n    os._exit(4)\n", "python_grader_runtime_error", "exited with code 4"),
])
def test_python_grader_failures_are_flags(source: str, flag: str, message: str) -> None:
    result = grade(python(source), "x", {}, limits=FAST)
    assert result.reward == 0.0 and flags(result) == [flag] and message in result.message
    assert result.errors["python_grader_runtime_error_details"]


def test_python_grader_validation() -> None:
    with pytest.raises(GraderError, match=r"grader\.source: is not valid Python"):
        validate(python("def grade(:"))
    with pytest.raises(GraderError, match=r"grader\.source: must define a top-level function grade"):
        validate(python("def score(sample, item):\n    return 1\n"))
    with pytest.raises(GraderError, match=r"grader\.source: grade must take two arguments"):
        validate(python("def grade(sample):\n    return 1\n"))
    with pytest.raises(GraderError, match=r"grader\.source: is \d+ bytes; python graders must be under 256 kB"):
        validate(python("def grade(sample, item):\n    return 1\n" + "#" * (256 * 1024)))
    assert validate({**python(GOOD), "image_tag": "2025-05-08"})["image_tag"] == "2025-05-08"


LOOP = "def grade(sample, item):\n    while True:\n        pass\n"
ALLOCATE = "def grade(sample, item):\n    hoard = []\n    while True:\n        hoard.append(bytearray(16 << 20))\n"
SOCKET = ("import socket\ndef grade(sample, item):\n"
          "    socket.create_connection(('93.184.216.34', 80), timeout=1)\n    return 1.0\n")
RAW_SOCKET = "import _socket\ndef grade(sample, item):\n    _socket.socket()\n    return 1.0\n"
SOCKET_TYPE = ("import socket\ndef grade(sample, item):\n"  # the C type itself, past the patched names
               "    s = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
               "    s.connect(('93.184.216.34', 80))\n    return 1.0\n")


def test_python_sandbox_stops_a_loop_an_allocation_and_sockets_each_alone() -> None:
    started = time.perf_counter()
    loop = grade(python(LOOP), "x", {}, limits=FAST)
    assert flags(loop) == ["unresponsive_reward_error"] and "within 2 s" in loop.message
    assert time.perf_counter() - started < 4.0

    started = time.perf_counter()
    hog = grade(python(ALLOCATE), "x", {}, limits=FAST)
    assert flags(hog) == ["python_grader_runtime_error"] and "MemoryError" in hog.message
    assert time.perf_counter() - started < 4.0

    for source in (SOCKET, RAW_SOCKET, SOCKET_TYPE):
        net = grade(python(source), "x", {}, limits=FAST)
        assert flags(net) == ["python_grader_runtime_error"], net.message
        assert "network access is disabled" in net.message

    # nothing else was affected: the next grading works, and this process still has its network
    assert grade(python(GOOD), "42", {"reference": "42"}, limits=FAST).reward == 1.0


def test_bad_graders_fail_alone_among_concurrent_gradings() -> None:
    jobs = [(LOOP, None), (GOOD, 1.0), (ALLOCATE, None), (GOOD, 1.0), (SOCKET, None), (GOOD, 1.0)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: grade(python(job[0]), "42", {"reference": "42"}, limits=FAST), jobs))
    for (_, expected), result in zip(jobs, results):
        if expected is None:
            assert not result.ok and result.reward == 0.0
        else:
            assert result.ok and result.reward == expected


def test_python_grader_runs_in_a_fresh_directory_with_a_bare_environment() -> None:
    source = ("import os, sys\ndef grade(sample, item):\n"
              "    assert os.listdir('.') == [], os.listdir('.')\n"
              "    assert 'FINESMITH_HOME' not in os.environ and os.environ['HOME'] == os.getcwd()\n"
              "    assert sys.flags.isolated\n"
              "    return 1.0\n")
    result = grade(python(source), "x", {}, limits=FAST)
    assert result.ok, result.message


# ---- model graders ------------------------------------------------------------------------------

class FakeJudge:
    """Answers with the replies given, records what it was asked."""

    def __init__(self, *replies) -> None:
        self.replies, self.calls = list(replies), []

    def __call__(self, model, messages, sampling):
        self.calls.append((model, messages, sampling))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def score_model(**extra) -> dict:
    return {"type": "score_model", "name": "judge", "model": "tiny-judge", "input": [
        {"role": "developer", "content": "Score the answer from 1 to 5."},
        {"role": "user", "content": [{"type": "input_text", "text": "Q: {{ item.question }}"},
                                     {"type": "input_text", "text": "A: {{ sample.output_text }}"}]}],
        "range": [1, 5], **extra}


def test_score_model_asks_the_judge_and_parses_its_score() -> None:
    judge = FakeJudge({"text": '{"steps": [], "result": 4}', "usage": {"prompt_tokens": 30, "completion_tokens": 5}})
    result = grade(score_model(pass_threshold=3, sampling_params={"temperature": 0, "max_completions_tokens": 64}),
                   "Paris", {"question": "Capital of France?"}, chat=judge)
    assert result.ok and result.reward == 4.0 and result.passed is True
    model, messages, sampling = judge.calls[0]
    assert model == "tiny-judge"
    assert messages == [{"role": "system", "content": "Score the answer from 1 to 5."},
                        {"role": "user", "content": "Q: Capital of France?\nA: Paris"}]
    assert sampling["temperature"] == 0 and sampling["max_tokens"] == 64
    assert sampling["response_format"]["json_schema"]["schema"]["properties"]["result"] == {"type": "number"}
    response = result.run_response()
    assert response["metadata"]["sampled_model_name"] == "tiny-judge"
    assert response["metadata"]["token_usage"]["total_tokens"] == 35
    assert response["model_grader_token_usage_per_model"]["tiny-judge"]["prompt_tokens"] == 30


@pytest.mark.parametrize(("reply", "reward", "flag"), [
    ("3.5", 3.5, None),
    ('```json\n{"result": 2}\n```', 2.0, None),
    ('{"result": 9}', 0.0, "model_grader_parse_error"),
    ("I think it is quite good", 0.0, "model_grader_parse_error"),
    (RuntimeError("engine overloaded"), 0.0, "model_grader_server_error"),
    ({"refusal": "I cannot grade this"}, 0.0, "model_grader_refusal_error"),
])
def test_score_model_replies(reply, reward: float, flag: str | None) -> None:
    result = grade(score_model(), "x", {"question": "q"}, chat=FakeJudge(reply))
    assert result.reward == reward and flags(result) == ([flag] if flag else [])
    if flag == "model_grader_server_error":
        assert result.errors["model_grader_server_error_details"] == "engine overloaded"


def label_model() -> dict:
    return {"type": "label_model", "name": "tone", "model": "tiny-judge",
            "input": [{"role": "user", "content": "Tone of: {{ sample.output_text }}"}],
            "labels": ["positive", "neutral", "negative"], "passing_labels": ["positive", "neutral"]}


@pytest.mark.parametrize(("reply", "reward", "passed", "flag"), [
    ('{"steps": [], "result": "positive"}', 1.0, True, None),
    ("negative", 0.0, False, None),
    ('"Neutral"', 1.0, True, None),
    ("furious", 0.0, False, "model_grader_parse_error"),
])
def test_label_model(reply: str, reward: float, passed: bool, flag: str | None) -> None:
    judge = FakeJudge(reply)
    result = grade(label_model(), "great!", {}, chat=judge)
    assert result.reward == reward and result.passed is passed and flags(result) == ([flag] if flag else [])
    schema = judge.calls[0][2]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["result"]["enum"] == ["positive", "neutral", "negative"]


def test_model_grader_validation() -> None:
    with pytest.raises(GraderError, match=r"grader\.passing_labels: 'great' is not one of labels"):
        validate({**label_model(), "passing_labels": ["great"]})
    with pytest.raises(GraderError, match=r"grader\.model: 'tiny-judge' is not a model this server serves"):
        validate(label_model(), models={"other"})
    with pytest.raises(GraderError, match=r"grader\.range: must have low < high"):
        validate(score_model(range=[5, 1]))
    with pytest.raises(GraderError, match=r"grader\.input\.0\.content\.0\.type: input_image is not supported"):
        validate({**label_model(), "input": [{"role": "user", "content": [{"type": "input_image",
                                                                           "image_url": "x"}]}]})
    with pytest.raises(GraderError, match=r"grader\.sampling_params\.top_k: is not a sampling parameter"):
        validate(score_model(sampling_params={"top_k": 3}))
    assert validate(score_model())["sampling_params"] == {}
    assert validate({**score_model(), "range": None})["range"] == [0.0, 1.0]
    no_judge = grade(label_model(), "x", {})
    assert flags(no_judge) == ["model_grader_server_error"]


# ---- multi --------------------------------------------------------------------------------------

PY_LENGTH = "def grade(sample, item):\n    return min(1.0, len(sample['output_text']) / 20)\n"


def multi(calculate: str, **graders) -> dict:
    graders = graders or {
        "exact": check("ilike"),
        "close": similar("fuzzy_match"),
        "length": python(PY_LENGTH, "length"),
    }
    return {"type": "multi", "name": "combo", "graders": graders, "calculate_output": calculate}


def test_multi_combines_string_check_similarity_and_python() -> None:
    item = {"answer": "Paris", "reference": "The capital is Paris"}
    result = grade(multi("0.5 * exact + 0.3 * close + 0.2 * length"), "The capital is Paris", item, limits=FAST)
    assert result.ok, result.message
    assert result.sub_rewards == {"exact": 1.0, "close": 1.0, "length": 1.0}
    assert result.reward == pytest.approx(1.0)
    partial = grade(multi("min(exact, close) + max(length, 0) ^ 2 / 4"), "Rome", item, limits=FAST)
    expected = min(0.0, fuzzy_ratio("Rome", item["reference"])) + (4 / 20) ** 2 / 4
    assert partial.ok and partial.reward == pytest.approx(expected)
    response = partial.run_response()
    assert response["sub_rewards"]["length"] == pytest.approx(0.2) and response["metadata"]["type"] == "multi"


def test_multi_errors() -> None:
    with pytest.raises(GraderError, match=r"grader\.calculate_output: uses 'nope', which is not a sub-grader"):
        validate(multi("exact + nope"))
    with pytest.raises(GraderError, match=r"grader\.calculate_output: calls '__import__"):
        validate(multi("__import__('os').system('true')"))
    with pytest.raises(GraderError, match=r"grader\.graders\.inner\.type: a multi grader cannot contain"):
        validate(multi("inner", inner=multi("exact")))
    with pytest.raises(GraderError, match=r"grader\.graders\.exact\.operation"):
        validate(multi("exact", exact=check("bad")))
    log_zero = grade(multi("log(exact)", exact=check("eq")), "Rome", {"answer": "Paris"})
    assert flags(log_zero) == ["formula_parse_error"] and "undefined" in log_zero.message
    broken = grade(multi("exact + failing", exact=check("eq"), failing=python("def grade(s, i):\n    1/0\n")),
                   "Paris", {"answer": "Paris"}, limits=FAST)
    assert broken.reward == 0.0 and flags(broken) == ["python_grader_runtime_error"]
    assert broken.sub_rewards == {"exact": 1.0, "failing": 0.0} and broken.message.startswith("failing: ")


@pytest.mark.parametrize("text", ["a.__class__", "a if b else 1", "[a]", "a < b", "a % 2", "a // 2", "'x'",
                                  "f(a)", "min(a)", "abs(a, b)", "a; b", "(lambda: 1)()", "True", "a ^^ b"])
def test_formula_refuses_everything_but_arithmetic(text: str) -> None:
    with pytest.raises(formula.FormulaError):
        formula.parse(text, {"a", "b"})


def test_formula_arithmetic() -> None:
    values = {"a": 0.25, "b": 4.0}
    cases = {"a + b * 2": 8.25, "(a + b) / 2": 2.125, "b ^ 2": 16.0, "b ** 0.5": 2.0, "-b ^ 2": -16.0,
             "abs(-a) + floor(1.7) + ceil(1.2)": 3.25, "exp(0) + sqrt(b) + log(b, 2) + log(1)": 5.0,
             "max(a, b, 3) - min(a, b)": 3.75}
    for text, expected in cases.items():
        assert formula.evaluate(formula.parse(text, values), values) == pytest.approx(expected), text
    for text in ("b / (a - 0.25)", "sqrt(-b)", "10 ^ 400", "(-b) ^ 0.5"):
        with pytest.raises(formula.FormulaError):
            formula.evaluate(formula.parse(text, values), values)


# ---- results and the reward adapter -------------------------------------------------------------

def test_run_response_has_every_hosted_error_field() -> None:
    response = grade(check("eq"), "Paris", {"answer": "Paris"}).run_response()
    assert set(response) == {"reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"}
    assert set(response["metadata"]) == {"name", "type", "errors", "execution_time", "scores", "token_usage",
                                         "sampled_model_name"}
    assert response["metadata"]["errors"] == no_errors() and len(no_errors()) == 14


def test_reward_from_grader_is_a_grpo_reward() -> None:
    from finesmith.train.rewards import RewardScorer

    errors: list[str] = []
    grader = multi("0.5 * exact + 0.5 * length", exact=check("ilike", reference="{{ item.reference }}"),
                   length=python(PY_LENGTH, "length"))
    reward = reward_from_grader(grader, weight=2.0, limits=FAST, on_error=errors.append)
    assert reward.name == "multi:combo" and reward.weight == 2.0 and not reward.isolated
    assert reward("What is the capital?", "It is paris, of course", {"reference": "Paris"}, "data.jsonl:1") == 1.0
    scores = RewardScorer([reward], timeout=10).score([
        ("q", "Paris", {"reference": "Paris"}, "data.jsonl:1"),
        ("q", "Rome", {"reference": "Paris"}, "data.jsonl:2"),
        ("q", "Paris", {}, "data.jsonl:3"),  # no reference field: an error flag, reward 0, the run goes on
    ])
    assert scores[0][0] == pytest.approx(0.5 + 0.5 * 5 / 20)
    assert scores[1][0] == pytest.approx(0.5 * 4 / 20)
    assert scores[2][0] == 0.0 and errors and "item.reference" in errors[-1]
    prompt_aware = reward_function(check("like", reference="{{ item.prompt }}"))
    assert prompt_aware(prompt="echo", completion="echo echo") == 1.0
    assert math.isfinite(prompt_aware(prompt="x", completion="y"))


def test_without_a_network_namespace_programs_cannot_be_started_either() -> None:
    bare = PythonLimits(timeout_s=2.0, memory_mb=384, network_namespace=False)
    for source in (SOCKET, RAW_SOCKET, SOCKET_TYPE):
        result = grade(python(source), "x", {}, limits=bare)
        assert flags(result) == ["python_grader_runtime_error"] and "network access is disabled" in result.message
    spawn = ("import subprocess\ndef grade(sample, item):\n"
             "    subprocess.run(['curl', 'http://93.184.216.34'])\n    return 1.0\n")
    result = grade(python(spawn), "x", {}, limits=bare)
    assert flags(result) == ["python_grader_runtime_error"] and "subprocess.Popen is disabled" in result.message
    assert grade(python(GOOD), "42", {"reference": "42"}, limits=bare).reward == 1.0


def test_with_a_network_namespace_programs_the_grader_starts_have_no_network() -> None:
    from finesmith.graders.python_grader import _netns_available

    if not _netns_available():
        pytest.skip("this machine cannot make network namespaces (needs root or unprivileged user namespaces)")
    source = ("import subprocess, sys\ndef grade(sample, item):\n"
              "    code = \"import socket; socket.create_connection(('93.184.216.34', 80), timeout=2)\"\n"
              "    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)\n"
              "    assert done.returncode != 0 and 'OSError' in done.stderr, done.stderr\n"
              "    return 1.0\n")
    result = grade(python(source), "x", {}, limits=FAST)
    assert result.ok and result.reward == 1.0, result.message


def test_sandboxes_started_in_advance_serve_one_grading_each() -> None:
    from finesmith.graders.python_grader import close_spares

    warm = PythonLimits(timeout_s=2.0, memory_mb=384, prestart=1)
    counter = ("import os\ndef grade(sample, item):\n"
               "    first = not os.path.exists('mark')\n    open('mark', 'w').close()\n"
               "    return 1.0 if first else 0.0\n")  # a sandbox used twice would see its own mark
    try:
        for _ in range(3):
            assert grade(python(counter), "x", {}, limits=warm).reward == 1.0
            time.sleep(0.2)  # the spare is started again meanwhile
        assert flags(grade(python(LOOP), "x", {}, limits=warm)) == ["unresponsive_reward_error"]
        assert grade(python(GOOD), "42", {"reference": "42"}, limits=warm).reward == 1.0
    finally:
        close_spares()


def test_where_namespaces_can_be_made_the_grader_sees_no_other_process_and_leaves_none() -> None:
    from finesmith.graders.python_grader import _netns_available

    if not _netns_available():
        pytest.skip("this machine cannot make namespaces (needs root or unprivileged user namespaces)")
    marker = f"finesmith-grader-daemon-{time.monotonic_ns()}"
    source = ("import os, subprocess, sys\ndef grade(sample, item):\n"
              "    assert os.getpid() == 1 and [p for p in os.listdir('/proc') if p.isdigit()] == ['1']\n"
              "    caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
              "    assert os.geteuid() != 0 or caps.split()[1] == '0000000000000000', caps\n"
              f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'],\n"
              "                     start_new_session=True)  # tries to outlive the grading\n"
              "    return 1.0\n")
    result = grade(python(source), "x", {}, limits=FAST)
    assert result.ok, result.message
    time.sleep(0.3)
    import subprocess

    assert marker not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
