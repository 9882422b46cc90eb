"""The OpenAI dialect the server reads: request bodies as validated models (every field of OpenAI's
and vLLM's request models, accepted at values that do not change the answer and refused by name
otherwise), chat rendering (the model's template or the plain one), stop strings and error shapes.
Pure: no HTTP, no model."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from ponderlm.errors import DataError, utf8_problem

CHAT_ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system


MAX_STOP_CHARS = 256  # the longest stop string (each token checks every prefix of every stop string)
MAX_STOPS = 64  # stop strings per request: vLLM has no fixed cap; lm-eval sends a task's `until` strings and EOS
MAX_LOGPROBS = 20  # completions `logprobs` (top-k alternatives): vLLM's default --max-logprobs (OpenAI's is 5)


def _same(v, x) -> bool:
    if isinstance(v, bool) or isinstance(x, bool):  # false is not 0, true is not 1
        return type(v) is type(x) and v == x
    return v == x


def _only(*values, text: str):
    """A neutral-value rule: the field is honoured (the answer unchanged) only at ``values`` (or null)."""
    return (lambda v: any(_same(v, x) for x in values)), text


def _empty(text: str = "empty or null"):
    return lambda v: not v, text


_ANY = None  # any value: the field does not change the answer (accounting, caching or routing hints)

# Fields of OpenAI's and vLLM's request models that this server takes only at values that do not change
# the answer (null always); any other value is a 400 naming the field, never silently ignored. _ANY:
# accepted at every value. Fields with a meaning here (model, prompt, messages, max_tokens, temperature,
# top_p, seed, stop, stream, stream_options, ignore_eos, skip_special_tokens, add_special_tokens, ...) are
# declared on the models below.
NEUTRAL_COMMON = {
    # OpenAI
    "frequency_penalty": _only(0, text="0"),
    "presence_penalty": _only(0, text="0"),
    "logit_bias": _empty("{} (no bias)"),
    "n": _only(1, text="1 (one choice per request)"),
    "user": _ANY,
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    # vLLM's sampling and extra parameters
    "use_beam_search": _only(False, text="false"),
    "top_k": _only(0, -1, text="0 or -1 (no top-k cut)"),
    "min_p": _only(0, text="0"),
    "repetition_penalty": _only(1, text="1"),
    "watermarking": _only(False, text="false"),
    "length_penalty": _only(1, text="1 (it acts on beam search only)"),
    "stop_token_ids": _empty("[]"),
    "include_stop_str_in_output": _only(False, text="false"),
    "min_tokens": _only(0, text="0"),
    "spaces_between_special_tokens": _ANY,  # the tokenizers library's decoding has no such option
    "truncate_prompt_tokens": _only(text="null"),
    "truncation_side": _ANY,  # acts only with truncate_prompt_tokens
    "allowed_token_ids": _only(text="null"),
    "logprob_token_ids": _only(text="null"),
    "bad_words": _empty("[]"),
    "prompt_embeds": _only(text="null"),
    "structured_outputs": _only(text="null"),
    "guided_json": _only(text="null"),
    "guided_regex": _only(text="null"),
    "guided_choice": _only(text="null"),
    "guided_grammar": _only(text="null"),
    "guided_decoding_backend": _ANY,
    "guided_whitespace_pattern": _ANY,
    "logits_processors": _empty("[]"),
    "priority": _only(0, text="0"),
    "request_id": _ANY,
    "session_id": _ANY,
    "return_tokens_as_token_ids": _only(False, text="false"),
    "return_token_ids": _only(False, text="false"),
    "routed_experts_prompt_start": _ANY,
    "return_token_offsets": _ANY,  # vLLM's render endpoints only
    "return_mm_kwargs": _ANY,  # vLLM's render endpoints only
    "cache_salt": _ANY,  # salts a prefix cache; this server has none
    "kv_transfer_params": _empty("null"),
    "ec_transfer_params": _empty("null"),
    "vllm_xargs": _empty("{}"),
    "repetition_detection": _only(text="null"),
    "thinking_token_budget": _only(-1, text="-1 (unlimited)"),
    "stream_interval": _ANY,  # how tokens are grouped into chunks, not what they are
}
NEUTRAL_COMPLETION = {
    "best_of": _only(1, text="1"),
    "suffix": _empty('"" or null'),
}
NEUTRAL_CHAT = {
    "audio": _only(text="null"),
    "function_call": _only("none", text='"none"'),
    "functions": _empty("[]"),
    "metadata": _ANY,
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "moderation": _only(text="null"),
    "parallel_tool_calls": _ANY,  # acts only with tools
    "prediction": _ANY,  # predicted outputs change the latency, not the answer
    "prompt_cache_key": _ANY,
    "prompt_cache_retention": _ANY,
    "prompt_cache_options": _ANY,
    "reasoning_effort": _only("none", text='"none"'),
    "safety_identifier": _ANY,
    "service_tier": _ANY,
    "store": _ANY,
    "tool_choice": _only("none", text='"none"'),
    "tools": _empty("[]"),
    "verbosity": _only(text="null"),
    "web_search_options": _only(text="null"),
    "echo": _only(False, text="false"),
    "documents": _empty("[]"),
    "chat_template": _only(text="null"),
    "chat_template_kwargs": _empty("{}"),
    "media_io_kwargs": _empty("{}"),
    "mm_processor_kwargs": _empty("{}"),
    "include_reasoning": _ANY,  # no reasoning is ever produced
    "return_prompt_text": _only(False, text="false"),
}


def unsupported(body: BaseModel, table: dict) -> None:
    """A 400 naming the first field of ``table`` set to a value this server cannot honour."""
    for name, rule in table.items():
        v = getattr(body, name, None)
        if v is None or rule is None:
            continue
        ok, text = rule
        if not ok(v):
            shown = json.dumps(v)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            also = "" if "null" in text else " (or null)"
            raise ApiError(400, f"{name}: {shown} is not supported; this server takes only {text}{also}",
                           param=name)  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk (not supported)
    include_obfuscation: bool | None = None  # OpenAI: random padding against side channels; none is sent


class BodyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: completions with echo only (the prompt scored)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy; null: 1
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension (vLLM's too): generate exactly max_tokens tokens (load tests)
    skip_special_tokens: bool | None = None  # vLLM: drop special tokens from the text (default: keep them)
    add_special_tokens: bool | None = None  # add what the tokenizer's post-processor adds (default: nothing)

    # the neutral-only fields (NEUTRAL_COMMON): typed loosely, checked by value in unsupported()
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    use_beam_search: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    watermarking: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    min_tokens: int | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob, rank and top-k (not streamed)
    logprob_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_embeds: Any = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    logits_processors: list[Any] | None = None
    priority: int | None = None
    request_id: str | None = None
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    routed_experts_prompt_start: int | None = None
    return_token_offsets: bool | None = None
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    stream_interval: int | None = Field(None, ge=1)

    NEUTRAL: ClassVar[dict] = NEUTRAL_COMMON

    def check(self) -> None:
        """Fill the defaults of fields sent as null, and refuse what this server cannot honour."""
        if self.temperature is None:
            self.temperature = 1.0
        if self.top_p is None:
            self.top_p = 1.0
        self.stream = bool(self.stream)
        self.ignore_eos = bool(self.ignore_eos)
        unsupported(self, self.NEUTRAL)
        if self.max_tokens == 0 and not getattr(self, "echo", None):
            raise ApiError(400, "max_tokens: 0 is allowed only with echo (the prompt scored, nothing generated); "
                                "otherwise it must be at least 1", param="max_tokens")  # fmt: skip
        k = self.prompt_logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ApiError(400, f"prompt_logprobs: {k} is out of range; this server takes 0 to {MAX_LOGPROBS} "
                                "(the top alternatives of each prompt token) or null",
                           param="prompt_logprobs")  # fmt: skip
        if k is not None and self.stream:
            raise ApiError(400, f"prompt_logprobs: {k} is not supported with stream: true (as vLLM); this server "
                                "takes only null there", param="prompt_logprobs")  # fmt: skip
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise ApiError(400, "stream_options.continuous_usage_stats: true is not supported; this server takes only "
                                "false (or null): usage comes in the last chunk", param="stream_options")  # fmt: skip


class CompletionBody(BodyBase):
    # a string, a list of strings, a list of token ids, or a list of lists of ids: one choice per prompt
    prompt: Any  # checked by prompts(): pydantic's union errors would name its branches
    best_of: int | None = None
    echo: bool | None = None  # the prompt, then the completion (and, with logprobs, the prompt's logprobs)
    logprobs: int | None = None  # each token's logprob and its top-k alternatives (0 to MAX_LOGPROBS)
    suffix: str | None = None

    NEUTRAL: ClassVar[dict] = NEUTRAL_COMMON | NEUTRAL_COMPLETION

    def check(self) -> None:
        super().check()
        self.echo = bool(self.echo)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs: {self.logprobs} is out of range; this server takes 0 to {MAX_LOGPROBS} "
                                "(the top alternatives of each token) or null", param="logprobs")  # fmt: skip

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string (checked to be text) or a list of token ids (checked to be non-empty)."""
        p = self.prompt
        if isinstance(p, str):
            check_text(p, "prompt")
            return [p]
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: an empty list is not a prompt", param="prompt")

        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if not isinstance(p, list) or not (ids(p) or all(isinstance(x, str) or ids(x) for x in p)):
            raise ApiError(400, "prompt: must be a string, a list of strings, a list of token ids or a list of lists "
                                "of token ids", param="prompt")  # fmt: skip
        if isinstance(p[0], int):
            return [list(p)]
        out = list(p)
        for i, x in enumerate(out):
            if isinstance(x, list) and not x:
                raise ApiError(400, f"prompt.{i}: an empty list of token ids is not a prompt", param="prompt")
            if isinstance(x, str):
                check_text(x, f"prompt.{i}")
        return out


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # an assistant turn's other fields, at their neutral values only
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    reasoning: str | None = None
    reasoning_content: str | None = None


