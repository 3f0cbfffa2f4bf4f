"""Workflow files: a full file loads as written; every kind of mistake names file, line, field."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from alpaca_engine.models.base import Message, ModelError, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.openai import OpenAIModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.breaker import BreakerPolicy
from alpaca_engine.tools.retry import NO_RETRY, RetryPolicy
from alpaca_engine.workflow import Workflow
from alpaca_engine.workflows import loader as loader_module
from alpaca_engine.workflows.loader import (
    WorkflowError,
    load_workflow,
    load_workflow_text,
    resolve_workflow,
)

FIXTURES = Path(__file__).parent / "workflows"
CTX = ToolContext(run_id="run_1", step=1, idempotency_key="k")


def doc(text: str) -> str:
    """Dedent and drop the leading newline, so the first YAML line is line 1."""
    return textwrap.dedent(text).lstrip("\n")


def load(text: str) -> Workflow:
    return load_workflow_text(doc(text), source="wf.yaml", base_dir=FIXTURES)


def error_of(text: str) -> WorkflowError:
    with pytest.raises(WorkflowError) as info:
        load(text)
    return info.value


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The loader puts workflow directories on sys.path; keep that (and its cache) per test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(loader_module, "_cache", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "tools" or name.startswith(("_alpaca_workflow_", "wfpkg")):
            del sys.modules[name]


# -- a valid file ------------------------------------------------------------------------------


def test_full_file_loads_agents_tools_and_defaults() -> None:
    path = FIXTURES / "full.yaml"
    wf = load_workflow(path)

    assert wf.ref == str(path.resolve())
    assert wf.max_depth == 2
    assert wf.budget == {"max_steps": 200, "max_tool_calls": 100, "max_tokens": 200000,
                         "deadline_seconds": 600}
    assert wf.tools.names() == ["add", "search_docs", "search_web", "times"]

    assistant = wf.agent("assistant")
    assert assistant.description == "Answers questions, delegates research."
    assert assistant.instructions == "Be brief."
    assert assistant.tools == ["add", "times", "search_*"]
    assert assistant.capabilities == frozenset({"math"})
    assert assistant.delegates_to == ["researcher"]
    assert assistant.max_steps == 10
    assert isinstance(assistant.model, ScriptedModel)
    assert assistant.model.name == "demo-script"

    researcher = wf.agent("researcher")
    assert researcher.capabilities is None  # absent: no capability limit
    assert researcher.max_steps == 25
    assert isinstance(researcher.model, FunctionModel)


async def test_plain_function_becomes_a_tool_with_derived_schemas_and_yaml_policies() -> None:
    wf = load_workflow(FIXTURES / "full.yaml")
    times = wf.tools.get("times")
    assert times is not None
    assert times.description == "Multiply, as the YAML says."
    assert times.input_schema["properties"].keys() == {"a", "b"}
    assert times.input_schema["required"] == ["a"]
    assert times.input_schema["additionalProperties"] is False
    assert times.output_schema is not None and times.output_schema["type"] == "number"
    assert times.capabilities == frozenset({"math"})
    assert times.retry == RetryPolicy(max_attempts=3, initial_delay=0.1, multiplier=2,
                                      max_delay=5, jitter=0.1, attempt_timeout=None)
    assert times.breaker == BreakerPolicy()
    assert times.timeout is None  # explicit null: no timeout
    assert times.approval == "required"
    assert await times.invoke({"a": 2, "b": 4}, CTX) == 8

    search = wf.tools.get("search_web")
    assert search is not None
    assert search.description == "Search the web (canned results)."
    assert (search.retry, search.breaker, search.timeout, search.approval) == (
        NO_RETRY, None, 30.0, "never")  # make_tool defaults
    assert await search.invoke({"query": "q", "limit": 2}, CTX) == ["q #0", "q #1"]


async def test_yaml_overrides_fields_of_a_tool_object_and_keeps_the_rest() -> None:
    wf = load_workflow(FIXTURES / "full.yaml")
    add = wf.tools.get("add")
    assert add is not None
    # Set in YAML: win over @tool(...).
    assert add.capabilities == frozenset({"math", "arithmetic"})
    assert add.timeout == 10
    # Not set in YAML: as the decorator said.
    assert add.approval == "required"
    assert add.retry == RetryPolicy(max_attempts=2)
    assert add.breaker == BreakerPolicy(failure_threshold=2)
    assert add.description == "Add two integers."
    assert add.input_errors({"a": 1}) != []  # contracts rebuilt with the replaced Tool
    assert await add.invoke({"a": 2, "b": 3}, CTX) == 5


def test_yaml_null_policies_switch_a_decorated_tool_back_to_none() -> None:
    wf = load("""
        version: 1
        tools:
          - python: "wf_tools:add"
            retry: null
            breaker: null
            capabilities: null
        agents:
          - {name: a, model: {provider: scripted, script: [done]}}
    """)
    add = wf.tools.get("add")
    assert add is not None
    assert (add.retry, add.breaker, add.capabilities) == (NO_RETRY, None, frozenset())


async def test_scripted_model_plays_the_shorthand() -> None:
    model = load_workflow(FIXTURES / "full.yaml").agent("assistant").model
    user = Message(role="user", content="hi")

    first = await model.complete([user], [])
    assert first.content is None
    assert [(c.id, c.name, json.loads(c.arguments)) for c in first.tool_calls] == [
        ("call_0_0", "add", {"a": 2, "b": 3})]

    second = await model.complete([user, first.as_message()], [])
    assert second.content == "two calls"
    assert [(c.name, c.arguments) for c in second.tool_calls] == [
        ("times", '{"a": 2, "b": 4}'), ("add", "not json")]  # a string scripts malformed JSON

    third = await model.complete([user, first.as_message(), second.as_message()], [])
    assert third.content == "The answer is 5." and third.tool_calls == []
    assert third.model == "demo-script"


async def test_function_model_calls_the_named_function() -> None:
    model = load_workflow(FIXTURES / "full.yaml").agent("researcher").model
    response = await model.complete([Message(role="user", content="hello")],
                                    [ToolSpec(name="search_docs")])
    assert response.content == "hello | search_docs"


OPENAI = """
    version: 1
    agents:
      - name: a
        model:
          provider: openai
          model: gpt-4o-mini
          base_url: http://localhost:8000/v1
          settings: {temperature: 0.2, max_tokens: 100}
          timeout: 12
          retry: {max_attempts: 4}
