"""--cache_dir on a URL: a store of tokenized and packed data shared by runs and hosts.

The rows are NumPy memory maps, read from a local disk. So with `--cache_dir gs://bucket/cache` every cache
folder lives in a local mirror ($FLAX_BERT_CACHE/remote/<hash>-cache, flax_bert.storage.mirror): a folder
missing there but present at the URL is downloaded once (only the shards this process reads); a folder built
here is uploaded when finished, its meta.json last, so a folder at the URL without meta.json is unfinished and
never downloaded.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile

from flax_bert import storage
from flax_bert.data.tokenize import publish_folder

log = logging.getLogger("flax_bert")

MARKER = "meta.json"  # a cache folder is complete when it has this file (locally and at the URL)


def fetch(url: str, local_cache: pathlib.Path, folders: list[pathlib.Path]) -> list[pathlib.Path]:
    """Download those of `folders` (inside `local_cache`) that are missing here and complete at `url`.
    Returns the folders downloaded."""
    fetched = []
    for folder in folders:
        relative = folder.relative_to(local_cache).as_posix()
        remote = storage.join(url, relative)
        if (folder / MARKER).is_file() or not storage.isfile(storage.join(remote, MARKER)):
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".download-"))
        try:
            storage.download(remote, staging)
            publish_folder(staging, folder)  # appears whole, as every cache folder does
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        fetched.append(folder)
    if fetched:
        log.info("downloaded %d cache folder%s (%s) from the shared --cache_dir %s to %s", len(fetched),
                 "" if len(fetched) == 1 else "s", ", ".join(f.relative_to(local_cache).as_posix() for f in fetched),
                 url, local_cache)
    return fetched


def publish(url: str, local_cache: pathlib.Path, folders: list[pathlib.Path], replace: bool = False) -> list[pathlib.Path]:
    """Upload those of `folders` that are complete here and not yet complete at `url` (meta.json last);
    `replace` (--overwrite_cache): also those that are, their old meta.json deleted first."""
    uploaded = []
    for folder in folders:
        relative = folder.relative_to(local_cache).as_posix()
        remote = storage.join(url, relative)
        if not (folder / MARKER).is_file():
            continue
        if storage.isfile(storage.join(remote, MARKER)) and not replace:
            continue
        storage.upload_marker_last(folder, remote, MARKER)
        uploaded.append(folder)
    if uploaded:
        log.info("uploaded %d cache folder%s to the shared --cache_dir %s", len(uploaded),
                 "" if len(uploaded) == 1 else "s", url)
    return uploaded