MESSAGE_NEUTRAL = {"refusal": _only(text="null"), "tool_calls": _empty("[]"), "function_call": _only(text="null"),
                   "audio": _only(text="null"), "reasoning": _empty('"" or null'),
                   "reasoning_content": _empty('"" or null')}  # fmt: skip


def message_text(m: Message, i: int) -> str:
    """A message's text: a string, a list of text parts (concatenated), or null (an assistant's only:
    empty). Any other part (image_url, input_audio, file, refusal) is a 400 naming it."""
    where = f"messages.{i}"
    for name, (ok, text) in MESSAGE_NEUTRAL.items():
        v = getattr(m, name)
        if v is not None and not ok(v):
            also = "" if "null" in text else " (or null)"
            raise ApiError(400, f"{where}.{name}: {json.dumps(v)[:60]} is not supported; this server takes only "
                                f"{text}{also}", param=f"{where}.{name}")  # fmt: skip
    if m.content is None:
        if m.role != "assistant":
            raise ApiError(400, f"{where}.content: null is allowed only in an assistant message",
                           param=f"{where}.content")  # fmt: skip
        return ""
    if isinstance(m.content, str):
        check_text(m.content, f"{where}.content")
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            param = f"{where}.content.{j}"
            what = f"content parts of type {json.dumps(kind)} are" if kind != "text" else "this text part is"
            raise ApiError(400, f"{param}: {what} not supported; this server takes only text parts "
                                '({"type": "text", "text": ...})', param=param)  # fmt: skip
        check_text(part["text"], f"{where}.content.{j}.text")
        texts.append(part["text"])
    return "".join(texts)


