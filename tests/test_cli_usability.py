"""The CLI as a person meets it: every option explained, results in words (JSON on request)."""

from __future__ import annotations

import argparse

from editd.cli import build_parser
from editd.version_commands import render_rollback


def _options(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, [*path, name])
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_option_and_argument_has_help_text() -> None:
    missing = [
        f"{command} {'/'.join(action.option_strings) or action.dest}"
        for command, action in _options(build_parser(), ["editd"])
        if not action.help
    ]
    assert missing == []


def test_admin_commands_take_the_data_dir_that_holds_the_token() -> None:
    parser = build_parser()
    for command in (["eval"], ["consolidate"], ["rollback", "1"]):
        args = parser.parse_args([*command, "--data-dir", "/srv/editd"])
        assert str(args.data_dir) == "/srv/editd", command


def test_a_rollback_answer_reads_as_a_sentence() -> None:
    answer = {"from": 5, "to": 2, "reason": "operator", "facts": 6, "at": 1.0}
    assert render_rollback(answer, "http://127.0.0.1:8000") == (
        "the daemon at http://127.0.0.1:8000 rolled back from version 5 to 2; 6 facts undone, "
        "sent to the rejected topic"
    )


def test_renamed_commands_keep_their_old_names_out_of_the_help() -> None:
    # `editd eval` asks the running daemon; measuring the built-in model is `editd model score`.
    parser = build_parser()
    renamed = {
        ("checkpoints",): ("versions",),
        ("model", "eval"): ("model", "score"),
    }
    for old, new in renamed.items():
        was, now = parser.parse_args([*old, "--json"]), parser.parse_args([*new, "--json"])
        assert was.handler == now.handler and was.json and now.json
        assert was.renamed_to == "editd " + " ".join(new)
        assert getattr(now, "renamed_to", None) is None
    top = parser.format_help()
    assert " versions " in top and "checkpoints" not in top
    model = parser._subparsers._group_actions[0].choices["model"].format_help()
    assert " score " in model and " eval " not in model
    assert parser.parse_args(["eval"]).handler == "editd.daemon.client:evaluate"
