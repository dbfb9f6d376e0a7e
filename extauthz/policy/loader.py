"""Read a policy directory into one validated PolicySet (all files or nothing)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from extauthz.errors import PolicyError, Problem
from extauthz.policy.model import PolicySet
from extauthz.policy.schema import CompileResult, compile_documents
from extauthz.policy.source import YamlSyntaxError, read_documents

POLICY_SUFFIXES = (".yaml", ".yml")
REVISION_LENGTH = 12


def discover_files(directory: Path) -> list[Path]:
    """List the policy files below `directory`, sorted.

    Hidden entries are skipped: that drops editor temporary files and the timestamped
    folders and `..data` link of a Kubernetes ConfigMap mount, whose files are read once
    through the visible links that point into `..data`.
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.endswith(POLICY_SUFFIXES):
                continue
            found.append(Path(root) / name)
    return sorted(found)


def read_policy_files(directory: Path) -> list[tuple[str, bytes]]:
    """Read every policy file as (display path, content); raises PolicyError when unreadable."""
    if not directory.is_dir():
        reason = "does not exist" if not directory.exists() else "is not a directory"
        raise PolicyError([Problem(str(directory), 0, f"policy directory {reason}; give the path of the "
                                   "directory that holds the policy YAML files")])
    contents = []
    problems = []
    for path in discover_files(directory):
        try:
            contents.append((str(path), path.read_bytes()))
        except OSError as exc:
            problems.append(Problem(str(path), 0, f"cannot read file: {exc.strerror or exc}"))
    if problems:
        raise PolicyError(problems)
    return contents


def revision_of(contents: list[tuple[str, bytes]], directory: Path | None = None) -> str:
    """Hash file names and contents: the same files give the same revision id.

    Names are taken relative to `directory`, so `validate` and `serve` report the same
    revision however the directory is spelled.
    """
    digest = hashlib.sha256()
    named = [(os.path.relpath(name, directory) if directory else name, data) for name, data in contents]
    for name, data in sorted(named):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:REVISION_LENGTH]


def compile_policy_files(contents: list[tuple[str, bytes]], revision: str | None = None) -> PolicySet:
    """Validate and compile file contents; raises PolicyError listing every error found.

    `revision` defaults to the hash of `contents` as named.
    """
    result = CompileResult()
    for name, data in contents:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            result.problems.append(Problem(name, 1, f"file is not UTF-8 text (byte {exc.start}); save it as UTF-8"))
            continue
        try:
            documents = read_documents(text)
        except YamlSyntaxError as exc:
            result.problems.append(Problem(name, exc.line, exc.message))
            continue
        if not documents:
            # An editor truncates a file before writing it. Loading at that moment would
            # drop the file's policies, so an empty file is an error, not an empty set.
            result.problems.append(Problem(name, 1, "file has no YAML documents; delete the file to remove "
                                           "its policies"))
            continue
        compile_documents(name, documents, result)
    _check_duplicates(result)
    errors = [p for p in result.problems if p.severity == "error"]
    if errors:
        raise PolicyError(result.problems)
    return PolicySet(
        revision=revision or revision_of(contents),
        request_authentications=tuple(result.request_authentications),
        authorization_policies=tuple(result.authorization_policies),
        inline_jwks=tuple(result.inline_jwks.values()),
        remote_jwks=tuple(result.remote_jwks.values()),
        files=tuple(name for name, _ in contents),
        warnings=tuple(str(p) for p in result.problems),
    )


def _check_duplicates(result: CompileResult) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    refs = [ra.ref for ra in result.request_authentications] + [ap.ref for ap in result.authorization_policies]
    for ref in refs:
        key = (ref.kind, ref.namespace, ref.name)
        if key in seen:
            result.problems.append(Problem(ref.file, ref.line, f"{ref.kind}/{ref.namespace}/{ref.name}: "
                                           f"defined twice (first in {seen[key]}); rename one of them"))
        else:
            seen[key] = f"{ref.file}:{ref.line}"


def load_policy_dir(directory: Path) -> PolicySet:
    """Read, validate and compile a policy directory; raises PolicyError."""
    contents = read_policy_files(directory)
    return compile_policy_files(contents, revision_of(contents, directory))