class ChatBody(BodyBase):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    add_generation_prompt: bool | None = None  # vLLM: end with "Assistant:" (the default)
    continue_final_message: bool | None = None  # vLLM: leave the last message open for the reply to continue
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    function_call: Any = None
    functions: list[Any] | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[str] | None = None
    moderation: Any = None
    parallel_tool_calls: bool | None = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    echo: bool | None = None
    documents: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    include_reasoning: bool | None = None
    return_prompt_text: bool | None = None

    NEUTRAL: ClassVar[dict] = NEUTRAL_COMMON | NEUTRAL_CHAT

    def check(self) -> None:
        super().check()
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        k = self.top_logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs: {k} is out of range; this server takes 0 to {MAX_LOGPROBS} "
                                "(the top alternatives of each token) or null", param="top_logprobs")  # fmt: skip
        if k and not self.logprobs:  # as vLLM: 0 is neutral without logprobs, more needs them
            raise ApiError(400, f"top_logprobs: {k} is not supported without logprobs: true (the alternatives "
                                "come with each token's logprob); send logprobs: true, or top_logprobs 0 or null",
                           param="top_logprobs")  # fmt: skip

    def logprobs_k(self) -> int | None:
        """The top alternatives of each generated token (``top_logprobs``), or None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    NEUTRAL: ClassVar[dict] = {
        k: NEUTRAL_CHAT[k]
        for k in ("chat_template", "chat_template_kwargs", "mm_processor_kwargs", "media_io_kwargs", "tools")
    }


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


CHAT_STOP = "\n\nUser:"  # the plain template's implied stop: the model starting the next user turn
_OPEN = "\x00ponderlm-continue\x00"  # stands for the final message's content while cutting after it


def chat_prompt(tok, messages: list[Message], generation: bool | None = None, cont: bool | None = None) -> str:
    """The prompt of a conversation: the model's own chat template (a converted model's) or, for a
    model without one, the plain one (``Role: content`` and a blank line per message, then
    ``Assistant:``; :data:`CHAT_STOP` is then an implied stop string), both rendered by
    :meth:`ponderlm.data.tokenizer.Tokenizer.render_chat`. ``developer`` is ``system``;
    ``generation`` false: no reply prompt; ``cont``: the final message left open for the reply to
    continue, as transformers' ``continue_final_message`` does it (the rendering cut right after
    that message's content)."""
    if cont and generation:
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")  # fmt: skip
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
             for i, m in enumerate(messages)]  # fmt: skip
    last = turns[-1]["content"] if cont and turns else None
    if last is not None:
        turns[-1]["content"] = _OPEN
    try:
        text = tok.render_chat(turns, add_generation_prompt=generation is not False and not cont)
    except DataError as e:
        raise ApiError(400, str(e), param="messages") from None
    if last is None:
        return text
    at = text.rfind(_OPEN)
    if at == -1:
        raise ApiError(400, "continue_final_message: the chat template does not show the final message's content",
                       param="continue_final_message")  # fmt: skip
    return text[:at] + last


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    for s in stops:
        check_text(s, "stop")
    return stops


def check_text(text: str, param: str) -> None:
    """A 400 naming ``param`` unless ``text`` is text the tokenizer can take: JSON's ``\\ud800``
    escapes give strings with lone surrogates, which are not Unicode characters."""
    why = utf8_problem(text)
    if why:
        raise ApiError(400, f"{param} is {why}", param=param)


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool, int]:
    """(the text up to the first stop string, whether one was found, how many characters at the
    end must be held back because a stop string may start there)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True, 0
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text, False, hold


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if e.get("type") == "extra_forbidden":
        return f"unknown field: {'.'.join(loc)}", ".".join(loc) or None
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), where or None
