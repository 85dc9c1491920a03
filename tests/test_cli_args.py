"""Every numeric flag of every `rdr-jax` command is range-checked by argparse.

The parser is walked by introspection (every subparser, every option), so a flag added later is covered
without touching this file: a numeric option must use a type of rdr_jax/commands/args.py, and 0 and -1 give a
clean argparse error (exit 2, one `error:` line, no traceback) wherever they are out of its range.
"""

import argparse

import pytest

from rdr_jax.cli import build_parser
from rdr_jax.commands.args import RangedNumber

def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def minimal_argv(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command with a placeholder for each required argument, so that one option can be tried alone."""
    argv = [name]
    for action in parser._actions:
        if not action.option_strings:
            argv.append(next(iter(action.choices)) if action.choices else "x")
        elif action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def options():
    for name, parser in subparsers().items():
        for action in parser._actions:
            if action.option_strings and action.nargs != 0:
                yield name, parser, action


def is_numeric(action) -> bool:
    if isinstance(action.type, RangedNumber) or action.type in (int, float):
        return True
    default = action.default[0] if isinstance(action.default, list) and action.default else action.default
    return isinstance(default, (int, float)) and not isinstance(default, bool)


NUMERIC = [(name, action.option_strings[-1]) for name, _, action in options() if is_numeric(action)]


def test_the_walk_sees_the_numeric_flags():
    assert {("retrieve", "--k"), ("encode", "--shard-size"), ("index", "--hnsw-m"), ("index", "--nlist"),
            ("encode", "--max-length"), ("rerank", "--label-index"), ("generate", "--num-beams")} <= set(NUMERIC)


def test_every_numeric_flag_has_a_range_checked_type():
    unchecked = [(name, action.option_strings[-1]) for name, _, action in options()
                 if is_numeric(action) and not isinstance(action.type, RangedNumber)]
    assert not unchecked, f"numeric flags without a range-checked type (use rdr_jax/commands/args.py): {unchecked}"


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("name,option", NUMERIC)
def test_zero_and_negative_values(name, option, value, capsys):
    parser = subparsers()[name]
    action = next(a for a in parser._actions if option in a.option_strings)
    argv = minimal_argv(name, parser) + [option, value]
    number = action.type.kind(value)
    if action.type.accepts(number):
        args = build_parser().parse_args(argv)
        got = getattr(args, action.dest)
        assert got == ([number] if action.nargs in ("+", "*") else number)
        return
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0] and f"got {value}" in errors[0], err


def test_ranged_types_parse_and_refuse():
    from rdr_jax.commands.args import nonnegative_int, positive_float, positive_int

    assert positive_int("3") == 3 and nonnegative_int("0") == 0 and positive_float("0.5") == 0.5
    for parse, text in ((positive_int, "0"), (positive_int, "1.5"), (nonnegative_int, "-1"),
                        (positive_float, "0"), (positive_float, "nan"), (positive_float, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
