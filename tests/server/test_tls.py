"""`hetlora serve --ssl-certfile/--ssl-keyfile` on loopback with a certificate made here (openssl CLI);
the client verifies it with --ca-file and refuses an unknown certificate at once (no retry loop)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess

import pytest

from edge_client.server_api import ServerAPI
from hetlora.errors import UserError
from tests.helpers.server import LABELS, make_config, running_server, sigkill, start_cli_server



@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (1 day), and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    path = tmp_path_factory.mktemp("tls")
    cert, key = path / "cert.pem", path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_https_server_is_verified_with_the_ca_file(tiny_bert_dir, tmp_path, certificate):
    cert, key = certificate
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    proc, url = start_cli_server(tiny_bert_dir, labels, tmp_path / "state", rounds=40,
                                 extra=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                                 verify=ssl.create_default_context(cafile=str(cert)))
    try:
        assert url.startswith("https://127.0.0.1:")
        assert json.loads((tmp_path / "state" / "server.json").read_text())["url"] == url
        run = ServerAPI(url, ca_file=str(cert)).run()
        assert run["labels"] == list(LABELS)
        reply = ServerAPI(url, ca_file=str(cert)).register({}, 4, 10, name="tls-device")
        assert reply["token"]
        with pytest.raises(UserError, match="TLS with .* failed.*--ca-file") as refused:
            ServerAPI(url, give_up_after=30).run()  # the requests CA bundle does not know this certificate
        assert refused.value.exit_code == 2
        plain = url.replace("https://", "http://")
        with pytest.raises(UserError, match=f"speaks HTTPS, not HTTP: use --server {url}$"):  # no retry loop
            ServerAPI(plain).run()
    finally:
        sigkill(proc)


def test_https_to_a_plain_http_server_says_to_use_http(spec, tmp_path):
    with running_server(make_config(spec), tmp_path / "server") as http:
        url = str(http.base_url).rstrip("/")
        with pytest.raises(UserError, match=f"speaks HTTP, not HTTPS: use --server {url}$") as refused:
            ServerAPI(url.replace("http://", "https://")).run()
    assert refused.value.exit_code == 2


def test_tls_options_are_checked_before_serving(tmp_path, certificate):
    from server_stub.cli import check_tls

    cert, key = certificate
    assert check_tls(None, None) is False and check_tls(str(cert), str(key)) is True
    with pytest.raises(UserError, match="both"):
        check_tls(str(cert), None)
    with pytest.raises(UserError, match="cannot use the certificate"):
        check_tls(str(key), str(cert))
