"""A hub dataset the Hub cannot serve fails in seconds with one line that names the local forms
that work instead: offline mode (HF_HUB_OFFLINE), an unreachable or silent Hub, a dataset that
is gone. Local stand-ins play the Hub: nothing here needs the network."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
from helpers import dpo_args, one_error_line
from huggingface_hub import constants

from spo import sources
from spo.cli import main
from spo.data import load_pair_table, load_prompts
from spo.errors import ConfigError

LOCAL = ("parquet files", "a folder laid out like the Hub repository", "save_to_disk folder")


def names_local_forms(message: str) -> bool:
    return all(form in message for form in LOCAL)


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub at a local address, with offline mode off."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def use(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return use


class _Gone(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a removed dataset."""

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_offline_mode_fails_at_once_and_names_the_local_forms(
    monkeypatch, mini_world, tmp_path, capsys
):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_pair_table("someone/not_in_the_cache")
    assert time.perf_counter() - start < 3
    assert "cannot read pairs from someone/not_in_the_cache" in str(e.value)
    assert names_local_forms(str(e.value))
    # through the CLI: one line, exit code 2, before any model loads (the run folder is absent)
    out = tmp_path / "run"
    assert main(dpo_args(mini_world, out, "pairs.train=yuvalkirstain/pickapic_v2")) == 2
    assert names_local_forms(one_error_line(capsys))
    assert not out.exists()


def test_an_unreachable_hub_fails_in_seconds(endpoint):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    endpoint(f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_prompts("someone/prompts")
    assert time.perf_counter() - start < 3
    message = str(e.value)
    assert message.startswith("cannot reach the Hugging Face Hub (http://127.0.0.1:")
    assert names_local_forms(message) and "HF_HUB_OFFLINE=1" in message


def test_a_hub_that_does_not_answer_fails_after_the_timeout(endpoint, monkeypatch):
    monkeypatch.setattr(sources, "HUB_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        with pytest.raises(ConfigError, match="cannot reach the Hugging Face Hub") as e:
            load_pair_table("someone/pairs")
        assert time.perf_counter() - start < 1.0 + 2
    assert names_local_forms(str(e.value))


def test_a_removed_dataset_is_named_so(endpoint):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ConfigError) as e:
            load_pair_table("yuvalkirstain/pickapic_v2")
    finally:
        server.shutdown()
        server.server_close()
    message = str(e.value)
    assert "yuvalkirstain/pickapic_v2: no such dataset on the Hugging Face Hub" in message
    assert names_local_forms(message)
