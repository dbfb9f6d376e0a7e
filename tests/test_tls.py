"""TLS and mTLS on the gRPC listener, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauthz.config import ServeConfig
from extauthz.errors import ConfigError
from extauthz.server import ExtAuthzServer
from tests.support.check_requests import build_check_request

REPO = Path(__file__).resolve().parent.parent


def make_certificate(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
                     *, ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def pem(item: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    server_ca = make_certificate("server CA", ca=True)
    client_ca = make_certificate("client CA", ca=True)
    other_ca = make_certificate("other CA", ca=True)
    files = {
        "server_ca.pem": pem(server_ca[0]),
        "client_ca.pem": pem(client_ca[0]),
    }
    for name, issuer in (("server", server_ca), ("client", client_ca), ("stranger", other_ca)):
        certificate, key = make_certificate(name, issuer)
        files[f"{name}.pem"] = pem(certificate)
        files[f"{name}.key"] = pem(key)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in files}


@pytest.fixture
def mtls_server(pki: dict[str, Path]) -> Iterator[int]:
    server = ExtAuthzServer(ServeConfig(
        policies=REPO / "policies", listen="127.0.0.1:0", watch=False, workload_namespace="demo",
        workload_labels={"app": "httpbin"}, tls_cert=pki["server.pem"], tls_key=pki["server.key"],
        tls_client_ca=pki["client_ca.pem"]))
    server.start()
    yield server.port
    server.stop(0)


def check_over(channel: grpc.Channel) -> int:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return int(stub.Check(build_check_request(path="/public/x"), timeout=5).status.code)


def secure_channel(port: int, pki: dict[str, Path], client: str | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["server_ca.pem"].read_bytes(),
        private_key=pki[f"{client}.key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}.pem"].read_bytes() if client else None)
    return grpc.secure_channel(f"localhost:{port}", credentials)


def test_client_with_certificate_answered(mtls_server: int, pki: dict[str, Path]) -> None:
    with secure_channel(mtls_server, pki, "client") as channel:
        assert check_over(channel) == 0


@pytest.mark.parametrize("client", [None, "stranger"])
def test_client_without_trusted_certificate_refused(mtls_server: int, pki: dict[str, Path],
                                                    client: str | None) -> None:
    with secure_channel(mtls_server, pki, client) as channel, pytest.raises(grpc.RpcError) as caught:
        check_over(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_refused(mtls_server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server}") as channel, pytest.raises(grpc.RpcError):
        check_over(channel)


def test_unreadable_certificate_stops_start(tmp_path: Path, pki: dict[str, Path]) -> None:
    server = ExtAuthzServer(ServeConfig(policies=REPO / "policies", listen="127.0.0.1:0", watch=False,
                                        tls_cert=tmp_path / "missing.pem", tls_key=pki["server.key"]))
    with pytest.raises(ConfigError, match="cannot read --tls-cert"):
        server.start()

    result = subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--listen", "127.0.0.1:0", "--tls-cert",
         str(tmp_path / "missing.pem"), "--tls-key", str(pki["server.key"])],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "cannot read --tls-cert" in result.stderr
    assert "listening on" not in result.stderr
