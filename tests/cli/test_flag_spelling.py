"""One spelling per flag across the commands: a concept's former spellings are hidden aliases that still work with
a one-line warning, and -q / -v work after every subcommand, nested ones too."""

from __future__ import annotations

import argparse

import pytest

from hetlora.cli import build_parser

REQUIRED = {"client": ["--server", "http://h", "--data", "d", "--state-dir", "s"]}
# (commands, spellings of one concept): at most one of them visible in those commands' --help
SYNONYMS = [
    (None, {"--batch", "--batch-size"}),
    (("serve", "client", "demo"), {"--steps", "--local-steps"}),  # bench's --steps are timed steps, not training
    (None, {"--poll", "--poll-seconds"}),
    (None, {"--as", "--profile-as"}),
    (None, {"--state", "--state-dir"}),
    (None, {"--output", "--out"}),
    (None, {"--model-dir", "--model"}),
    (None, {"--artifacts-dir", "--artifacts"}),
]


def visible_flags(parser: argparse.ArgumentParser, path: str = "") -> dict[str, set[str]]:
    """Command path ('peft export') -> the long flags its --help shows, for every (nested) subcommand."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, nested in action.choices.items():
                found |= visible_flags(nested, f"{path} {name}".strip())
    if path:
        found[path] = {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings
                       if o.startswith("--")}
    return found


def test_each_concept_has_one_visible_spelling_across_the_commands():
    flags = visible_flags(build_parser())
    assert {"serve", "client", "bench", "export", "profile", "peft export", "peft import", "model list"} <= set(flags)
    for commands, spellings in SYNONYMS:
        used = {s for command, seen in flags.items() if commands is None or command in commands for s in seen
                if s in spellings}
        assert len(used) <= 1, (spellings, used)


@pytest.mark.parametrize("argv,old,new,value,dest", [
    (["client", *REQUIRED["client"]], "--steps", "--local-steps", "3", ("local_steps", 3)),
    (["client", *REQUIRED["client"]], "--poll", "--poll-seconds", "0.5", ("poll_seconds", 0.5)),
    (["export", "--task", "classification", "--out", "o"], "--batch", "--batch-size", "8", ("batch_size", 8)),
    (["bench"], "--batch", "--batch-size", "2", ("batch_size", 2)),
    (["profile"], "--as", "--profile-as", "raspberry-pi-4", ("profile_as", "raspberry-pi-4")),
])
def test_a_former_spelling_still_works_with_a_one_line_warning(capsys, argv, old, new, value, dest):
    parser = build_parser()
    args = parser.parse_args([*argv, old, value])
    assert getattr(args, dest[0]) == dest[1]
    assert capsys.readouterr().err == f"hetlora: warning: {old} is deprecated; use {new}\n"
    args = parser.parse_args([*argv, new, value])
    assert getattr(args, dest[0]) == dest[1] and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parser.parse_args([*argv[:1], "--help"])
    shown = capsys.readouterr().out
    assert new in shown and f"{old} " not in shown and f"{old}\n" not in shown


@pytest.mark.parametrize("words,rest", [(["peft", "export"], ["--adapter", "a", "--out", "o"]),
                                        (["peft", "import"], ["--peft", "p", "--out", "o"]),
                                        (["model", "list"], []), (["serve"], []), (["profile"], [])])
@pytest.mark.parametrize("flag,level", [("-q", -1), ("--verbose", 1)])
def test_verbosity_flags_work_after_every_subcommand(words, rest, flag, level):
    parser = build_parser()
    for argv in ([flag, *words, *rest], [*words, flag, *rest], [*words, *rest, flag]):
        assert parser.parse_args(argv).verbosity == level, argv
