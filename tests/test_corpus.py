"""The built-in offline corpus: deterministic, big enough, cached, built without imports."""

import json
import sys

import pytest

from flax_bert.data import corpus
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus-cache")
    corpus.builtin_corpus_path(folder)  # one build (a few seconds) shared by the tests below
    return folder


def test_corpus_is_identical_twice_and_large_enough(cache_dir):
    path = corpus.builtin_corpus_path(cache_dir)
    cached = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    rebuilt = corpus.build_corpus()
    assert rebuilt == cached
    size = sum(len(text.encode("utf-8")) for text in rebuilt)
    assert size >= 1_500_000, size
    assert len(rebuilt) > 1000
    assert len(set(rebuilt)) == len(rebuilt)  # duplicates are dropped


def test_corpus_is_prose_from_docstrings_and_topics(cache_dir):
    documents = corpus.load_builtin_corpus(cache_dir)
    assert any(text.startswith("Serialize ``obj`` to a JSON formatted ``str``") for text in documents)  # json
    assert any("Assert statements are a convenient way" in text for text in documents)  # a pydoc topic
    # inspect.cleandoc removed the source indentation: no document starts with spaces
    assert not any(text[:1].isspace() for text in documents)


def test_corpus_is_cached_and_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAX_BERT_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(corpus, "build_corpus", lambda stdlib=None: ["A small stand-in corpus."])
    first = corpus.builtin_corpus_path()
    assert first.is_relative_to(tmp_path / "env-cache")
    stamp = first.stat().st_mtime_ns
    assert corpus.builtin_corpus_path() == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert f"py{sys.version_info[0]}.{sys.version_info[1]}" in first.name
    assert not list(first.parent.glob("*.tmp"))


def test_corpus_reads_source_without_importing(tmp_path):
    """A fake stdlib: a module whose import would fail still gives its docstrings."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module docstring with enough words."""\nraise ImportError("never imported")\n'
        'class A:\n    """Class docstring,\n       indented in the source."""\n'
        '    def f(self):\n        """Method docstring here."""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Test docstrings are skipped entirely."""\n')
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text(
        "topics = {'b': 'Topic b text here.\\n', 'a': 'Topic a text here.'}\n")
    assert corpus.build_corpus(tmp_path) == [
        "Module docstring with enough words.",
        "Class docstring,\nindented in the source.",
        "Method docstring here.",
        "Topic a text here.",
        "Topic b text here.",
    ]
