"""A path that may be a URL: every file of a run directory, a data file or the cache goes through here.

Local paths (no `scheme://`) go through the OS exactly as before. URLs (`gs://bucket/run`, `s3://...`,
`file:///abs/path`, `memory://...`) go through fsspec, which needs the scheme's package (`gcsfs` for `gs://`,
`s3fs` for `s3://`, `adlfs` for `az://`).

What cannot write to a URL itself writes to a local folder that is then uploaded (`local_stage`, `publish`):
the tokenizer training, TensorBoard's event files, transformers' `save_pretrained`. What can only read a local
folder reads a downloaded copy (`fetch_folder`). Checkpoints are Orbax's: `checkpoint_path` says where it writes.

Local copies appear whole or not at all: each writer builds its own temporary file or folder and renames it
into place (`replaced_atomically`), so several processes of one host (one per GPU) or a shared cache never
delete or read each other's partial files, and a kill leaves no truncated copy under the name readers use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import re
import shutil
import tempfile

from flax_bert.errors import InputError, MissingDependencyError

log = logging.getLogger("flax_bert")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# schemes whose checkpoints Orbax writes itself (TensorStore kvstores, etils paths)
ORBAX_SCHEMES = ("gs", "s3")
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
             "hf": "huggingface_hub"}


class UnsupportedURLError(InputError):
    """A URL whose scheme this command cannot use."""


def is_url(path) -> bool:
    return isinstance(path, str) and _URL.match(path) is not None


def scheme(path) -> str | None:
    match = _URL.match(path) if isinstance(path, str) else None
    return match.group(1).lower() if match else None


def absolute(path):
    """An absolute local pathlib.Path, or the URL without a trailing slash."""
    if is_url(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return pathlib.Path(path).expanduser().absolute()


def join(base, *names):
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return pathlib.Path(base).joinpath(*names)


def name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else pathlib.Path(path).name


def suffix(path) -> str:
    return pathlib.PurePosixPath(name(path)).suffix


def parent(path):
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else pathlib.Path(path).parent


def _fs(url: str):
    """(fsspec filesystem, its path) for a URL; a missing implementation is a one-line error naming the package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        package = _PACKAGES.get(scheme(url))
        if package is None:  # fsspec's own message names the package ("Install ocifs to access ...")
            raise MissingDependencyError(f"{scheme(url)}:// paths: {str(err).splitlines()[0]} (reading {url})") from None
        raise MissingDependencyError(f"{scheme(url)}:// paths need {package}: pip install {package} "
                                     f"(reading {url})") from None
    except ValueError as err:
        if "Protocol not known" in str(err):
            raise UnsupportedURLError(f"{url}: fsspec knows no {scheme(url)}:// filesystem: use a local path or a "
                                      "URL fsspec supports (gs://, s3://, az://, file://, ...)") from None
        raise


def local_path(path) -> pathlib.Path | None:
    """The local file a `file://` URL or a plain path names; None for a remote URL."""
    if not is_url(path):
        return pathlib.Path(path).expanduser().absolute()
    if scheme(path) == "file":
        return pathlib.Path(_fs(path)[1])
    return None


# ----------------------------------------------------------------------------- questions
def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def isdir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path) -> list[str]:
    """The names in a folder, sorted; [] when it does not exist."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = _fs(path)
    if not fs.isdir(p):
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False)
                  if entry.rstrip("/") != p.rstrip("/"))


def stat(path) -> tuple[int, int | str]:
    """(size in bytes, a token that changes when the file does): the mtime in ns locally, the object store's
    etag / generation / checksum / mtime for a URL, whichever it reports."""
    if not is_url(path):
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns
    fs, p = _fs(path)
    return _size_and_version(fs.info(p))


def _size_and_version(info: dict) -> tuple[int, str]:
    """(size, version token) from an fsspec info record, whichever version field the store reports."""
    for key in ("ETag", "etag", "generation", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified",
                "updated", "created"):
        if info.get(key) is not None:
            return int(info.get("size") or 0), f"{key}={info[key]}"
    return int(info.get("size") or 0), ""


# ----------------------------------------------------------------------------- reading and writing
def open(path, mode: str = "rb", **kwargs):  # the module's own open, as os.open is os's
    if not is_url(path):
        import builtins

        return builtins.open(path, mode, **kwargs)
    fs, p = _fs(path)
    if "w" in mode or "a" in mode:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
    return fs.open(p, mode, **kwargs)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_atomic(path, text: str) -> None:
    """Readers see the old file or the new one, never a part: locally a hidden temporary file renamed over
    it; on a URL one object written on close (object stores make a single write atomic)."""
    if is_url(path) and local_path(path) is None:
        write_text(path, text)
        return
    target = local_path(path)
    # hidden, and for a hidden file its name + .tmp: the names the output-directory guard knows as ours
    temporary = target.parent / (f"{target.name}.tmp" if target.name.startswith(".") else f".{target.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(target)


def makedirs(path) -> None:
    """Create the folder (object stores have no folders: nothing to do there but it costs nothing)."""
    if not is_url(path):
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def remove(path) -> None:
    """Delete a file or a whole folder."""
    if not is_url(path):
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=fs.isdir(p))


# ----------------------------------------------------------------------------- local copies
@contextlib.contextmanager
def replaced_atomically(target):
    """A temporary path of this writer's own next to `target`, renamed to `target` when the block ends
    without error and deleted when it does not: readers see the old file or the new one, never a part."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = pathlib.Path(name)
    try:
        yield temporary
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def default_cache_dir() -> pathlib.Path:
    """flax-bert's local cache ($FLAX_BERT_CACHE, else ~/.cache/flax_bert): the built-in corpus, URL mirrors."""
    return pathlib.Path(os.environ.get("FLAX_BERT_CACHE") or pathlib.Path.home() / ".cache" / "flax_bert")


