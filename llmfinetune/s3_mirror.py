"""`model_config.initialization.s3_mirror_config`: copy the model from an S3 bucket (AWS or any S3-compatible
endpoint) into the Hugging Face cache, once.

The bucket prefix holds the model's files plus a `hash` file naming the hub commit they came from. They are copied to
`<cache>/models--ORG--NAME/snapshots/<hash>/`, and `refs/main` is set to that hash: the layout of the hub's own
downloads, so `from_pretrained("ORG/NAME")` finds the model offline afterwards, here and in any later process. A
snapshot that already has config.json is not copied again. One process per machine copies (a file lock in the
cache's `.locks` folder); the others wait for it and reuse its copy.

boto3 finds credentials and region the usual AWS ways (environment, ~/.aws, AWS_PROFILE, an instance role).
`s3_sync_args`, the extra `aws s3 sync` arguments of the original, are honoured where they have a meaning for a
one-time copy and refused by name where they do not. Nothing falls back silently: a bucket that cannot be read ends
the command with its cause.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .errors import UserError

if TYPE_CHECKING:
    from .config import Job

logger = logging.getLogger(__name__)

KEY = "model_config.initialization.s3_mirror_config"
INSTALL_HINT = "pip install 'llmfinetune[s3]'"
HASH_FILE = "hash"
# The original's commit name for a bucket without a hash file.
NO_HASH = "0" * 40
_COMMIT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# `aws s3 sync` arguments that only shape its console output: nothing to do for a copy.
_OUTPUT_ONLY = ("--quiet", "--only-show-errors", "--no-progress")
_FLAGS = ("--no-sign-request", "--no-verify-ssl", *_OUTPUT_ONLY)
_VALUED = ("--exclude", "--include", "--region", "--endpoint-url", "--profile", "--ca-bundle")


@dataclass
class SyncOptions:
    """s3_sync_args, read: what boto3 is told and which files are copied."""

    unsigned: bool = False
    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    profile: Optional[str] = None
    verify: Union[bool, str, None] = None
    # ("exclude" | "include", pattern) in the order given; as in `aws s3 sync`, the last matching filter decides.
    filters: list[tuple[str, str]] = field(default_factory=list)

    def wants(self, relative: str) -> bool:
        keep = True
        for kind, pattern in self.filters:
            if fnmatch.fnmatchcase(relative, pattern):
                keep = kind == "include"
        return keep


def is_remote(bucket_uri: Optional[str]) -> bool:
    return bool(bucket_uri) and "://" in bucket_uri


def parse_sync_args(args: list[str]) -> SyncOptions:
    options = SyncOptions()
    where = f"{KEY}.s3_sync_args"
    items = list(args)
    position = 0
    while position < len(items):
        raw = items[position]
        if not isinstance(raw, str):
            raise UserError(f"{where}: expected a list of strings like '--no-sign-request', got {raw!r}.")
        name, sep, value = raw.partition("=")
        position += 1
        if name in _FLAGS and not sep:
            if name == "--no-sign-request":
                options.unsigned = True
            elif name == "--no-verify-ssl":
                options.verify = False
            continue
        if name in _VALUED:
            if not sep:
                if position >= len(items) or str(items[position]).startswith("--"):
                    raise UserError(f"{where}: '{name}' needs a value, e.g. ['{name}', 'VALUE'] or '{name}=VALUE'.")
                value = str(items[position])
                position += 1
            if name in ("--exclude", "--include"):
                options.filters.append((name[2:], value))
            elif name == "--region":
                options.region = value
            elif name == "--endpoint-url":
                options.endpoint_url = value
            elif name == "--profile":
                options.profile = value
            else:
                options.verify = value
            continue
        raise UserError(
            f"{where}: '{raw}' is not supported. The model is copied once into the Hugging Face cache with boto3, "
            f"which takes: {', '.join(_FLAGS + _VALUED)}. Remove '{name}' (credentials and region also come from "
            "the usual AWS environment variables and ~/.aws)."
        )
    return options


def parse_bucket_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/")."""
    scheme, _, rest = uri.partition("://")
    if scheme != "s3":
        raise UserError(f"{KEY}.bucket_uri: '{uri}' is neither s3://BUCKET/PREFIX nor a local folder; only S3 "
                        "(AWS or an S3-compatible endpoint_url) is supported.")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"{KEY}.bucket_uri: '{uri}' names no bucket; expected s3://BUCKET/PREFIX/.")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def cache_root(job: "Job") -> Path:
    """Where from_pretrained will look: the job's from_pretrained_kwargs.cache_dir, else the hub cache."""
    given = job.model.initialization.initializer.from_pretrained_kwargs.get("cache_dir")
    if given:
        return Path(os.path.expanduser(str(given)))
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_id(job: "Job") -> str:
    return job.model.initialization.hf_model_id or job.model.model_id


