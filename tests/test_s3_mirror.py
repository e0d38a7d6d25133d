"""s3_mirror_config: the model is copied from a real S3-compatible server (moto's, started here on 127.0.0.1) into
the Hugging Face cache layout, once; s3_sync_args are honoured or refused by name; an unreadable bucket is an error."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import make_dataset, set_at

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from llmfinetune import s3_mirror  # noqa: E402
from llmfinetune.config import parse_job  # noqa: E402
from llmfinetune.errors import UserError  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_ID = "org/tiny-bert"
KEY = "model_config.initialization.s3_mirror_config"


@pytest.fixture(scope="module")
def server():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch, tmp_path):
    """Dummy credentials, no ~/.aws, and a hub cache of this test's own."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookups beyond 127.0.0.1
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _upload(server: str, tiny_models, bucket: str, prefix: str, commit: str | None = COMMIT, public: bool = False):
    import boto3

    client = boto3.client("s3", endpoint_url=server, region_name="us-east-1")
    acl = {"ACL": "public-read"} if public else {}
    try:
        client.create_bucket(Bucket=bucket, **acl)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    folder = Path(tiny_models["bert"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}{path.relative_to(folder).as_posix()}", Body=path.read_bytes(),
                          **acl)
    if commit is not None:
        client.put_object(Bucket=bucket, Key=f"{prefix}hash", Body=f"{commit}\n".encode(), **acl)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _job(server: str, uri: str, tmp_path: Path, **mirror):
    raw = {"model_config": {"model_id": MODEL_ID},
           "ft_config": {"ft_task": "sequenceclassification",
                         "data_config": {"local_path": str(make_dataset(tmp_path / "data", "sequenceclassification"))},
                         "train_config": {"base_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1,
                                                          "per_device_train_batch_size": 4, "max_length": 32}}}}
    set_at(raw, KEY, {"endpoint_url": server, "bucket_uri": uri, **mirror})
    return parse_job(raw)


@pytest.fixture
def count_downloads(monkeypatch):
    calls = []
    real = s3_mirror._download

    def counting(client, bucket, key, target, uri):
        calls.append(key)
        return real(client, bucket, key, target, uri)

    monkeypatch.setattr(s3_mirror, "_download", counting)
    return calls


def test_the_bucket_lands_in_the_hub_cache_layout_once_and_loads_offline(server, tiny_models, tmp_path,
                                                                         aws_environment, count_downloads):
    from llmfinetune import models

    files = _upload(server, tiny_models, "models", "tiny-bert/")
    job = _job(server, "s3://models/tiny-bert/", tmp_path)
    resolved = Path(models.resolve_model(job))
    repo = aws_environment / "models--org--tiny-bert"
    assert resolved == repo / "snapshots" / COMMIT
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert sorted(p.relative_to(resolved).as_posix() for p in resolved.rglob("*") if p.is_file()) == files
    assert sorted(count_downloads) == [f"tiny-bert/{name}" for name in files]
    stamp = (resolved / "config.json").stat().st_mtime_ns

    count_downloads.clear()
    assert Path(models.resolve_model(job)) == resolved  # a complete snapshot is not copied again
    assert count_downloads == [] and (resolved / "config.json").stat().st_mtime_ns == stamp

    # from_pretrained(model_id) finds it in the cache, offline, exactly as after a hub download.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(MODEL_ID, cache_dir=str(aws_environment), local_files_only=True).model_type == "bert"
    assert AutoTokenizer.from_pretrained(MODEL_ID, cache_dir=str(aws_environment), local_files_only=True)


def test_check_copies_the_model_and_loads_tokenizer_and_data_from_it(server, tiny_models, tmp_path, aws_environment):
    from llmfinetune.workflow import check_job

    _upload(server, tiny_models, "models", "check-bert/")
    summary = check_job(_job(server, "s3://models/check-bert", tmp_path))
    assert summary["model"] == str(aws_environment / "models--org--tiny-bert" / "snapshots" / COMMIT)
    assert summary["splits"]["train"] > 0


def test_no_sign_request_reads_a_public_bucket_without_credentials(server, tiny_models, tmp_path, monkeypatch):
    from llmfinetune import models

    _upload(server, tiny_models, "public-models", "bert/", public=True)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match=r"no AWS credentials .* add '--no-sign-request'"):
        models.resolve_model(_job(server, "s3://public-models/bert/", tmp_path))
    folder = Path(models.resolve_model(_job(server, "s3://public-models/bert/", tmp_path,
                                            s3_sync_args=["--no-sign-request"])))
    assert (folder / "config.json").is_file()


def test_exclude_and_include_filter_the_copy_the_way_aws_s3_sync_does(server, tiny_models, tmp_path,
                                                                       count_downloads):
    from llmfinetune import models

    files = _upload(server, tiny_models, "models", "filtered/", commit="f" * 40)
    job = _job(server, "s3://models/filtered/", tmp_path,
               s3_sync_args=["--exclude", "*.json", "--include=config.json", "--quiet"])
    folder = Path(models.resolve_model(job))
    copied = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert copied == sorted(f for f in files if not f.endswith(".json") or f == "config.json")
    assert "tokenizer.json" in files and "tokenizer.json" not in copied


