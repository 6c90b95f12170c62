"""Every ``diclip ...`` command in README.md and cluster/README.md still parses: the CLI knows its
subcommand and options, and every ``key=value`` names a setting of the spec. Nothing is run (the table
"How these docs are checked" in README.md says which test runs which command), so a renamed flag,
subcommand or setting breaks this test, not a reader."""
from __future__ import annotations

import shlex

import pytest

from diclip import cli
from diclip.config import _field_type
from tests.helpers import READMES, REPO, readme_commands

# synopsis placeholders of cluster/README's `diclip submit/status/logs/stop` block -> sample values
PLACEHOLDERS = {"[key=value ...]": "train.max_iters=1", "[--no-wait]": "--no-wait", "[--timeout S]": "--timeout 60",
                "[--follow]": "--follow", "--address ...": "--address http://HOST:8265", "<registry>": "registry"}
DOC_ERRORS = {"trian.max_iters"}
"""Keys the README shows as mistakes (its example of a one-line error): they must stay unknown."""


def diclip_commands() -> list[tuple[str, str]]:
    """(README path, command) for every diclip command line in the READMEs' code blocks."""
    return [(readme.relative_to(REPO).as_posix(), cmd) for readme in READMES for _, cmd in readme_commands(readme)
            if cmd.startswith(("diclip ", ".venv/bin/diclip "))]


COMMANDS = diclip_commands()


def test_the_readmes_show_the_main_commands_and_the_parse_is_strict() -> None:
    subcommands = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"--help", "run", "validate", "show", "correlate", "submit", "status", "logs", "stop", "cluster"} <= subcommands
    for wrong in (["logs", "JOB", "--folow"], ["submt", "configs/demo.yaml"], ["cluster", "render", "x.yaml", "--output", "d"]):
        with pytest.raises(SystemExit):
            cli.parse(cli.build_parser(), wrong)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_every_readme_diclip_command_parses(where: str, command: str) -> None:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)[1:]
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as e:
            cli.parse(cli.build_parser(), argv)
        assert e.value.code == 0
        return
    try:
        args = cli.parse(cli.build_parser(), argv)
    except SystemExit as e:  # argparse: unknown subcommand or option
        pytest.fail(f"{where}: `{command}` does not parse (exit {e.code})")
    assert args.command, command
    if args.command == "cluster":
        assert args.cluster_command == "render", command
    for override in getattr(args, "overrides", []):
        key = override.split("=", 1)[0]
        if key in DOC_ERRORS:
            assert _field_type(key) is None, f"{key} was meant as a mistake in the README but is a setting now"
        else:
            assert _field_type(key) is not None, f"{where}: `{command}`: {key} is not a setting of the spec"


def test_the_readme_show_and_mistake_examples_print_what_the_readme_says(capsys, monkeypatch) -> None:
    """The two README commands cheap enough to run here: `show` prints the merged spec, and the example
    mistake prints exactly the error line the README shows under it."""
    import yaml

    monkeypatch.chdir(REPO)
    commands = [c for _, c in readme_commands(REPO / "README.md")]
    (show,) = [c for c in commands if c.startswith(".venv/bin/diclip show ")]
    assert cli.main(shlex.split(show)[1:]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "coco"
    i = next(i for i, c in enumerate(commands) if c.startswith("diclip run ") and "trian." in c)
    assert cli.main(shlex.split(commands[i])[1:]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [commands[i + 1]]


def test_every_test_the_docs_table_names_exists() -> None:
    """README "How these docs are checked" names tests by id (``::name`` alone: the file named before it)."""
    import re

    text = (REPO / "README.md").read_text()
    table = text[text.index("## How these docs are checked"):]
    table = table[:table.index("\n## ", 10)]
    current, named = None, []
    for path, name in re.findall(r"(tests/[\w/]+\.py)?::(test_\w+)", table):
        current = path or current
        named.append((current, name))
    assert len(named) >= 15
    for path, name in named:
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"
