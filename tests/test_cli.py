"""The dsv3 command line: generate and chat run end to end and report errors clearly."""

from __future__ import annotations

import io
import sys

import pytest

from dsv3.cli import main


def test_generate_streams_a_completion(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--preset", "tiny", "Hello", "--max-new-tokens", "6", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and len(out) > len("Hello")
    assert "6 tokens in" in err and "tokens/s" in err


def test_generate_is_deterministic_with_a_seed(capsys: pytest.CaptureFixture) -> None:
    texts = []
    for _ in range(2):
        main(["generate", "--preset", "tiny", "Once", "--max-new-tokens", "8", "--temperature", "0.9",
              "--seed", "3"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_chat_keeps_history_and_resets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n/reset\nfresh\n/exit\nignored\n"))
    assert main(["chat", "--preset", "tiny", "--max-new-tokens", "4", "--greedy"]) == 0
    err = capsys.readouterr().err
    assert err.count("4 tokens in") == 3 and "[history cleared]" in err


def test_cli_errors_name_the_problem(tmp_path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["generate", "--model", str(tmp_path), "hi"])
    assert main(["generate", "--preset", "tiny", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
