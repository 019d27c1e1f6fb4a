"""Remote stores: the smoke flow on a local S3 server (moto, 127.0.0.1), read back; clear errors for bad URLs,
missing buckets and read-only stores before any work starts."""

from __future__ import annotations

import logging
import os
import socket
import stat

import numpy as np
import pytest

from lyra_ops.errors import LyraStorageError
from lyra_pipeline.storage import RunStore

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port; AWS_* variables point boto/s3fs at it (dummy credentials)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="lyra")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_smoke_flow_on_s3_reads_back_and_resumes(s3, smoke_store_template, prefect_harness):
    import s3fs

    from flows.generate_dataset import generate_dataset

    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://lyra/smoke"
    over = {"scenes": {"num_scenes": 1}, "trajectories": {"names": ["left", "zoom_in"]}}
    summary = generate_dataset(store=url, preset="smoke", overrides=over)
    assert summary["failed_scenes"] == [] and summary["computed"] == 2 + 6 * 2
    store = RunStore(url, create=False)
    rows = store.read_manifest().to_pylist()
    assert len(rows) == 14 and {r["status"] for r in rows} == {"done"}
    # the same arrays as the local smoke store (same seeds, same code)
    local = RunStore(smoke_store_template, create=False)
    for name in ("input/rgb", "depth/depth", "trajectories/left/warp/rgb", "trajectories/left/refine/mask",
                 "trajectories/zoom_in/teacher/rgb", "trajectories/zoom_in/latents"):
        np.testing.assert_array_equal(store.read_array("proc-000000", name), local.read_array("proc-000000", name))
    again = generate_dataset(store=url, preset="smoke", overrides=over)
    assert again["computed"] == 0


def test_bad_remote_urls_and_read_only_stores(s3, tmp_path):
    with pytest.raises(LyraStorageError, match="cannot (read|write).*bucket exists"):
        RunStore("s3://no-such-bucket-here/x")
    with pytest.raises(LyraStorageError, match="cannot open"):
        RunStore("nosuchprotocol://x/y")
    with pytest.raises(LyraStorageError, match="not a lyra store"):
        RunStore("s3://lyra/never-created", create=False)
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions: cannot make a read-only folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(LyraStorageError, match="cannot write"):
        RunStore(ro / "store")


def test_missing_credentials_fail_clearly(s3, monkeypatch):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(LyraStorageError, match="Unable to locate credentials.*standard environment"):
            RunStore("s3://lyra/creds")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_leases_use_conditional_puts(s3):
    """On S3 a free lease is claimed with If-None-Match and a stale one replaced with If-Match: of several
    claimants exactly one wins, without a settle time; a run whose lease was taken over stops at renew."""
    import json
    import time

    import s3fs

    from lyra_pipeline.stages import SceneLease

    s3fs.S3FileSystem.clear_instance_cache()
    store = RunStore("s3://lyra/leases")
    assert store.conditional_puts and store.atomic_leases
    assert store.create_lease_exclusive("proc-000000", "a", 60)
    assert not store.create_lease_exclusive("proc-000000", "b", 60)
    assert store.read_lease("proc-000000")["owner"] == "a"
    # a stale lease (expired): two runs saw the same version; only the first replace succeeds
    expired = {"owner": "dead", "expires_at": time.time() - 1, "host": "elsewhere", "pid": 1}
    store.fs.pipe_file(store._path("leases/proc-000001.json"), json.dumps(expired).encode())
    lease, version = store.read_lease_version("proc-000001")
    assert lease["owner"] == "dead" and version
    first, second = SceneLease(store, "proc-000001", "b"), SceneLease(store, "proc-000001", "c")
    assert first._claim(lease, version) and not second._claim(lease, version)
    assert store.read_lease("proc-000001")["owner"] == "b"
    # acquire/release through the normal path
    lease_d = SceneLease(store, "proc-000002", "d")
    lease_d.acquire(timeout_s=5)
    assert not SceneLease(store, "proc-000002", "e")._claim(*store.read_lease_version("proc-000002"))
    # "e" takes over after d stalled past its TTL: d's next renew notices and stops
    store.fs.pipe_file(store._path("leases/proc-000002.json"), json.dumps({**expired, "owner": "e"}).encode())
    lease_d._written = 0.0
    with pytest.raises(LyraStorageError, match="taken over"):
        lease_d.renew()
    lease_d.release()  # not the owner any more: leaves e's lease alone
    assert store.read_lease("proc-000002")["owner"] == "e"


def test_read_only_remote_store_fails_before_work(smoke_store_template, tmp_path, prefect_harness):
    """A store served read-only over HTTP opens and reads, and any flow refuses it before doing work."""
    import functools
    import http.server
    import shutil
    import threading

    from flows.generate_dataset import generate_dataset

    root = tmp_path / "served"
    shutil.copytree(smoke_store_template, root / "store")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/store"
        store = RunStore(url, create=False)
        assert store.read_prompts()  # readable
        with pytest.raises(LyraStorageError, match="read-only or denies writes"):
            store.check_writable()
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        with pytest.raises(LyraStorageError, match="read-only or denies writes"):
            generate_dataset(store=url, preset="smoke")
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    finally:
        server.shutdown()


def test_s3_credentials_without_write_permission_fail_before_work(s3, monkeypatch, prefect_harness):
    """Credentials whose IAM policy allows only reads (moto enforcing IAM): the store opens and reads, and the
    flow stops at its write probe, before any work, leaving the bucket as it was."""
    import json

    import boto3
    import requests
    import s3fs
    from moto.iam import access_control

    from flows.generate_dataset import generate_dataset

    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://lyra/read-only"
    RunStore(url)  # created by an account allowed to write (auth not enforced yet)
    iam = boto3.client("iam", endpoint_url=s3)
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": ["arn:aws:s3:::lyra", "arn:aws:s3:::lyra/*"]}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    before = {o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="lyra")["Contents"]}
    # moto 5.2 computes a different SigV4 signature for ListObjectsV2 with an encoded prefix than botocore
    # (s3fs lists that way); the access key and the IAM policy are still checked on every request.
    monkeypatch.setattr(access_control.IAMRequestBase, "check_signature", lambda self: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    requests.post(f"{s3}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # enforce IAM from now
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        store = RunStore(url, create=False)
        assert store.read_manifest().num_rows == 0  # reads are allowed
        with pytest.raises(LyraStorageError, match="read-only or denies writes.*Access ?Denied"):
            store.check_writable()
        with pytest.raises(LyraStorageError, match="read-only or denies writes"):
            generate_dataset(store=url, preset="smoke")
    finally:
        requests.post(f"{s3}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
        s3fs.S3FileSystem.clear_instance_cache()
    after = {o["Key"] for o in boto3.client("s3", endpoint_url=s3, aws_access_key_id="testing",
                                            aws_secret_access_key="testing").list_objects_v2(Bucket="lyra")["Contents"]}
    assert after == before
