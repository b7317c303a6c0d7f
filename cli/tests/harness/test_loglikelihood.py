"""The evaluation harness (lm-evaluation-harness) against `tramontane serve`
through its own OpenAI completions model class (`local-completions`): the
loglikelihood requests of multiple-choice tasks (`echo`, `logprobs`, token
prompts), on a small task written here (no download), against transformers'
loglikelihoods on the same checkpoint in f32.

TRAMONTANE_HTTP is the server's `host:port`, TRAMONTANE_MODEL_NAME its served
name, TRAMONTANE_MODEL_DIR the checkpoint (the harness's tokenizer and
transformers' model are read from it).
"""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager

# The served model and transformers compute in f32: only the order of the
# sums differs.
TOLERANCE = 1e-3

QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " the moon"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin"], 0),
    ("One, two, three,", [" four", " five", " eleven", " many more"], 0),
    ("The north wind blows over the", [" sea", " hills and the long valleys below"], 0),
]


@pytest.fixture(scope="module")
def lm():
    return LocalCompletionsAPI(
        base_url=f"http://{os.environ['TRAMONTANE_HTTP']}/v1/completions",
        model=os.environ["TRAMONTANE_MODEL_NAME"],
        tokenizer=os.environ["TRAMONTANE_MODEL_DIR"],
        tokenizer_backend="huggingface",
        batch_size=2,
        max_retries=1,
    )


@pytest.fixture(scope="module")
def reference():
    """Transformers' (loglikelihood, is_greedy) of a continuation's ids after the context's."""
    model = AutoModelForCausalLM.from_pretrained(
        os.environ["TRAMONTANE_MODEL_DIR"], torch_dtype=torch.float32
    ).eval()

    def score(context, continuation):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        rows = logprobs[len(context) - 1 : -1]
        targets = torch.tensor(continuation)
        total = rows.gather(1, targets[:, None]).sum().item()
        greedy = bool((rows.argmax(dim=-1) == targets).all())
        return total, greedy

    return score


def assert_matches(lm, reference, pairs, got):
    assert len(got) == len(pairs)
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, got):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        want, want_greedy = reference(context_ids, continuation_ids)
        assert abs(loglikelihood - want) < TOLERANCE, (context, continuation, loglikelihood, want)
        assert greedy == want_greedy, (context, continuation)


def test_loglikelihood_requests_match_transformers(lm, reference):
    pairs = [(q, choice) for q, choices, _ in QUESTIONS for choice in choices]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(pairs)
    ]
    assert_matches(lm, reference, pairs, lm.loglikelihood(requests))


def test_a_multiple_choice_task_runs_and_matches_transformers(lm, reference, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(
        json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n"
        for q, choices, answer in QUESTIONS
    ))
    (tmp_path / "task.yaml").write_text(f"""
task: tramontane_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    results = simple_evaluate(
        model=lm,
        tasks=["tramontane_local_choice"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    accuracy = results["results"]["tramontane_local_choice"]["acc,none"]
    samples = results["samples"]["tramontane_local_choice"]
    assert len(samples) == len(QUESTIONS)
    expected_correct = 0
    for sample in samples:
        pairs = [tuple(args) for args in sample["arguments"]]
        got = [tuple(resp[0]) for resp in sample["resps"]]
        assert_matches(lm, reference, pairs, got)
        scores = [score for score, _ in got]
        expected_correct += scores.index(max(scores)) == sample["target"]
    assert accuracy == pytest.approx(expected_correct / len(QUESTIONS))