"""


def test_openai_model_builds_without_a_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-123456")
    model = load(OPENAI).agent("a").model
    assert isinstance(model, OpenAIModel)
    assert model.name == "openai:gpt-4o-mini"
    assert str(model._client.base_url).startswith("http://localhost:8000/v1")
    assert model._client.api_key == "sk-test-key-123456"
    assert model._settings == {"temperature": 0.2, "max_tokens": 100}
    assert model._timeout == 12
    assert model._retry == RetryPolicy(max_attempts=4)


def test_openai_custom_key_variable_never_falls_back_to_the_openai_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key-123456")
    monkeypatch.delenv("LOCAL_LLM_KEY", raising=False)
    text = OPENAI.replace("timeout: 12", "timeout: 12\n          api_key_env: LOCAL_LLM_KEY")
    model = load(text).agent("a").model
    assert isinstance(model, OpenAIModel)
    assert model._client.api_key == "unused"
    monkeypatch.setenv("LOCAL_LLM_KEY", "local-key")
    model = load(text).agent("a").model
    assert isinstance(model, OpenAIModel)
    assert model._client.api_key == "local-key"


async def test_openai_without_key_loads_but_its_runs_fail_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    wf = load("""
        version: 1
        agents:
          - name: a
            model:
              provider: openai
              model: gpt-4o-mini
    """)
    model = wf.agent("a").model
    assert model.name == "openai:gpt-4o-mini"
    with pytest.raises(ModelError, match="OPENAI_API_KEY is not set") as info:
        await model.complete([], [])
    assert not info.value.transient


# -- errors: file, line, field -----------------------------------------------------------------

AGENT = "agents:\n  - {name: a, model: {provider: scripted, script: [done]}}\n"
# The same, to close an indented case string: its first line takes the indent already there.
AGENT8 = AGENT.replace("\n  -", "\n          -")

ERROR_CASES: list[tuple[str, str, int | None, str, str]] = [
    ("yaml syntax", """
        version: 1
        agents:
          - name: a
            model: {provider: scripted
        tools: []
     """, 5, "", "invalid YAML"),
    ("missing provider", """
        version: 1
        agents:
          - name: a
            model:
              script: [done]
    """, 4, "agents[0].model.provider", "provider: scripted, function or openai"),
    ("unknown provider", """
        version: 1
        agents:
          - name: a
            model:
              provider: anthropic
              model: claude
    """, 5, "agents[0].model.provider", "provider: scripted, function or openai"),
    ("model is not a mapping", """
        version: 1
        agents:
          - name: a
            model: gpt-4o
    """, 4, "agents[0].model", "expected a mapping with provider"),
    ("unknown field with a hint", """
        version: 1
        tools:
          - python: "wf_tools:add"
            capabilites: [math]
        """ + AGENT8, 4, "tools[0].capabilites", "unknown field 'capabilites' (did you mean "
     "'capabilities'?)"),
    ("unknown field inside a provider", """
        version: 1
        agents:
          - name: a
            model:
              provider: function
              function: "wf_tools:reply"
              temperature: 0.3
    """, 7, "agents[0].model.temperature", "unknown field 'temperature'"),
    ("wrong type, no coercion", """
        version: 1
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            limits:
              max_steps: "10"
    """, 6, "agents[0].limits.max_steps", "valid integer"),
    ("missing required field", """
        version: 1
        agents:
          - model: {provider: scripted, script: [done]}
    """, 3, "agents[0].name", "required field is missing"),
    ("missing version", AGENT, 1, "version", "required field is missing"),
    ("unsupported version", "version: 2\n" + AGENT, 1, "version", "unsupported version 2"),
    ("no agents", "version: 1\nagents: []\n", 2, "agents", "at least 1 item"),
    ("root is a list", "- version: 1\n", 1, "(root)", "expected a mapping"),
    ("bad tool name", """
        version: 1
        tools:
          - name: "add numbers"
            python: "wf_tools:add"
        """ + AGENT8, 3, "tools[0].name", "letters, digits"),
    ("bad import path", """
        version: 1
        tools:
          - python: "wf_tools.add"
        """ + AGENT8, 3, "tools[0].python", "expected 'module:attribute'"),
    ("retry out of range", """
        version: 1
        tools:
          - python: "wf_tools:multiply"
            retry:
              max_attempts: 0
        """ + AGENT8, 5, "tools[0].retry.max_attempts", "greater than or equal to 1"),
    ("breaker inconsistent", """
        version: 1
        tools:
          - python: "wf_tools:multiply"
            breaker:
              window_size: 5
              minimum_calls: 10
        """ + AGENT8, 4, "tools[0].breaker", "minimum_calls must not exceed window_size"),
    ("approval value", """
        version: 1
        tools:
          - python: "wf_tools:multiply"
            approval: sometimes
        """ + AGENT8, 4, "tools[0].approval", "'never' or 'required'"),
    ("script item without tool", """
        version: 1
        agents:
          - name: a
            model:
              provider: scripted
              script:
                - "hello"
                - {args: {a: 1}}
    """, 8, "agents[0].model.script[1]", "a script item is a final-answer string"),
    ("script item not a string or mapping", """
        version: 1
        agents:
          - name: a
            model:
              provider: scripted
              script: [done, 42]
    """, 6, "agents[0].model.script[1]", "a script item is"),
    ("script calls empty", """
        version: 1
        agents:
          - name: a
            model:
              provider: scripted
              script:
                - calls: []
                  text: nothing
    """, 7, "agents[0].model.script[0].calls", "at least 1 item"),
    ("script call args not a mapping", """
        version: 1
        agents:
          - name: a
            model:
              provider: scripted
              script:
                - calls:
                    - {tool: add, args: {a: 1}}
                    - tool: add
                      args: [1, 2]
    """, 10, "agents[0].model.script[0].calls[1].args", "expected a mapping of arguments"),
    ("unknown field in a script call", """
        version: 1
        agents:
          - name: a
            model:
              provider: scripted
              script:
                - tool: add
                  arguments: {a: 1}
    """, 8, "agents[0].model.script[0].arguments", "(did you mean 'args'?)"),
    ("reserved openai setting", """
        version: 1
        agents:
          - name: a
            model:
              provider: openai
              model: gpt-4o-mini
              settings:
                model: gpt-4o
    """, 4, "agents[0].model", "settings may not override model"),
    ("duplicate yaml key", """
        version: 1
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            name: b
    """, 5, "agents[0].name", "duplicate key 'name' (first on line 3)"),
    ("unknown tool", """
        version: 1
        tools:
          - python: "wf_tools:add"
          - python: "wf_tools:multiply"
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            tools:
              - add
              - "search_*"
              - multipy
    """, 11, "agents[0].tools[2]", "unknown tool 'multipy' (did you mean 'multiply'?)"),
    ("unknown delegate", """
        version: 1
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
          - name: b
            model: {provider: scripted, script: [done]}
            delegates_to: [a, c]
    """, 7, "agents[1].delegates_to[1]", "unknown agent 'c'"),
    ("duplicate tool name", """
        version: 1
        tools:
          - python: "wf_tools:add"
          - name: add
            python: "wf_tools:multiply"
        """ + AGENT8, 4, "tools[1].name", "duplicate tool name 'add' (first defined on line 3)"),
    ("duplicate tool by function name", """
        version: 1
        tools:
          - name: add
            python: "wf_tools:multiply"
          - python: "wf_tools:add"
        """ + AGENT8, 5, "tools[1].python", "duplicate tool name 'add' (first defined on line 3)"),
    ("duplicate agent name", """
        version: 1
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
          - description: second
            name: a
            model: {provider: scripted, script: [done]}
    """, 6, "agents[1].name", "duplicate agent name 'a' (first defined on line 3)"),
    ("tool module does not import", """
        version: 1
        tools:
          - name: x
            python: "no_such_module_xyz:add"
        """ + AGENT8, 4, "tools[0].python",
     "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    ("tool attribute missing", """
        version: 1
        tools:
          - python: "wf_tools:subtract"
        """ + AGENT8, 3, "tools[0].python", "module 'wf_tools' has no attribute 'subtract'"),
    ("tool attribute not callable", """
        version: 1
        tools:
          - python: "wf_tools:NOT_CALLABLE"
        """ + AGENT8, 3, "tools[0].python", "is neither a Tool nor a function"),
    ("tool attribute is a class", """
        version: 1
        tools:
          - python: "wf_tools:NotATool"
        """ + AGENT8, 3, "tools[0].python", "is neither a Tool nor a function"),
    ("model function does not import", """
        version: 1
        agents:
          - name: a
            model:
              provider: function
              function: "wf_missing_xyz:reply"
    """, 6, "agents[0].model.function", "cannot import module 'wf_missing_xyz'"),
    ("model function not callable", """
        version: 1
        agents:
          - name: a
            model:
              provider: function
              function: "wf_tools:NOT_CALLABLE"
    """, 6, "agents[0].model.function", "is not a function"),
]


@pytest.mark.parametrize(("text", "line", "field", "message"),
                         [case[1:] for case in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_name_file_line_and_field(text: str, line: int, field: str, message: str) -> None:
    err = error_of(text)
    assert (err.source, err.line, err.field) == ("wf.yaml", line, field), str(err)
    assert message in err.message, str(err)


def test_error_string_and_count_of_other_errors() -> None:
    err = error_of("""
        version: 1
        agents:
          - name: a
            model:
              provider: bogus
            limits: {max_steps: 0}
            colour: red
    """)
    assert err.message.endswith("(and 2 more errors)")
    assert str(err) == f"wf.yaml:5: agents[0].model.provider: {err.message}"
    no_field = WorkflowError("f.yaml", 3, "", "invalid YAML: boom")
    assert str(no_field) == "f.yaml:3: invalid YAML: boom"
    assert str(WorkflowError("f.yaml", None, "x", "m")) == "f.yaml: x: m"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.line, copy.field, copy.message) == (
        err.source, err.line, err.field, err.message)


def test_api_key_env_that_looks_like_a_key_is_refused_without_echoing_it() -> None:
    err = error_of("""
        version: 1
        agents:
          - name: a
            model:
              provider: openai
              model: gpt-4o-mini
              api_key_env: sk-proj-abcdef123456
    """)
    assert (err.line, err.field) == (7, "agents[0].model.api_key_env")
    assert "sk-proj" not in str(err)


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    err = error_of(f"""
        version: 1
        agents: !!python/object/apply:os.system ["touch {marker}"]
    """)
    assert err.line == 2 and "invalid YAML" in err.message
    assert not marker.exists()


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(WorkflowError, match="the workflow is empty") as info:
        load_workflow(empty)
    assert info.value.source == str(empty)
    with pytest.raises(WorkflowError, match="cannot read the file") as info:
        load_workflow(tmp_path / "missing.yaml")
    assert info.value.line is None


def test_file_errors_carry_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nagents:\n  - name: a\n    modle: {}\n")
    with pytest.raises(WorkflowError) as info:
        load_workflow(str(path))
    assert (info.value.source, info.value.line, info.value.field) == (
        str(path), 4, "agents[0].modle")
    assert info.value.message == (
        "unknown field 'modle' (did you mean 'model'?) (and 1 more error)")


# -- module resolution -------------------------------------------------------------------------


def _workflow_dir(root: Path, name: str, answer: str) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "tools.py").write_text(
        f"def pick() -> str:\n    '''Pick.'''\n    return {answer!r}\n")
    (directory / "wf.yaml").write_text(
        "version: 1\ntools:\n  - python: 'tools:pick'\n" + AGENT)
    return directory / "wf.yaml"


async def test_same_module_name_next_to_two_workflows_stays_separate(tmp_path: Path) -> None:
    first = load_workflow(_workflow_dir(tmp_path, "one", "first"))
    second = load_workflow(_workflow_dir(tmp_path, "two", "second"))
    first_pick, second_pick = first.tools.get("pick"), second.tools.get("pick")
    assert first_pick is not None and second_pick is not None
    assert await first_pick.invoke({}, CTX) == "first"
    assert await second_pick.invoke({}, CTX) == "second"
    assert str(tmp_path / "one") in sys.path  # its neighbours can import each other


def test_without_base_dir_modules_come_from_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    text = doc("""
        version: 1
        tools:
          - python: "wf_tools:multiply"
        """) + AGENT
    with pytest.raises(WorkflowError, match="cannot import module 'wf_tools'"):
        sys.modules.pop("wf_tools", None)
        load_workflow_text(text)
    monkeypatch.syspath_prepend(str(FIXTURES))
    wf = load_workflow_text(text, ref="mine")
    assert wf.ref == "mine" and wf.tools.names() == ["multiply"]


# -- resolve_workflow --------------------------------------------------------------------------


def test_resolve_file_caches_until_the_file_changes(tmp_path: Path) -> None:
    path = _workflow_dir(tmp_path, "wf", "x")
    first = resolve_workflow(str(path))
    assert first.ref == str(path.resolve())
    assert resolve_workflow(str(path)) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert resolve_workflow(str(path)) is not first
    with pytest.raises(WorkflowError, match="cannot read the file"):
        resolve_workflow(str(tmp_path / "gone.yaml"))


def test_resolve_builtin_reports_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "BUILTIN_PACKAGE", "alpaca_engine.no_such_builtins")
    with pytest.raises(WorkflowError, match="no builtin workflows are installed") as info:
        resolve_workflow("builtin:demo")
    assert info.value.source == "builtin:demo"
    with pytest.raises(WorkflowError, match="a builtin name is"):
        resolve_workflow("builtin:../etc/passwd")


async def test_resolve_builtin_loads_from_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "wfpkg_builtin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(
        "def shout(text: str) -> str:\n    '''Shout.'''\n    return text.upper()\n")
    (package / "demo.yaml").write_text(
        "version: 1\ntools:\n  - python: 'helpers:shout'\n" + AGENT)
    (package / "broken.yaml").write_text("version: 1\nagents: [\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(loader_module, "BUILTIN_PACKAGE", "wfpkg_builtin")

    wf = resolve_workflow("builtin:demo")
    assert wf.ref == "builtin:demo"
    assert resolve_workflow("builtin:demo") is wf
    shout = wf.tools.get("shout")
    assert shout is not None and await shout.invoke({"text": "hi"}, CTX) == "HI"
    assert str(package) not in sys.path  # resolved inside the package, not via sys.path

    with pytest.raises(WorkflowError, match=r"no builtin workflow 'nope' \(known: broken, demo\)"):
        resolve_workflow("builtin:nope")
    with pytest.raises(WorkflowError) as info:
        resolve_workflow("builtin:broken")
    assert info.value.source == "builtin:broken.yaml" and info.value.line == 3


# -- hostile or odd documents ------------------------------------------------------------------


def test_alias_bomb_is_refused_before_validation() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    err = error_of("\n".join(lines) + "\n")
    assert "expands to more than" in err.message
    assert err.line is not None and err.line <= 9


def test_recursive_alias_is_an_error_not_a_hang() -> None:
    err = error_of("""
        version: 1
        agents: &loop
          - *loop
    """)
    assert err.field.startswith("agents[0]")


def test_yaml_errors_without_a_position_and_deep_nesting() -> None:
    err = error_of("version: 1\x07\n")
    assert err.line is None and "invalid YAML" in err.message
    err = error_of("version: 1\nagents: " + "[" * 5000 + "]" * 5000 + "\n")
    assert err.message == "the document is nested too deeply"


def test_a_list_field_given_a_scalar() -> None:
    err = error_of("""
        version: 1
        tools: wf_tools:add
    """)
    assert (err.line, err.field, err.message) == (2, "tools", "expected a list (and 1 more error)")


def test_function_that_cannot_become_a_tool(tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(
        "def odd(x: 'Undefined') -> int:  # noqa: F821\n    return 1\n"
        "def boom() -> None:\n    pass\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('import-time failure')\n")
    text = doc("""
        version: 1
        tools:
          - python: "tools:odd"
        """) + AGENT
    with pytest.raises(WorkflowError) as info:
        load_workflow_text(text, source="t.yaml", base_dir=tmp_path)
    assert (info.value.line, info.value.field) == (3, "tools[0].python")
    assert "cannot derive a tool from 'tools:odd': NameError" in info.value.message

    with pytest.raises(WorkflowError) as info:
        load_workflow_text(text.replace("tools:odd", "boom:x"), source="t.yaml",
                           base_dir=tmp_path)
    assert info.value.message == (
        "cannot import module 'boom': RuntimeError: import-time failure")


def test_a_shadowed_module_is_loaded_once_under_its_private_name(tmp_path: Path) -> None:
    load_workflow(_workflow_dir(tmp_path, "one", "first"))
    private = {n for n in sys.modules if n.startswith("_alpaca_workflow_")}
    second = _workflow_dir(tmp_path, "two", "second")
    a, b = load_workflow(second), load_workflow(second)
    pick_a, pick_b = a.tools.get("pick"), b.tools.get("pick")
    assert pick_a is not None and pick_b is not None
    assert pick_a.invoke is not pick_b.invoke  # distinct Tools ...
    added = {n for n in sys.modules if n.startswith("_alpaca_workflow_")} - private
    assert len(added) <= 1  # ... at most one more module (none if "tools" was free)


# -- every error at once (the one code path behind files, validation and pushes) ---------------


def diagnosis(text: str) -> list[tuple[int | None, str, str]]:
    found = loader_module._Loader("wf.yaml", loader_module._Importer(base_dir=FIXTURES)) \
        .diagnose(doc(text), "wf.yaml")
    assert found.workflow is None
    return [(e.line, e.field, e.message) for e in found.errors]


def test_schema_errors_are_all_reported_with_field_and_line() -> None:
    assert diagnosis("""
        version: 1
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            limits: {max_steps: 0}
          - name: b
            model: {provider: bogus}
            colour: red
    """) == [
        (5, "agents[0].limits.max_steps", "Input should be greater than or equal to 1"),
        (7, "agents[1].model.provider",
         "expected a mapping with provider: scripted, function or openai"),
        (8, "agents[1].colour", "unknown field 'colour'"),
    ]


def test_build_errors_of_different_entries_and_agents_are_all_reported() -> None:
    found = diagnosis("""
        version: 1
        tools:
          - python: "wf_tools:add"
          - python: "no_such_module_xyz:thing"
          - python: "wf_tools:subtract"
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            tools: [add, thing, multipy]
            delegates_to: [a, c]
          - name: b
            model: {provider: function, function: "wf_missing_xyz:reply"}
    """)
    assert [(line, field) for line, field, _ in found] == [
        (4, "tools[1].python"), (5, "tools[2].python"), (9, "agents[0].tools[2]"),
        (10, "agents[0].delegates_to[0]"), (10, "agents[0].delegates_to[1]"),
        (12, "agents[1].model.function")]
    messages = [m for _, _, m in found]
    assert "unknown tool 'thing'" not in " ".join(messages)  # its entry failed: said once
    assert "cannot delegate to itself" in messages[3]
    assert messages[4].startswith("unknown agent 'c'")


def test_a_file_load_raises_the_first_error_and_counts_the_rest() -> None:
    err = error_of("""
        version: 1
        tools:
          - python: "wf_tools:subtract"
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            tools: [nope]
    """)
    assert (err.line, err.field) == (3, "tools[0].python")
    assert err.message.endswith("has no attribute 'subtract' (and 1 more error)")


def test_a_delegation_cycle_is_a_warning_and_the_workflow_still_loads() -> None:
    found = loader_module._Loader("wf.yaml", loader_module._Importer()).diagnose(doc("""
        version: 1
        name: loop
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            delegates_to: [b]
          - name: b
            model: {provider: scripted, script: [done]}
            delegates_to: [c]
          - name: c
            model: {provider: scripted, script: [done]}
            delegates_to: [a]
    """), "wf.yaml")
    assert found.errors == [] and found.workflow is not None
    assert found.spec is not None and found.spec.name == "loop"
    [warning] = found.warnings
    assert (warning.line, warning.field) == (12, "agents[2].delegates_to[0]")
    assert warning.message.startswith("delegation cycle a -> b -> c -> a")


def test_json_indented_with_tabs_loads_with_its_lines() -> None:
    text = json.dumps({"version": 1, "agents": [{"name": "a", "model": {
        "provider": "scripted", "script": ["hi"]}, "limits": {"max_steps": 0}}]}, indent="\t")
    [(line, field, message)] = diagnosis(text)
    assert (line, field) == (13, "agents[0].limits.max_steps") and "greater than" in message
    assert load_workflow_text(text.replace('"max_steps": 0', '"max_steps": 2')).agents
