"""The command grammar: good lines bind, bad lines give a message, no line raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kedit.engine.command_table import registry
from kedit.engine.commands import Invocation, Param, ParseError, Registry, lex

REGISTRY = registry()


def _registry() -> Registry:
    reg = Registry()

    @reg.command(
        "edit",
        "Change a fact.",
        Param("prompt", "the prompt"),
        Param("target", "the new answer", after_arrow=True),
        Param(
            "method", "editing method", kind="option", required=False, default="rome", choices=("rome", "wise", "grace")
        ),
        Param("subject", "the subject", kind="option", required=False),
    )
    def edit(session, **kw):  # pragma: no cover - never run
        return []

    @reg.command(
        "set",
        "Set a strength.",
        Param("name", "vector"),
        Param("strength", "how strong", convert=float),
        Param("quiet", "no output", kind="flag"),
    )
    def set_(session, **kw):  # pragma: no cover
        return []

    @reg.command("say", "Say words.", Param("words", "what to say", rest=True), aliases=("s",))
    def say(session, **kw):  # pragma: no cover
        return []

    return reg


REG = _registry()


def test_edit_with_quotes_and_arrow() -> None:
    inv = REG.parse('/edit "Watts Humphrey attended" -> "University of Michigan" --method wise')
    assert isinstance(inv, Invocation)
    assert inv.command.name == "edit"
    assert inv.args == {
        "prompt": "Watts Humphrey attended",
        "target": "University of Michigan",
        "method": "wise",
        "subject": None,
    }


def test_arrow_without_spaces_and_option_equals() -> None:
    inv = REG.parse("/edit 'a b'->'c d' --subject=a")
    assert isinstance(inv, Invocation)
    assert (inv.args["prompt"], inv.args["target"], inv.args["subject"]) == ("a b", "c d", "a")
    assert inv.args["method"] == "rome"  # the default


def test_escapes_in_double_quotes() -> None:
    inv = REG.parse(r'/edit "say \"hi\" \\ now" -> x')
    assert isinstance(inv, Invocation)
    assert inv.args["prompt"] == 'say "hi" \\ now'


def test_conversion_flag_and_alias() -> None:
    inv = REG.parse("/set mood 2.5 --quiet")
    assert isinstance(inv, Invocation) and inv.args == {"name": "mood", "strength": 2.5, "quiet": True}
    inv = REG.parse("/s hello there  world")
    assert isinstance(inv, Invocation) and inv.command.name == "say"
    assert inv.args["words"] == "hello there world"


def test_bad_lines_give_messages() -> None:
    cases = {
        '/edit "unterminated -> x': "unterminated",
        "/edit prompt": "'->'",
        '/edit "p" -> "t" --method magic': "must be one of rome, wise, grace",
        '/edit "p" -> "t" --bogus 1': "unknown option --bogus",
        '/edit "p" -> "t" -> "u"': "twice",
        "/set mood strong": "must be a float",
        "/set mood 1 extra": "unexpected 'extra'",
        "/edti x -> y": "Did you mean /edit?",
        "/": "command name",
        "/set mood 1 --quiet=yes": "takes no value",
        '/edit "p" -> "t" --method': "needs a value",
        '/edit "" -> "t"': "is empty",
    }
    for line, expected in cases.items():
        result = REG.parse(line)
        assert isinstance(result, ParseError), line
        assert expected in result.message, (line, result.message)
    usage = REG.parse("/edit prompt")
    assert isinstance(usage, ParseError) and "Usage: /edit" in usage.message


def test_lexer_marks_arrows_and_quotes() -> None:
    lexed = lex('a "b c"->d')
    assert not isinstance(lexed, ParseError)
    assert [(x.kind, x.text) for x in lexed] == [("word", "a"), ("quoted", "b c"), ("arrow", "->"), ("word", "d")]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=80))
def test_no_input_makes_the_parser_raise(text: str) -> None:
    for line in (text, "/" + text, "/edit " + text, "/set " + text, "/help " + text):
        for reg in (REG, REGISTRY):
            result = reg.parse(line)
            assert isinstance(result, (Invocation, ParseError))
            assert isinstance(reg.complete(line), list)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(['"', "'", "->", "--method", "rome", "x", " ", "\\", "--", "-"]), max_size=12))
def test_no_token_soup_makes_the_parser_raise(parts: list[str]) -> None:
    line = "/edit " + "".join(parts)
    assert isinstance(REG.parse(line), (Invocation, ParseError))


def test_completion_of_names_options_and_choices() -> None:
    assert REG.complete("/ed") == ["/edit"]
    assert REG.complete('/edit "p" -> "t" --me') == ["--method"]
    assert REG.complete('/edit "p" -> "t" --method g') == ["grace"]
    assert sorted(REG.complete('/edit "p" -> "t" --method ')) == ["grace", "rome", "wise"]
    assert REG.complete("hello") == []


def test_builtin_commands_are_registered_with_help() -> None:
    import kedit.engine.session  # noqa: F401  (registers the built-ins)

    for name in ("help", "model", "reset", "quit"):
        cmd = REGISTRY.get(name)
        assert cmd is not None and cmd.summary
        assert REGISTRY.help_for(name).startswith(f"/{name}")
    assert REGISTRY.get("exit") is REGISTRY.get("quit")
    assert "/model" in REGISTRY.complete("/mo")
    assert "4bit" in REGISTRY.complete("/model x --quant ")
