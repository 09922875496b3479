"""The README's snippets run as written: every Python block executes in a fresh folder (files it reads are
written by an earlier line), and every CLI line parses with the current options."""
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(_blocks("python"))))
def test_python_snippet_runs_as_written(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing from the repository or an earlier test: only what the snippet writes
    exec(compile(_blocks("python")[i], f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_cli_lines_parse_with_the_current_options():
    from maskconv.cli import _build_parser, config_from_args

    lines = [ln for b in _blocks("bash") for ln in b.replace("\\\n", " ").splitlines() if ln.startswith("$M ")]
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line.split(" # ")[0].split("   #")[0])[1:]
        if "--help" in argv:
            continue
        args, extra = _build_parser().parse_known_args(argv)
        assert not [e for e in extra if e.startswith("-")], line
        if args.command in ("pretrain", "finetune", "linprobe"):
            args.overrides = list(args.overrides) + extra
            config_from_args(args)  # recipe, keys and values valid
