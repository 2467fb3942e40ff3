"""Bearer-token auth on every gRPC method and HTTP route; TLS and mTLS handshakes.

Real sidecar processes on 127.0.0.1 with certificates made for the test (a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerankd.client import RerankClient, tls_credentials
from rerankd.errors import AuthenticationError, UnavailableError
from rerankd.server.process import spawn_sidecar
from rerankd.v1 import reranker_pb2 as pb
from rerankd.v1 import reranker_pb2_grpc as pb_grpc

ARGS = [
    "--model",
    "bundled:splade-tiny",
    "--backend",
    "torch",
    "--max-length",
    "64",
    "--dense-encoder",
    "bundled:all-minilm-l6-v2",
    "--sparse-encoder",
    "",
    "--log-level",
    "WARNING",
]
TOKEN = "s3cret-token-for-tests"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_key, issuer: str, *, ca: bool, san: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(folder: Path, name: str, key, cert) -> None:
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _cert("rerankd test CA", None, "rerankd test CA", ca=True)
    _write(d, "ca", ca_key, ca)
    other_key, other = _cert("some other CA", None, "some other CA", ca=True)
    _write(d, "other-ca", other_key, other)
    _write(d, "server", *_cert("127.0.0.1", ca_key, "rerankd test CA", ca=False, san=True))
    _write(d, "client", *_cert("client", ca_key, "rerankd test CA", ca=False))
    return d


@pytest.fixture(scope="module")
def auth_sidecar():
    env = dict(os.environ, RERANKD_AUTH_TOKENS=f"other-token,{TOKEN}")
    proc = spawn_sidecar(ARGS, env=env)
    yield proc
    proc.stop()


def test_every_grpc_method_refuses_missing_or_wrong_tokens(auth_sidecar) -> None:
    calls = {
        "Rerank": pb.RerankRequest(query="q", documents=[pb.Document(text="a")]),
        "Embed": pb.EmbedRequest(texts=["a"]),
        "ListModels": pb.ListModelsRequest(),
    }
    with grpc.insecure_channel(auth_sidecar.address) as ch:
        stub = pb_grpc.RerankerStub(ch)
        for method, req in calls.items():
            for metadata in (
                None,
                (("authorization", "Bearer wrong"),),
                (("authorization", TOKEN),),
            ):  # no "Bearer " scheme
                with pytest.raises(grpc.RpcError) as err:
                    getattr(stub, method)(req, timeout=10, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
                assert "bearer token" in err.value.details()
            ok = getattr(stub, method)(
                req, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
            assert ok.ByteSize() > 0
        # health stays open for orchestrator probes
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_python_client_with_and_without_token(auth_sidecar) -> None:
    with RerankClient(auth_sidecar.address, token=TOKEN) as good:
        assert len(good.rerank("q", ["a", "b"]).results) == 2
    with RerankClient(auth_sidecar.address) as anonymous, pytest.raises(AuthenticationError):
        anonymous.rerank("q", ["a"])


def test_http_routes_refuse_missing_or_wrong_tokens(auth_sidecar) -> None:
    base = auth_sidecar.http_url
    routes = [
        ("POST", "/v1/rerank", {"query": "q", "documents": ["a"]}),
        ("POST", "/v1/embeddings", {"input": "a"}),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ]
    with httpx.Client(base_url=base, timeout=30) as http:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, path
                assert "bearer token" in r.json()["error"]["message"]
            r = http.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, (path, r.text)
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200


def test_tokens_never_reach_the_logs(pki, tmp_path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# rerankd tokens\n{TOKEN}\n")
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log:
        proc = spawn_sidecar(
            [*ARGS, "--auth-token-file", str(token_file), "--log-level", "DEBUG"], log=log
        )
        try:
            with RerankClient(proc.address, token=TOKEN) as c:
                c.rerank("q", ["a"])
            with RerankClient(proc.address, token="wrong") as c, pytest.raises(AuthenticationError):
                c.rerank("q", ["a"])
            httpx.get(f"{proc.http_url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        finally:
            proc.stop()
    logged = log_path.read_text()
    assert "DEBUG" in logged  # the log was captured at its most verbose
    assert TOKEN not in logged and "wrong" not in logged
    assert proc.proc.returncode == 0


def test_tls_handshake_with_right_and_wrong_ca(pki) -> None:
    proc = spawn_sidecar(
        [*ARGS, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    )
    try:
        right = RerankClient(proc.address, credentials=tls_credentials(pki / "ca.pem"), retries=0)
        with right:
            assert len(right.rerank("q", ["a"]).results) == 1
        wrong = RerankClient(
            proc.address, credentials=tls_credentials(pki / "other-ca.pem"), retries=0, timeout=5
        )
        with wrong, pytest.raises(UnavailableError):
            wrong.rerank("q", ["a"])
        plain = RerankClient(proc.address, retries=0, timeout=5)
        with plain, pytest.raises(UnavailableError):
            plain.rerank("q", ["a"])
        url = f"https://{proc.http_address}/v1/rerank"
        body = {"query": "q", "documents": ["a"]}
        assert httpx.post(url, json=body, verify=str(pki / "ca.pem")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, json=body, verify=str(pki / "other-ca.pem"))
    finally:
        proc.stop()


def test_mtls_requires_a_client_certificate(pki) -> None:
    proc = spawn_sidecar(
        [
            *ARGS,
            "--tls-cert",
            str(pki / "server.pem"),
            "--tls-key",
            str(pki / "server.key"),
            "--tls-client-ca",
            str(pki / "ca.pem"),
            "--http-port",
            "-1",
        ]
    )
    try:
        with_cert = tls_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        with RerankClient(proc.address, credentials=with_cert, retries=0) as c:
            assert len(c.rerank("q", ["a"]).results) == 1
        without = tls_credentials(pki / "ca.pem")
        with (
            RerankClient(proc.address, credentials=without, retries=0, timeout=5) as c,
            pytest.raises(UnavailableError),
        ):
            c.rerank("q", ["a"])
    finally:
        proc.stop()


def test_auth_configured_without_tokens_refuses_to_start(tmp_path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here\n")
    with pytest.raises(RuntimeError, match="exited with code"):
        spawn_sidecar([*ARGS, "--auth-token-file", str(empty)], timeout=120)
