"""Resolve a catalog source to a local directory and a revision: the one loading path for every model.

A Hub source goes through the Hugging Face cache (with the user's token); a local source is a directory,
built once by a named builder when the catalog says so. Either way the runner then loads from a directory.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import ServiceError
from models.catalog import ModelSpec
from models.registry import builder, runner_class

log = logging.getLogger(__name__)


class ModelSourceError(ServiceError):
    status_code = 500


@dataclass(frozen=True)
class ResolvedSource:
    directory: Path
    revision: str  # the commit sha for a Hub snapshot; a content digest for a local directory


@dataclass(frozen=True)
class LoadOptions:
    model_store: Path
    hf_token: str | None = None
    hf_cache_dir: str | None = None
    offline: bool = False


def local_revision(directory: Path) -> str:
    """A stable digest of a local model directory: file names, sizes and the small JSON files' contents."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        h.update(rel.encode())
        h.update(str(path.stat().st_size).encode())
        if path.suffix == ".json" and path.stat().st_size < 1_000_000:
            h.update(path.read_bytes())
    return h.hexdigest()[:40]


def prepare_local(spec: ModelSpec, model_store: Path) -> Path:
    """The local directory of `spec`, built by its builder first if it is missing."""
    assert spec.source.path is not None
    directory = Path(spec.source.path).expanduser()
    if not directory.is_absolute():
        directory = model_store.expanduser() / directory
    if not (directory.is_dir() and any(directory.iterdir())):
        if not spec.source.prepare:
            raise ModelSourceError(f"model {spec.id}: directory {directory} does not exist")
        log.info("building %s into %s", spec.source.prepare, directory)
        tmp = directory.with_name(directory.name + ".partial")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        builder(spec.source.prepare)(tmp)
        tmp.rename(directory)  # atomic: a crash mid-build never leaves a half directory in place
    return directory


def resolve_source(spec: ModelSpec, options: LoadOptions) -> ResolvedSource:
    if spec.source.repo_id is not None:
        cls = runner_class(spec.task)
        try:
            directory = cls.download(
                spec.source.repo_id,
                spec.source.revision,
                options.hf_token,
                options.hf_cache_dir,
                options.offline,
            )
        except Exception as err:
            where = "the Hugging Face cache (offline)" if options.offline else "the Hugging Face Hub"
            raise ModelSourceError(
                f"model {spec.id}: cannot get {spec.source.repo_id}@{spec.source.revision} from {where}: "
                f"{type(err).__name__}: {err}"
            ) from err
        # A snapshot directory is named by its commit sha.
        return ResolvedSource(directory=directory, revision=directory.name)
    directory = prepare_local(spec, options.model_store)
    return ResolvedSource(directory=directory, revision=local_revision(directory))