@pytest.mark.parametrize("args, named", [
    (["--delete"], "'--delete' is not supported"),
    (["--no-sign-request", "--sse", "AES256"], "'--sse' is not supported"),
    (["--exclude"], "'--exclude' needs a value"),
])
def test_sync_arguments_without_a_meaning_here_are_refused_by_name(server, tmp_path, args, named):
    from llmfinetune import models

    with pytest.raises(UserError) as error:
        models.resolve_model(_job(server, "s3://models/tiny-bert/", tmp_path, s3_sync_args=args))
    assert f"{KEY}.s3_sync_args: " in str(error.value) and named in str(error.value)


def test_a_missing_bucket_is_an_error_naming_bucket_uri_and_the_cause(server, tmp_path, aws_environment):
    from llmfinetune import models

    with pytest.raises(UserError) as error:
        models.resolve_model(_job(server, "s3://no-such-bucket/model/", tmp_path))
    message = str(error.value)
    assert message.startswith(f"{KEY}.bucket_uri: reading s3://no-such-bucket/model/hash failed: the bucket does not "
                              "exist")
    assert not (aws_environment / "models--org--tiny-bert" / "snapshots").exists()


def test_a_prefix_without_a_model_is_an_error_not_an_empty_snapshot(server, tiny_models, tmp_path, aws_environment):
    from llmfinetune import models

    _upload(server, tiny_models, "models", "tiny-bert/")
    with pytest.raises(UserError, match=r"bucket_uri: s3://models/elsewhere/ holds no config.json; found: nothing"):
        models.resolve_model(_job(server, "s3://models/elsewhere/", tmp_path))
    assert not list((aws_environment / "models--org--tiny-bert" / "snapshots").glob("*"))


def test_a_bucket_without_a_hash_file_is_copied_as_the_original_did_with_a_warning(server, tiny_models, tmp_path,
                                                                                   aws_environment, caplog):
    from llmfinetune import models

    _upload(server, tiny_models, "models", "no-hash/", commit=None)
    with caplog.at_level(logging.WARNING):
        folder = Path(models.resolve_model(_job(server, "s3://models/no-hash/", tmp_path)))
    assert folder.name == s3_mirror.NO_HASH and (folder / "config.json").is_file()
    assert any("has no 'hash' file" in r.getMessage() for r in caplog.records)


def test_endpoint_url_and_a_different_endpoint_url_argument_are_a_contradiction(server, tmp_path):
    from llmfinetune import models

    with pytest.raises(UserError, match=r"s3_mirror_config.endpoint_url .* disagree"):
        models.resolve_model(_job(server, "s3://models/tiny-bert/", tmp_path,
                                  s3_sync_args=["--endpoint-url", "http://127.0.0.1:1"]))


def test_without_boto3_the_error_says_how_to_install_it(server, tmp_path, monkeypatch):
    import sys

    from llmfinetune import models

    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(UserError, match=r"needs boto3, which is not installed\. Install it with: pip install "
                                        r"'llmfinetune\[s3\]'"):
        models.resolve_model(_job(server, "s3://models/tiny-bert/", tmp_path))


def test_parsing_a_job_with_a_bucket_imports_neither_boto3_nor_torch():
    import subprocess
    import sys

    code = ("import sys; from llmfinetune.config import parse_job; parse_job({'model_config': {'model_id': 'a/b', "
            "'initialization': {'s3_mirror_config': {'bucket_uri': 's3://x/y/', 'endpoint_url': 'http://127.0.0.1:9', "
            "'s3_sync_args': ['--no-sign-request']}}}, 'ft_config': {'ft_task': 'maskedlm', 'data_config': {}}}); "
            "print(sorted(m for m in ('boto3', 'torch', 'botocore') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]", result.stderr


def test_two_processes_at_once_copy_the_model_once(server, tiny_models, tmp_path, aws_environment):
    """One process per machine copies (the cache's file lock); the other waits and reuses its snapshot."""
    import os
    import subprocess
    import sys

    _upload(server, tiny_models, "models", "shared/", commit="c" * 40)
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s'); "
        "from huggingface_hub import constants; constants.HF_HUB_CACHE = sys.argv[1]; "
        "from llmfinetune.config import parse_job; from llmfinetune.s3_mirror import mirror_model; "
        "print('snapshot', mirror_model(parse_job({'model_config': {'model_id': 'org/shared', 'initialization': "
        "{'s3_mirror_config': {'endpoint_url': sys.argv[2], 'bucket_uri': 's3://models/shared/'}}}, "
        "'ft_config': {'ft_task': 'maskedlm', 'data_config': {}}})))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(aws_environment), server], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    joined = "\n".join(outputs)
    assert joined.count("copied s3://models/shared/") == 1 and joined.count("reusing the copy") == 1, joined
    snapshot = aws_environment / "models--org--shared" / "snapshots" / ("c" * 40)
    assert all(f"snapshot {snapshot}" in out for out in outputs)
    assert not list(snapshot.parent.glob("*.partial-*"))
