"""On-disk cache of autotune results: which config won for a key
(arch, dtype, shape bucket, kernel version).

One JSON file per kernel version in config.cache_dir() ($FUSED_RESNET_CACHE_DIR
or set_cache_dir(), else $XDG_CACHE_HOME/fused_resnet, else
~/.cache/fused_resnet). The cache is an
optimisation only: a file that cannot be read or parsed, or an entry naming a
config that no longer exists, is ignored with a warning and re-tuned; a
directory that cannot be written is warned about once and the result kept in
memory. Writes go to a temporary file and are renamed into place, so a reader
never sees half a file, even with several processes tuning at once.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

from ... import config

_FORMAT = 1


def cache_dir() -> Path:
    """config "cache_dir" (set_cache_dir / $FUSED_RESNET_CACHE_DIR at import)."""
    return config.cache_dir()


def make_key(arch: int, dtype: str, bucket: str, kernel_version: str) -> str:
    return f"sm{arch}|{dtype}|{bucket}|{kernel_version}"


class AutotuneCache:
    """key -> config name, backed by one JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, str] | None = None
        self._write_failed = False

    def _load(self) -> dict[str, str]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, str] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("not a fused_resnet autotune cache (missing 'format'/'entries')")
            entries = {str(k): v for k, v in data["entries"].items() if isinstance(v, str)}
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is ignored, never fatal
            warnings.warn(
                f"fused_resnet: ignoring unreadable autotune cache {self.path} "
                f"({type(exc).__name__}: {exc}); it will be re-tuned and rewritten",
                RuntimeWarning,
                stacklevel=3,
            )
        self._entries = entries
        return entries

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, config_name: str) -> None:
        self.put_many({key: config_name})

    def put_many(self, new: dict[str, str]) -> None:
        """Several entries in one write (seeding a cache from a record)."""
        with self._lock:
            entries = self._load()
            entries.update(new)
            self._write(entries)

    def entries(self) -> dict[str, str]:
        """Every entry: the file as it is now (other processes may have tuned
        since this one read it), with this process's entries over it."""
        with self._lock:
            mine = dict(self._load())
        return {**AutotuneCache(self.path)._load(), **mine}

    def _write(self, entries: dict[str, str]) -> None:
        if self._write_failed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Merge with what other processes wrote since we read the file.
            try:
                with open(self.path, encoding="utf-8") as f:
                    on_disk = json.load(f).get("entries", {})
                if isinstance(on_disk, dict):
                    for k, v in on_disk.items():
                        if isinstance(v, str):
                            entries.setdefault(str(k), v)
            except Exception:  # noqa: BLE001 - a bad file on disk is simply replaced
                pass
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                # e.g. the path is a directory, or the disk is full: leave no stray temporary file.
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            self._write_failed = True
            warnings.warn(
                f"fused_resnet: cannot write autotune cache {self.path} ({exc}); "
                "results are kept in memory for this process only",
                RuntimeWarning,
                stacklevel=3,
            )


_caches: dict[Path, AutotuneCache] = {}


def get_cache(kernel_version: str) -> AutotuneCache:
    """The process-wide cache object for a kernel version (file path chosen
    from the environment at first use)."""
    path = cache_dir() / f"autotune-{kernel_version}.json"
    if path not in _caches:
        _caches[path] = AutotuneCache(path)
    return _caches[path]
