"""The README and docs cannot rot: their commands, configs, links and Python example are exercised here."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from rdr_jax.cli import build_parser, main
from rdr_jax.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                                                               ROOT / "benchmarks" / "README.md"]}


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """Fenced blocks in order (of one language when given)."""
    return [body for tag, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in (None, tag)]


def test_readme_opens_with_the_two_commands():
    first = code_blocks(README)[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.index("```") < README.index("##")  # before any section
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_documented_subcommand_exists_and_has_help(capsys):
    mentioned = set()
    for text in DOCS.values():
        mentioned |= set(re.findall(r"rdr-jax ([a-z][a-z-]+)", text))
    assert {"convert", "encode", "index", "retrieve", "evaluate", "read", "teacher-scores", "rerank", "generate",
            "train", "demo"} <= mentioned
    unknown = mentioned - set(COMMANDS)
    assert not unknown, f"documented but not a command: {unknown}"
    for name in sorted(mentioned):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, f"rdr-jax {name} --help has no examples"


def test_documented_flags_exist():
    """Each `--flag` written after `rdr-jax COMMAND` in the docs is an option of that command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for doc, text in DOCS.items():
        joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        for line in joined.splitlines():
            for match in re.finditer(r"rdr-jax ([a-z-]+)(.*)", line):
                name, rest = match.group(1), match.group(2)
                if name not in sub:
                    continue
                options = {o for a in sub[name]._actions for o in a.option_strings}
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest.split("#")[0]):
                    assert flag in options, f"{doc}: rdr-jax {name} has no option {flag}"


def test_documented_configs_and_links_exist():
    from rdr_jax.tasks import load_config

    for doc, text in DOCS.items():
        for path in set(re.findall(r"(configs/[\w/.-]+\.yaml)", text)):
            assert (ROOT / path).is_file(), f"{doc} names a missing config {path}"
            load_config(ROOT / path, [], workdir="/tmp/unused")  # parses and validates
        base = (ROOT / doc).parent
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            assert (base / target).exists(), f"{doc} links to a missing {target}"


def test_readme_python_example_runs(minilm_dir, tmp_path, monkeypatch):
    example = code_blocks(README, "python")[0]
    example = re.sub(r'"path/to/[\w-]+"', repr(str(minilm_dir)), example)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "ctx_hf" / "model.safetensors").is_file()
    assert (tmp_path / "ctx_native" / "orbax").is_dir()
    assert float((namespace["q"] @ namespace["p"].T)[0, 0]) > 0
    # the unpadded example continues the first one and must give the padded forward's embeddings
    exec(compile(code_blocks(README, "python")[1], "README.md", "exec"), namespace)
    unpadded = namespace["embed"](namespace["ctx"], namespace["batch"], namespace["packing"])
    padded = namespace["ctx"](**namespace["batch"]).pooler_output
    assert unpadded.shape == padded.shape == (2, 384)
    assert float(abs(unpadded - padded).max()) < 1e-4
    assert namespace["batch"]["attention_mask"].min() == 0  # the example's batch does have padding


def test_readme_training_commands(tmp_path):
    """The README's tiny training command and its resume line, as written (workdir moved to tmp)."""
    block = next(b for b in code_blocks(README, "bash") if "rdr-jax train configs/tiny/dpr.yaml" in b)
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    tiny = [line for line in lines if "configs/tiny/" in line]
    assert len(tiny) == 2
    for line in tiny:
        args = line.replace("runs/tiny_dpr", str(tmp_path / "tiny_dpr")).split()[1:]
        assert main([*args[:1], str(ROOT / args[1]), *args[2:], "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "tiny_dpr" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # 6 steps, then resumed to 12 without repeating any
