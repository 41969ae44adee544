"""Offline, gpt-4o-family prompts are counted with the true o200k_base: bpe-openai's copy
of the vocabulary, used only when its sha256 is the one tiktoken expects for the file
it downloads; anything else is refused and counting falls back as before."""

from __future__ import annotations

import gzip
import logging
import time

import pytest
import tiktoken

from llm_quota.rules import estimation

#: Texts whose o200k_base counts differ from cl100k_base's (bpe-openai's own Rust
#: tokenizer agrees): (text, o200k_base, cl100k_base).
KNOWN_COUNTS = [
    ("Привет, мир! Как у тебя дела сегодня?", 11, 20),
    ("日本語のテキストを数えます。", 11, 13),
    ("नमस्ते दुनिया, आप कैसे हैं?", 10, 27),
]


@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """A tiktoken cache that says the o200k_base download just failed: no process
    tries the network, as on a machine without one."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    (tmp_path / "llm_quota-o200k_base.download-failed").write_text(f"{time.time():.3f}\n")
    return tmp_path


def test_offline_a_gpt4o_prompt_is_counted_with_the_true_o200k_base(no_download):
    encoding = estimation._load(estimation.encoding_name_for("gpt-4o"))
    assert encoding.name == "o200k_base"
    assert encoding.n_vocab == 200019
    stand_in = tiktoken.get_encoding(estimation.OFFLINE_ENCODING)
    for text, o200k, cl100k in KNOWN_COUNTS:
        assert estimation.count_text(text, encoding) == o200k
        assert estimation.count_text(text, stand_in) == cl100k


def corrupt_copy(path: str, folder) -> str:
    """The bundled file with one token's rank changed: still a valid vocabulary file."""
    with gzip.open(path, "rb") as original:
        lines = original.read().splitlines()
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode()
    copy = folder / "o200k_base.tiktoken.gz"
    copy.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return str(copy)


def test_a_bundled_file_that_is_not_tiktokens_is_refused_and_counting_falls_back(
    no_download, monkeypatch, caplog
):
    real = estimation._bundled_file("o200k_base")
    assert real is not None  # bpe-openai is pinned in requirements.txt
    corrupted = corrupt_copy(real, no_download)
    monkeypatch.setattr(estimation, "_bundled_file", lambda name: corrupted)
    # A library's logging set-up in an earlier test may have disabled existing loggers.
    monkeypatch.setattr(estimation.logger, "disabled", False)
    with caplog.at_level(logging.WARNING, logger=estimation.logger.name):
        encoding = estimation._load("o200k_base")
    assert encoding.name == estimation.OFFLINE_ENCODING  # as before: the cl100k stand-in
    refused, fallback = caplog.messages
    assert refused.startswith(f"{corrupted} refused: its sha256 is not 446a9538cb6c")
    assert "counting with the offline cl100k_base" in fallback


def test_an_unreadable_bundled_file_falls_back_without_an_error(no_download, monkeypatch):
    broken = no_download / "o200k_base.tiktoken.gz"
    broken.write_bytes(b"not gzip")
    monkeypatch.setattr(estimation, "_bundled_file", lambda name: str(broken))
    assert estimation._load("o200k_base").name == estimation.OFFLINE_ENCODING


def test_without_the_package_the_offline_stand_in_counts(no_download, monkeypatch):
    monkeypatch.setattr(estimation, "BUNDLE_PACKAGE", "no_such_package_for_llm_quota")
    assert estimation._bundled_file("o200k_base") is None
    assert estimation._load("o200k_base").name == estimation.OFFLINE_ENCODING
