"""Request decoding, checks and SamplingParams mapping of the OpenAI schemas."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from outrider.cluster import openai_protocol as op

MAX_LEN = 2048


def comp(**body: Any) -> op.CompletionRequest:
    return op.decode_request(json.dumps(body).encode(), op.CompletionRequest)


def chat(**body: Any) -> op.ChatCompletionRequest:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return op.decode_request(json.dumps(body).encode(), op.ChatCompletionRequest)


def error(fn: Any, *args: Any, **kwargs: Any) -> op.OpenAIError:
    with pytest.raises(op.OpenAIError) as exc:
        fn(*args, **kwargs)
    return exc.value


def test_unknown_fields_are_ignored_and_defaults_apply() -> None:
    req = comp(prompt="hi", logit_bias={"1": 2}, suffix=None, whatever=[1, 2])
    assert op.completion_prompt(req) == "hi"
    p = op.sampling_params(req, n_prompt=3, max_model_len=MAX_LEN)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (16, 1.0, 1.0, -1, [])


def test_null_fields_mean_defaults() -> None:
    req = comp(prompt="hi", temperature=None, top_p=None, max_tokens=None, stop=None, n=None)
    p = op.sampling_params(req, n_prompt=3, max_model_len=MAX_LEN)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 1.0, 16)


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b'{"prompt": "x", "temperature": "hot"}', "temperature", "`temperature`"),
        (b'{"prompt": "x", "max_tokens": 1.5}', "max_tokens", "expected `int | null`"),
        (b'{"prompt": "x", "stream": "yes"}', "stream", "`stream`"),
        (b'{"prompt": {"a": 1}}', "prompt", "`prompt`"),
        (b"[1, 2]", None, "expected `object`"),
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
    ],
)
def test_decode_errors_name_the_field(body: bytes, param: str | None, needle: str) -> None:
    err = error(op.decode_request, body, op.CompletionRequest)
    assert err.status == 400 and err.param == param and needle in err.message, err.message


def test_nested_type_error_names_the_path() -> None:
    body = b'{"messages": [{"role": "user", "content": 5}]}'
    err = error(op.decode_request, body, op.ChatCompletionRequest)
    assert err.param == "messages" and "`messages[0].content`" in err.message


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("text", "text"), ([1, 2, 3], [1, 2, 3]), (["one"], "one"), ([[4, 5]], [4, 5])],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert op.completion_prompt(comp(prompt=prompt)) == expected


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        (None, "`prompt` is required"),
        ([], "must not be empty"),
        (["a", "b"], "only one prompt per request is supported, got 2"),
        ([[1], [2]], "only one prompt per request is supported, got 2"),
        ([1, "a"], "`prompt` must be a string"),
    ],
)
def test_bad_prompts(prompt: Any, needle: str) -> None:
    body = {} if prompt is None else {"prompt": prompt}
    err = error(op.completion_prompt, comp(**body))
    assert err.param == "prompt" and needle in err.message


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"n": 2}, "n", "`n` must be 1, got 2"),
        ({"echo": True}, "echo", "`echo` must be false"),
        ({"logprobs": 1}, "logprobs", "`logprobs` must be null"),
        ({"best_of": 2}, "best_of", "`best_of` must be 1"),
        ({"presence_penalty": 0.5}, "presence_penalty", "must be 0"),
        ({"frequency_penalty": -1}, "frequency_penalty", "must be 0"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when"),
    ],
)
def test_unsupported_options(body: dict[str, Any], param: str, needle: str) -> None:
    err = error(op.completion_prompt, comp(prompt="x", **body))
    assert err.param == param and needle in err.message


def test_supported_option_values_pass() -> None:
    req = comp(prompt="x", n=1, echo=False, presence_penalty=0, frequency_penalty=0.0, user="u")
    assert op.completion_prompt(req) == "x"


def test_chat_messages_and_text_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": parts}])
    assert op.chat_messages(req) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb"},
    ]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    err = error(op.chat_messages, chat(messages=[{"role": "user", "content": image}]))
    assert err.param == "messages" and "`image_url`" in err.message
    assert error(op.chat_messages, chat(messages=[])).param == "messages"
    err = error(op.chat_messages, chat(logprobs=True))
    assert err.param == "logprobs"


def test_chat_max_tokens_fills_the_context_and_alias_wins() -> None:
    assert op.sampling_params(chat(), n_prompt=48, max_model_len=MAX_LEN).max_tokens == 2000
    req = chat(max_tokens=7, max_completion_tokens=5)
    assert op.sampling_params(req, n_prompt=48, max_model_len=MAX_LEN).max_tokens == 5


def test_sampling_mapping() -> None:
    req = comp(
        prompt="x",
        temperature=0,
        top_p=0.5,
        top_k=0,
        seed=7,
        max_tokens=3,
        stop="END",
        stop_token_ids=[2],
        ignore_eos=True,
    )
    p = op.sampling_params(req, n_prompt=3, max_model_len=MAX_LEN)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.0, 0.5, -1, 7, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == (["END"], [2], True)
    assert op.sampling_params(comp(top_k=40), n_prompt=3, max_model_len=MAX_LEN).top_k == 40


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"temperature": -1}, "temperature", "`temperature` must be >= 0, got -1.0"),
        ({"top_p": 1.5}, "top_p", "`top_p` must be in (0, 1], got 1.5"),
        ({"top_p": 0}, "top_p", "`top_p` must be in (0, 1], got 0.0"),
        ({"max_tokens": 0}, "max_tokens", "`max_tokens` must be > 0, got 0"),
        ({"max_tokens": -3}, "max_tokens", "`max_tokens` must be > 0, got -3"),
        ({"seed": 2**70}, "seed", f"`seed` must fit in 64 bits, got {2**70}"),
        ({"stop": ["a", ""]}, "stop", "`stop` strings must not be empty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "`stop_token_ids` must be >= 0, got -1"),
    ],
)
def test_out_of_range_fields(body: dict[str, Any], param: str, message: str) -> None:
    err = error(op.sampling_params, comp(prompt="x", **body), n_prompt=3, max_model_len=MAX_LEN)
    assert (err.status, err.param, err.message) == (400, param, message)


def test_context_length_errors_name_both_numbers() -> None:
    err = error(op.sampling_params, comp(max_tokens=2000), n_prompt=100, max_model_len=MAX_LEN)
    assert err.param == "max_tokens"
    assert err.message.startswith("This model's maximum context length is 2048 tokens.")
    assert "2100 tokens (100 in the prompt, 2000 in the completion)" in err.message
    err = error(op.sampling_params, chat(), n_prompt=MAX_LEN, max_model_len=MAX_LEN)
    assert err.param == "messages" and "2048" in err.message
    err = error(op.sampling_params, comp(), n_prompt=0, max_model_len=MAX_LEN)
    assert err.param == "prompt" and "empty" in err.message


def test_error_and_response_shapes() -> None:
    err = op.OpenAIError("nope", status=404, type="NotFoundError", param="model")
    assert msgspec.json.decode(op.encode(err.body())) == {
        "error": {"message": "nope", "type": "NotFoundError", "param": "model", "code": 404}
    }
    fmt = op.ChatFormat("m")
    head = msgspec.to_builtins(fmt.head()[0])
    assert head["object"] == "chat.completion.chunk" and head["id"].startswith("chatcmpl-")
    assert head["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = msgspec.to_builtins(fmt.chunk("", "stop", None))
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    usage = msgspec.to_builtins(fmt.usage_chunk(op.Usage.of(3, 4)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    full = msgspec.to_builtins(op.CompletionFormat("m").response("hi", "length", op.Usage.of(1, 2)))
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    assert full["choices"][0]["text"] == "hi" and full["usage"]["completion_tokens"] == 2
