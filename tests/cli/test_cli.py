"""The command line: help with examples, `oneword info`, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from oneword.cli import build_parser, main


def test_help_lists_every_subcommand_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "invert", "export", "demo", "world", "generate", "eval"):
        assert command in out, command
    assert "examples:" in out


def test_help_lists_the_commands_without_importing_them():
    # The listing comes from the command table alone: the same text as with every command's
    # module loaded, and no torch (seconds on a CPU) for `oneword --help` or `--version`.
    assert build_parser([]).format_help() == build_parser().format_help()
    code = (
        "import sys\n"
        "from oneword.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    # One command's run or help builds that command in full.
    with pytest.raises(SystemExit):
        main(["export", "--help"])


def test_info_reports_family_widths_and_vocabulary(tiny_sdxl_dir, capsys):
    assert main(["info", str(tiny_sdxl_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "sdxl"
    assert facts["widths"] == [32, 48]
    assert facts["vocab_size"] == 49408
    assert facts["prediction_type"] == "epsilon"


@pytest.mark.slow
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oneword.cli", "info", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "Traceback" not in result.stderr


def test_export_of_an_unsafe_file_is_refused_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04not really a pickle")
    assert main(["export", str(bad), "--to", "a1111", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()