def mirror_root() -> pathlib.Path:
    return default_cache_dir() / "remote"


def mirror(url: str) -> pathlib.Path:
    """The local folder that mirrors `url` on this machine, $FLAX_BERT_CACHE/remote/<hash>-<name>."""
    digest = hashlib.sha256(absolute(url).encode()).hexdigest()[:16]
    return mirror_root() / f"{digest}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name(url))[:40]}"


def local_stage(path) -> pathlib.Path:
    """Where to build what `publish(stage, path)` then puts at `path`: `path` itself when it is local, else a
    fresh temporary folder next to the mirror."""
    if not is_url(path):
        return pathlib.Path(path)
    mirror_root().mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(dir=mirror_root(), prefix=f".stage-{name(path)}-"))


def upload(local_folder, url: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `local_folder` to `url` (same relative names), the names in `last` after all
    others, so a reader who waits for them never sees a half-copied folder. Returns the names copied."""
    fs, p = _fs(url)
    local_folder = pathlib.Path(local_folder)
    names = sorted(str(f.relative_to(local_folder)) for f in local_folder.rglob("*") if f.is_file())
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    for relative in ordered:
        target = f"{p.rstrip('/')}/{relative}"
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(local_folder / relative), target)
    return ordered


def upload_marker_last(local_folder, url: str, marker: str) -> list[str]:
    """Upload a folder whose `marker` file says it is complete (a cache folder's meta.json, an export's
    config.json) over what `url` may hold: the old marker is deleted first and the new one goes up last,
    so no reader takes a half-replaced folder for a complete one. Returns the names copied."""
    if exists(join(url, marker)):
        remove(join(url, marker))
    return upload(local_folder, url, last=(marker,))


def publish(stage, path, last: tuple[str, ...] = ()) -> None:
    """Make the folder built in `stage` (from `local_stage(path)`) appear at `path`."""
    if not is_url(path):
        return
    upload(stage, path, last=last)
    shutil.rmtree(stage, ignore_errors=True)


class UnsafeKeyError(InputError):
    """A remote object whose key would land outside the folder it is downloaded into."""


def _inside(local_folder: pathlib.Path, relative: str, url: str) -> pathlib.Path:
    """`local_folder / relative`, refused when the key leaves the folder (`..`, an absolute name)."""
    target = (local_folder / relative).resolve()
    if not target.is_relative_to(local_folder.resolve()) or target == local_folder.resolve():
        raise UnsafeKeyError(f"{url} holds an object named {relative!r}, which would be written outside "
                             f"{local_folder}: refusing to download it (rename or delete that object)")
    return target


def download(url: str, local_folder, names: list[str] | None = None) -> pathlib.Path:
    """Copy the files under `url` (or only `names`, relative to it) into `local_folder`, which the caller
    owns alone (a staging folder). Every name is checked before anything is copied."""
    fs, p = _fs(url)
    local_folder = pathlib.Path(local_folder)
    root = p.rstrip("/")
    wanted = names if names is not None else [f[len(root) + 1:] for f in fs.find(root)]
    targets = {relative: _inside(local_folder, relative, url) for relative in wanted}
    for relative, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root}/{relative}", str(target))
    return local_folder


def local_copy(url: str, folder) -> pathlib.Path:
    """A local copy of the file at `url` in `folder`, named by the URL and the object's version, so it is
    downloaded once per version (for readers that take local files only, or that refuse URLs offline)."""
    size, version = stat(url)
    target = pathlib.Path(folder) / (hashlib.sha256(f"{url}|{size}|{version}".encode()).hexdigest()[:24] + suffix(url))
    if target.is_file():
        return target
    fs, p = _fs(url)
    with replaced_atomically(target) as temporary:
        fs.get_file(p, str(temporary))
    log.info("downloaded %s (%d bytes) to %s", url, size, target)
    return target


def fetch_folder(path) -> pathlib.Path:
    """A local folder holding what `path` holds (for readers that take only local folders, like transformers'
    from_pretrained): `path` itself when local, else a copy in its mirror named by the remote files' names,
    sizes and versions, downloaded once per version. Each process downloads into a staging folder of its own
    and renames it into place; one that finds the version already placed (by another process of this host)
    takes that. Older versions of the same URL are removed."""
    if not is_url(path):
        return pathlib.Path(path)
    if local_path(path) is not None:
        return local_path(path)
    fs, p = _fs(path)
    root = p.rstrip("/")
    files = {name[len(root) + 1:]: _size_and_version(info) for name, info in fs.find(root, detail=True).items()}
    version = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
    folder = mirror(path)
    target = folder / version
    if not target.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
        try:
            download(path, staging, names=sorted(files))
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not "another process placed it first"
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded %s to %s", path, target)
    for old in folder.iterdir():  # earlier versions (and copies from before versions were kept apart)
        if old.name != version and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(path):
    """Where Orbax reads and writes a run's checkpoints: an absolute local path (also for `file://`), or the
    URL for the schemes Orbax writes itself (gs://, s3://). Any other scheme is refused in one line."""
    from etils import epath

    if not is_url(path):
        return epath.Path(pathlib.Path(path).expanduser().absolute())
    if scheme(path) == "file":
        return epath.Path(local_path(path))
    if scheme(path) in ORBAX_SCHEMES:
        return epath.Path(absolute(path))
    raise UnsupportedURLError(f"{path}: checkpoints cannot be written to {scheme(path)}:// (Orbax writes local "
                              f"paths, file://, {', '.join(s + '://' for s in ORBAX_SCHEMES)}): choose one of those "
                              "for --output_dir")