def mirror_model(job: "Job") -> Path:
    """The snapshot folder holding the bucket's model, copied there first unless a complete copy exists."""
    config = job.model.initialization.s3_mirror_config
    uri = config.bucket_uri
    bucket, prefix = parse_bucket_uri(uri)
    options = parse_sync_args(config.s3_sync_args or [])
    if config.endpoint_url and options.endpoint_url and config.endpoint_url != options.endpoint_url:
        raise UserError(f"{KEY}.endpoint_url ({config.endpoint_url}) and '--endpoint-url {options.endpoint_url}' in "
                        f"{KEY}.s3_sync_args disagree; keep one.")
    endpoint = config.endpoint_url or options.endpoint_url
    model_name = hub_id(job)
    if not _HUB_ID.match(model_name):
        raise UserError(f"model_config.model_id: '{model_name}' is not a hub id (ORG/NAME), so the copy from {uri} "
                        "has no place in the Hugging Face cache; set model_id (or initialization.hf_model_id) to the "
                        "id the bucket mirrors.")
    repo = cache_root(job) / f"models--{model_name.replace('/', '--')}"
    client = _client(options, endpoint, uri)
    lock = repo.parent / ".locks" / repo.name / "s3-mirror.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(lock)):
        commit = _read_commit(client, bucket, prefix, uri)
        snapshot = repo / "snapshots" / commit
        if (snapshot / "config.json").is_file():
            logger.info("Model %s: reusing the copy of %s in %s", model_name, uri, snapshot)
        else:
            _copy(client, bucket, prefix, options, snapshot, uri)
            logger.info("Model %s: copied %s to %s", model_name, uri, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


def _client(options: SyncOptions, endpoint: Optional[str], uri: str):
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound
    except ImportError:
        raise UserError(f"{KEY}.bucket_uri: copying the model from {uri} needs boto3, which is not installed. "
                        f"Install it with: {INSTALL_HINT}") from None
    try:
        session = boto3.session.Session(profile_name=options.profile)
    except ProfileNotFound as exc:
        raise UserError(f"{KEY}.s3_sync_args: --profile: {exc}") from None
    kwargs = {"endpoint_url": endpoint, "region_name": options.region}
    if options.unsigned:
        kwargs["config"] = Config(signature_version=UNSIGNED)
    if options.verify is not None:
        kwargs["verify"] = options.verify
    try:
        return session.client("s3", **kwargs)
    except ValueError as exc:  # a malformed endpoint URL
        raise UserError(f"{KEY}.endpoint_url: {exc}") from None


def _read_commit(client, bucket: str, prefix: str, uri: str) -> str:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=prefix + HASH_FILE)["Body"].read()
    except ClientError as exc:
        if _error_code(exc) not in ("NoSuchKey", "404"):
            raise _unreadable(exc, uri, f"reading {uri.rstrip('/')}/{HASH_FILE}") from None
        logger.warning("%s.bucket_uri: %s has no '%s' file naming the hub commit; the copy is stored as snapshot %s "
                       "(as the original did) and reused until that folder is removed.", KEY, uri, HASH_FILE, NO_HASH)
        return NO_HASH
    except Exception as exc:  # noqa: BLE001 - connection and credential faults, named below
        raise _unreadable(exc, uri, f"reading {uri.rstrip('/')}/{HASH_FILE}") from None
    commit = body.decode("utf-8", errors="replace").strip()
    if not _COMMIT.match(commit):
        raise UserError(f"{KEY}.bucket_uri: {uri.rstrip('/')}/{HASH_FILE} should hold the hub commit hash (letters, "
                        f"digits, . _ -), got {commit[:80]!r}.")
    return commit


def _copy(client, bucket: str, prefix: str, options: SyncOptions, snapshot: Path, uri: str) -> None:
    keys = _list(client, bucket, prefix, uri)
    wanted = {key[len(prefix):]: key for key in keys
              if not key.endswith("/") and key[len(prefix):] != HASH_FILE and options.wants(key[len(prefix):])}
    if "config.json" not in wanted:
        found = ", ".join(sorted(wanted)[:10]) or "nothing"
        filtered = " (after s3_sync_args' --exclude/--include)" if options.filters else ""
        raise UserError(f"{KEY}.bucket_uri: {uri} holds no config.json{filtered}; found: {found}. Expected the files "
                        "of a Hugging Face model folder (config.json, weights, tokenizer files) and a 'hash' file.")
    partial = snapshot.with_name(f"{snapshot.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for relative, key in sorted(wanted.items()):
            target = partial / relative
            if not target.resolve().is_relative_to(partial.resolve()):
                raise UserError(f"{KEY}.bucket_uri: object '{key}' would land outside the snapshot folder.")
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(client, bucket, key, target, uri)
        shutil.rmtree(snapshot, ignore_errors=True)  # an earlier copy that stopped before config.json
        partial.rename(snapshot)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _list(client, bucket: str, prefix: str, uri: str) -> list[str]:
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(exc, uri, f"listing {uri}") from None


def _download(client, bucket: str, key: str, target: Path, uri: str) -> None:
    try:
        client.download_file(bucket, key, str(target))
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(exc, uri, f"copying s3://{bucket}/{key}") from None


def _error_code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _unreadable(exc: Exception, uri: str, action: str) -> UserError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, NoCredentialsError):
        cause = ("no AWS credentials were found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
                 "AWS_PROFILE or an instance role); for a public bucket add '--no-sign-request' to s3_sync_args")
    elif isinstance(exc, EndpointConnectionError):
        cause = f"the endpoint cannot be reached ({exc}); check endpoint_url and the network"
    elif isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            cause = "the bucket does not exist at this endpoint"
        elif code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            cause = (f"access denied ({code}); check the credentials, or add '--no-sign-request' to s3_sync_args for "
                     "a public bucket")
        else:
            cause = f"{code or type(exc).__name__}: {exc}"
    else:
        cause = f"{type(exc).__name__}: {exc}"
    return UserError(f"{KEY}.bucket_uri: {action} failed: {cause}. The model was not copied; nothing falls back to "
                     "another source.")
