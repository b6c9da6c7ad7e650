"""A real S3-compatible server on the loopback for the object-storage tests: moto's server mode,
started as a subprocess (`moto_server`), so that s3fs talks HTTP to it exactly as to AWS.

tests/conftest.py points the AWS environment at it when the session starts (before any Ray
cluster, whose workers inherit the environment), and starts the server itself only when a test
asks for the `s3` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

TEST_KEY_ID = "kdcache-test-key"
TEST_SECRET = "kdcache-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_binary() -> str | None:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    return exe if os.path.exists(exe) else shutil.which("moto_server")


@dataclass
class S3Server:
    """One moto server process; `endpoint` is its http://127.0.0.1:PORT URL."""

    port: int
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # the AWS_* variables that reach it

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env.get("AWS_ACCESS_KEY_ID", TEST_KEY_ID),
                            aws_secret_access_key=self.env.get("AWS_SECRET_ACCESS_KEY",
                                                               TEST_SECRET), **kw)

    def new_bucket(self, prefix: str = "kdc") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_moto(port: int | None = None, *, auth_actions: int | None = None) -> S3Server:
    """Start `moto_server` on 127.0.0.1. With `auth_actions`, moto enforces IAM credentials after
    that many unauthenticated requests (used to create a user and its access key)."""
    exe = moto_server_binary()
    if exe is None:
        raise RuntimeError("moto_server not found: install the dev extra (moto[server])")
    port = port or free_port()
    env = dict(os.environ)
    if auth_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_actions)
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.05)
    return S3Server(port=port, proc=proc, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                               "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
                                               "AWS_SECRET_ACCESS_KEY": TEST_SECRET})


def start_authenticating_moto() -> S3Server:
    """A moto server that checks credentials, with one IAM user allowed everything: its env
    holds that user's real key; any other secret is refused."""
    import boto3

    server = start_moto(auth_actions=3)
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="kdcache")
    key = iam.create_access_key(UserName="kdcache")["AccessKey"]
    iam.put_user_policy(UserName="kdcache", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    server.env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                  "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    return server


class CuttableProxy:
    """A TCP proxy in front of a server that can drop every connection and refuse new ones
    (`cut()`), then accept again (`restore()`): a network that fails under a running client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._stopped = False
        self.refused = 0  # connections reset while cut
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # reset: the connection is refused mid-handshake
                self.refused += 1
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()
