"""The README's commands and snippets cannot rot: its Python runs here, its test command is CI's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_exactly_two_commands():
    before_prose = README.split("\n\n", 1)[1].split("\nThe first")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", before_prose, flags=re.S)
    assert len(commands) == 2, commands
    setup_and_demo, setup_and_test = commands
    assert setup_and_demo.endswith("oneword demo")
    assert "pytest" in setup_and_test
    # CI runs the same test command.
    assert setup_and_test in (ROOT / ".ci" / "run").read_text()


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    snippets = _blocks("python")
    assert snippets
    for snippet in snippets:
        namespace: dict = {}
        exec(
            compile(snippet.replace("/tmp/oneword-readme", str(tmp_path)), "README.md", "exec"),
            namespace,
        )
    assert (tmp_path / "cup" / "learned_embeds.safetensors").exists()
    from oneword.embeddings import load_embedding

    assert load_embedding(tmp_path / "cup" / "learned_embeds.safetensors").token == "<my-cup>"


def test_readme_commands_exist():
    from oneword.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    for name in re.findall(r"`oneword ([a-z]+)", README):
        assert name in commands, name


def test_docs_hold_no_placeholder_left_for_a_number():
    # "@@NAME@@" marks where a measurement still has to be written in while a release is
    # prepared; none may land.
    for path in (ROOT / "README.md", ROOT / "checkpoints" / "README.md"):
        left = re.findall(r"@@[A-Z0-9-]+@@", path.read_text())
        assert not left, f"{path.relative_to(ROOT)} still holds {left}"
