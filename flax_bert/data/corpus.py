"""The built-in offline corpus: English prose that every Python installation carries.

Used when no dataset is named, so training works on a fresh machine with no network. Two sources,
both read without importing anything (so no module side effects and no optional C extensions):
  * the documentation strings of the standard library (module, class and function docstrings),
    read from its ``.py`` files with ``ast``;
  * the language-reference topics in ``pydoc_data/topics.py`` (a dict literal, read with
    ``ast.literal_eval``).
One docstring or one topic is one document. The collection is deterministic (sorted paths, source
order, first occurrence of a duplicate kept), so the same Python version gives the same text; about
2.2 MB on CPython 3.11. It takes a few seconds to build and is cached as JSON lines under the cache
directory (``$FLAX_BERT_CACHE`` or ``~/.cache/flax_bert``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import tempfile

from flax_bert import storage
from flax_bert.storage import default_cache_dir

# Directories whose files are not library prose: tests (full of deliberately odd docstrings and
# files that do not parse), third-party packages, build artifacts, demos.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__", "turtledemo"}
)
_MIN_WORDS = 3  # "XXX", "Dummy." and similar stubs teach nothing
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _docstrings_in_source_order(node: ast.AST):
    """Depth-first, so a class's method docstrings follow the class docstring (helps sentence pairs).
    Walks statement bodies only: docstrings never live inside expressions, and skipping those is
    most of the work saved."""
    if isinstance(node, _DOC_NODES):
        text = ast.get_docstring(node, clean=True)  # clean=True applies inspect.cleandoc
        if text:
            yield text
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, ast.AST):
                yield from _docstrings_in_source_order(child)


def _library_files(stdlib: pathlib.Path):
    """The library's .py files in sorted relative-path order, skipping _SKIPPED_DIRS without entering them."""
    found = []
    for folder, subfolders, files in os.walk(stdlib):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        found.extend(pathlib.Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(stdlib).as_posix())


def _stdlib_docstrings(stdlib: pathlib.Path):
    for path in _library_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few files are deliberately invalid or unreadable; they hold no prose we need
        yield from _docstrings_in_source_order(tree)


def _pydoc_topics(stdlib: pathlib.Path):
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.is_file():
        return
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield topics[name].strip()


def build_corpus(stdlib: str | os.PathLike | None = None) -> list[str]:
    """Collects the corpus documents (no caching): stdlib docstrings, then pydoc topics."""
    stdlib = pathlib.Path(stdlib) if stdlib else _stdlib_dir()
    seen: set[str] = set()
    documents = []
    for text in (*_stdlib_docstrings(stdlib), *_pydoc_topics(stdlib)):
        if len(text.split()) < _MIN_WORDS or text in seen:
            continue
        seen.add(text)
        documents.append(text)
    return documents


def builtin_corpus_path(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> pathlib.Path:
    """Path of the cached corpus (JSON lines, one ``{"text": ...}`` per document); built on first use.

    The file name carries the Python version and the stdlib location, so a different interpreter gets
    its own file; the write is atomic (temp file + rename) so a crash never leaves half a corpus.
    """
    stdlib = _stdlib_dir()
    tag = hashlib.sha256(f"{sys.version}|{stdlib}".encode()).hexdigest()[:12]
    if cache_dir and "://" in str(cache_dir):  # a shared --cache_dir URL: this file stays on the local disk
        cache_dir = storage.mirror(str(cache_dir))
    folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / "builtin_corpus" / f"stdlib-docs-py{sys.version_info[0]}.{sys.version_info[1]}-{tag}.jsonl"
    if path.is_file() and not rebuild:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for text in build_corpus(stdlib):
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_builtin_corpus(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The corpus documents, from the cache (built first if absent)."""
    with open(builtin_corpus_path(cache_dir), encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]
