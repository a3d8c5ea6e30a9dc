"""The Hugging Face Hub path, against a real HTTP server on 127.0.0.1 (tests/hub_server.py).

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is imported, so the
client side runs in worker subprocesses started with those variables set (this file run as a
script, answering one JSON request per line); the pytest process hosts the server and checks the
results. Nothing is patched, and nothing leaves 127.0.0.1. A worker lives for the whole module,
as starting one (importing torch) costs seconds.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import HubServer

from learned_optim import CoordinateLSTM, LearnedOptimizer, load_rule, save_pretrained
from learned_optim.rules.base import UpdateRule
from learned_optim.weights import CONFIG_NAME, WEIGHTS_NAME

CALL_TIMEOUT_S = 60
RULE_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# The client talks to its worker through select() on a pipe, which Windows lacks.
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs select() on pipes")


# ---------------------------------------------------------------------- worker (client) side
def rule_state(rule: UpdateRule) -> dict[str, list[float]]:
    """The rule's tensors as JSON-able lists; float32 -> float -> JSON is exact, so equality is bit-exact."""
    return {name: tensor.flatten().tolist() for name, tensor in rule.state_dict().items()}


def _call_optimizer(name: str, **kwargs: Any) -> dict[str, list[float]]:
    optimizer = LearnedOptimizer([torch.nn.Parameter(torch.zeros(3))], pretrained=name, **kwargs)
    return rule_state(optimizer.rule)


def _call_load_rule(name: str, **kwargs: Any) -> dict[str, list[float]]:
    return rule_state(load_rule(name, **kwargs))


def _call_push(directory: str, repo_id: str, **kwargs: Any) -> str:
    return load_rule(directory).push_to_hub(repo_id, **kwargs)


def _call_push_non_finite(directory: str, repo_id: str) -> str:
    rule = load_rule(directory)
    with torch.no_grad():
        rule.output.bias.fill_(float("nan"))
    return rule.push_to_hub(repo_id)


WORKER_CALLS: dict[str, Callable[..., Any]] = {
    "optimizer": _call_optimizer,
    "load_rule": _call_load_rule,
    "push": _call_push,
    "push_non_finite": _call_push_non_finite,
}


def worker_main() -> None:
    """Answer each stdin line ``{"call", "args", "kwargs"}`` with ``{"value"}`` or ``{"error", "message"}``."""
    import learned_optim.hub  # noqa: F401  (import it now, while the other workers start, not in a test)

    replies = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"value": WORKER_CALLS[request["call"]](*request["args"], **request["kwargs"])}
        except Exception as err:
            reply = {"error": type(err).__name__, "message": str(err)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# ---------------------------------------------------------------------- test side
class WorkerError(Exception):
    """An exception raised inside a worker, by type name and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class Worker:
    """A client subprocess with its own huggingface_hub environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def __call__(self, call: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``WORKER_CALLS[call](*args, **kwargs)`` in the worker; raise WorkerError on its errors."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"call": call, "args": args, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        # One reply line per request, so nothing stays buffered and select() sees every reply.
        if not select.select([self.proc.stdout], [], [], CALL_TIMEOUT_S)[0]:
            raise TimeoutError(f"hub worker gave no answer to {call!r} in {CALL_TIMEOUT_S}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hub worker exited with status {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"], reply["message"])
        return reply["value"]

    def close(self) -> None:
        """Let the worker finish: closing stdin ends its loop. See :meth:`wait`."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self) -> None:
        """Wait for the worker to exit after :meth:`close`; kill it if it hangs."""
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client_env(endpoint: str, hf_home: Path, **overrides: str) -> dict[str, str]:
    """Environment of a worker: this process's, with every Hub setting owned by the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The test Hub, serving an empty folder for the whole module."""
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME of every worker: no token, and the default cache under ``hub/``."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="module")
def workers(hub: HubServer, hf_home: Path) -> Iterator[dict[str, Worker]]:
    """One worker per client configuration, all started at once so that their slow imports overlap.

    ``online`` and ``offline`` (HF_HUB_OFFLINE=1) run without hf_xet, so uploads take
    ``create_commit``; ``xet`` keeps hf_xet enabled, so ``upload_folder`` takes its pipelined path.
    """
    configs = {"online": {}, "offline": {"HF_HUB_OFFLINE": "1"}, "xet": {"HF_HUB_DISABLE_XET": "0"}}
    started = {name: Worker(client_env(hub.url, hf_home, **config)) for name, config in configs.items()}
    yield started
    for worker in started.values():
        worker.close()
    for worker in started.values():
        worker.wait()


@pytest.fixture
def online(workers: dict[str, Worker]) -> Worker:
    """The worker that talks to the test Hub."""
    return workers["online"]


@pytest.fixture
def offline(workers: dict[str, Worker]) -> Worker:
    """The worker with HF_HUB_OFFLINE=1."""
    return workers["offline"]


def make_rule(seed: int) -> CoordinateLSTM:
    """A small rule whose weights depend on ``seed``."""
    torch.manual_seed(seed)
    return CoordinateLSTM(hidden_size=4)


def publish(hub: HubServer, repo_id: str, rule: UpdateRule, revision: str = "main") -> None:
    """Put a rule straight into the server's storage, as if pushed earlier."""
    save_pretrained(rule, hub.revision_dir(repo_id, revision))


# ---------------------------------------------------------------------- download
def test_optimizer_downloads_rule_by_repo_id(hub: HubServer, online: Worker, hf_home: Path) -> None:
    rule = make_rule(0)
    publish(hub, "acme/lstm-small", rule)
    before = len(hub.requests)

    assert online("optimizer", "acme/lstm-small") == rule_state(rule)

    # Both files came over HTTP, into the default cache under HF_HOME, keyed by the server's commit.
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests[before:] if method == "GET"}
    assert fetched == set(RULE_FILES)
    snapshot = hf_home / "hub" / "models--acme--lstm-small" / "snapshots" / hub.commit_id("acme/lstm-small")
    assert all((snapshot / name).is_file() for name in RULE_FILES)


def test_load_rule_picks_the_requested_revision(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    main, v2 = make_rule(0), make_rule(1)
    publish(hub, "acme/versioned", main)
    publish(hub, "acme/versioned", v2, revision="v2")
    assert rule_state(main) != rule_state(v2)
    cache = str(tmp_path)

    assert online("load_rule", "acme/versioned", cache_dir=cache) == rule_state(main)
    assert online("load_rule", "acme/versioned", revision="v2", cache_dir=cache) == rule_state(v2)
    assert online("load_rule", "acme/versioned", revision="main", cache_dir=cache) == rule_state(main)
    commit = hub.commit_id("acme/versioned", "v2")
    assert online("load_rule", "acme/versioned", revision=commit, cache_dir=cache) == rule_state(v2)
    assert online("optimizer", "acme/versioned", revision="v2", cache_dir=cache) == rule_state(v2)

    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/versioned", revision="v3", cache_dir=cache)
    assert info.value.kind == "PretrainedError"
    assert "'acme/versioned'" in info.value.message and "'v3'" in info.value.message


def test_config_and_weights_come_from_one_commit(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    # main moves (a push) between the download of config.json and that of model.safetensors:
    # the rule must be the old commit's, not the old config with the new weights.
    old, new = CoordinateLSTM(hidden_size=4, output_scale=0.1), CoordinateLSTM(hidden_size=4, output_scale=0.5)
    publish(hub, "acme/racy", old)
    old_commit = hub.commit_id("acme/racy")

    def push_after_config(method: str, path: str) -> None:
        if method == "GET" and path.endswith("/acme/racy/resolve/main/config.json"):
            hub.after_request = None
            # The old commit stays reachable by its id (as on the Hub), here as another branch.
            shutil.copytree(hub.revision_dir("acme/racy"), hub.revision_dir("acme/racy", "kept-old"))
            publish(hub, "acme/racy", new)

    hub.after_request = push_after_config
    try:
        loaded = online("load_rule", "acme/racy", cache_dir=str(tmp_path))
    finally:
        hub.after_request = None
    assert hub.commit_id("acme/racy", "kept-old") == old_commit != hub.commit_id("acme/racy")
    assert loaded == rule_state(old)


def test_offline_mode_loads_from_a_warm_cache(hub: HubServer, online: Worker, offline: Worker, tmp_path: Path) -> None:
    main, v2 = make_rule(2), make_rule(3)
    publish(hub, "acme/cached", main)
    publish(hub, "acme/cached", v2, revision="v2")
    cache = str(tmp_path)
    online("load_rule", "acme/cached", cache_dir=cache)
    online("load_rule", "acme/cached", revision="v2", cache_dir=cache)
    before = len(hub.requests)

    assert offline("load_rule", "acme/cached", cache_dir=cache) == rule_state(main)
    assert offline("load_rule", "acme/cached", revision="v2", cache_dir=cache) == rule_state(v2)
    assert offline("optimizer", "acme/cached", cache_dir=cache) == rule_state(main)
    assert hub.requests[before:] == []  # offline really means no HTTP at all


@pytest.mark.parametrize("call", ["load_rule", "optimizer"])
def test_offline_mode_with_a_cold_cache_is_a_clear_error(
    hub: HubServer, offline: Worker, tmp_path: Path, call: str
) -> None:
    publish(hub, "acme/uncached", make_rule(4))
    with pytest.raises(WorkerError) as info:
        offline(call, "acme/uncached", cache_dir=str(tmp_path))
    assert info.value.kind == "PretrainedError"
    message = info.value.message
    assert "'acme/uncached'" in message and CONFIG_NAME in message
    assert "not in the local cache" in message and "HF_HUB_OFFLINE" in message


def test_local_files_only_uses_the_cache_and_never_the_network(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    rule = make_rule(5)
    publish(hub, "acme/local-only", rule)
    cache = str(tmp_path)
    before = len(hub.requests)
    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/local-only", cache_dir=cache, local_files_only=True)
    assert info.value.kind == "PretrainedError"
    assert "not in the local cache" in info.value.message and "local_files_only=True" in info.value.message
    assert hub.requests[before:] == []

    online("load_rule", "acme/local-only", cache_dir=cache)
    before = len(hub.requests)
    assert online("load_rule", "acme/local-only", cache_dir=cache, local_files_only=True) == rule_state(rule)
    assert online("optimizer", "acme/local-only", cache_dir=cache, local_files_only=True) == rule_state(rule)
    assert hub.requests[before:] == []


def test_force_download_replaces_a_corrupted_cached_file(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    rule = make_rule(6)
    publish(hub, "acme/refetch", rule)
    cache = str(tmp_path)
    online("load_rule", "acme/refetch", cache_dir=cache)
    snapshot = tmp_path / "models--acme--refetch" / "snapshots" / hub.commit_id("acme/refetch")
    weights = (snapshot / WEIGHTS_NAME).resolve()
    weights.write_bytes(weights.read_bytes()[:-8])  # a truncated download left in the cache

    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/refetch", cache_dir=cache)
    assert info.value.kind == "PretrainedError" and "'acme/refetch'" in info.value.message

    before = len(hub.requests)
    assert online("load_rule", "acme/refetch", cache_dir=cache, force_download=True) == rule_state(rule)
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests[before:] if method == "GET"}
    assert fetched == set(RULE_FILES)
    assert online("load_rule", "acme/refetch", cache_dir=cache) == rule_state(rule)  # the cache is whole again


def test_force_download_without_the_network_is_a_clear_error(
    hub: HubServer, online: Worker, offline: Worker, tmp_path: Path
) -> None:
    publish(hub, "acme/refetch-offline", make_rule(7))
    cache = str(tmp_path)
    online("load_rule", "acme/refetch-offline", cache_dir=cache)
    with pytest.raises(WorkerError) as info:
        offline("load_rule", "acme/refetch-offline", cache_dir=cache, force_download=True)
    assert info.value.kind == "PretrainedError" and "'acme/refetch-offline'" in info.value.message
    assert "force_download=True needs the network" in info.value.message
    # A Hub that cannot be reached (nothing listens on the endpoint): the cause is named.
    unreachable = Worker(client_env("http://127.0.0.1:9", tmp_path / "home"))
    try:
        with pytest.raises(WorkerError) as info:
            unreachable("load_rule", "acme/refetch-offline", cache_dir=cache, force_download=True)
    finally:
        unreachable.close()
        unreachable.wait()
    assert info.value.kind == "PretrainedError" and "'acme/refetch-offline'" in info.value.message
    assert f"downloading {CONFIG_NAME} failed" in info.value.message


@pytest.mark.parametrize("revision", ["../../../escaped", "main/../../x", "/abs", "a\\b", "", 3])
def test_a_revision_that_is_no_git_name_is_refused_before_the_network(revision: Any, tmp_path: Path) -> None:
    # huggingface_hub writes refs/<revision> into the cache: "../" wrote outside it.
    from learned_optim.hub import download_rule
    from learned_optim.weights import PretrainedError

    with pytest.raises(PretrainedError, match="revision"):
        download_rule("acme/rule", revision=revision, cache_dir=tmp_path / "cache")
    with pytest.raises(PretrainedError, match="cache_dir is an empty string"):
        download_rule("acme/rule", cache_dir="")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"local_files_only": "yes"}, TypeError, "local_files_only must be a bool"),
        ({"force_download": 1}, TypeError, "force_download must be a bool"),
        ({"force_download": True, "local_files_only": True}, ValueError, "contradict"),
    ],
)
def test_download_flags_are_checked_whatever_the_name(kwargs: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        load_rule("lstm-quadratic", **kwargs)
    with pytest.raises(error, match=text):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], pretrained="lstm-quadratic", **kwargs)


def test_missing_repo_is_a_clear_error(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/does-not-exist", cache_dir=str(tmp_path))
    assert info.value.kind == "PretrainedError"
    assert "'acme/does-not-exist'" in info.value.message and "does not exist" in info.value.message


def test_private_repo_needs_the_token(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    rule = make_rule(10)
    publish(hub, "acme/private", rule)
    hub.private["acme/private"] = "hf_secret_token"
    cache = str(tmp_path)
    for token in (None, "hf_wrong_token"):
        with pytest.raises(WorkerError) as info:
            online("load_rule", "acme/private", cache_dir=cache, token=token)
        assert info.value.kind == "PretrainedError"
        assert "'acme/private' does not exist or is not accessible" in info.value.message
        assert "hf_wrong_token" not in info.value.message

    # The token reaches the Hub from load_rule (like push_to_hub(token=...)), not only from a login.
    assert online("load_rule", "acme/private", cache_dir=cache, token="hf_secret_token") == rule_state(rule)
    assert online("optimizer", "acme/private", cache_dir=cache, token="hf_secret_token") == rule_state(rule)


def test_invalid_repo_id_is_a_clear_error(online: Worker, tmp_path: Path) -> None:
    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/bad name", cache_dir=str(tmp_path))
    assert info.value.kind == "PretrainedError"
    assert "'acme/bad name' is not a valid Hub repo id" in info.value.message


@pytest.mark.parametrize(
    ("case", "files", "expected"),
    [
        pytest.param("no-config", {WEIGHTS_NAME}, "has no config.json; is it a learned_optim rule?", id="no-config"),
        pytest.param("no-weights", {CONFIG_NAME}, "has no model.safetensors", id="no-weights"),
        pytest.param("not-a-rule", {"foreign-config", WEIGHTS_NAME}, "missing key 'rule_type'", id="not-a-rule"),
    ],
)
def test_repo_that_is_not_a_rule_is_a_clear_error(
    hub: HubServer, online: Worker, tmp_path: Path, case: str, files: set[str], expected: str
) -> None:
    repo_id = f"acme/broken-{case}"
    folder = hub.revision_dir(repo_id)
    save_pretrained(make_rule(5), folder)
    if CONFIG_NAME not in files:
        (folder / CONFIG_NAME).unlink()
    if WEIGHTS_NAME not in files:
        (folder / WEIGHTS_NAME).unlink()
    if "foreign-config" in files:  # e.g. a transformers model's config
        (folder / CONFIG_NAME).write_text(json.dumps({"model_type": "bert", "hidden_size": 4}))

    with pytest.raises(WorkerError) as info:
        online("load_rule", repo_id, cache_dir=str(tmp_path))
    assert info.value.kind == "PretrainedError"
    assert f"{repo_id!r}" in info.value.message and expected in info.value.message


def test_a_cache_that_cannot_be_written_is_a_clear_error(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    # A read-only HF_HOME leaked a raw PermissionError; a cache below a file fails the same way
    # (and also as root, whom a read-only folder does not stop).
    publish(hub, "acme/uncachable", make_rule(11))
    (tmp_path / "afile").write_text("x")
    cache = tmp_path / "afile" / "cache"
    with pytest.raises(WorkerError) as info:
        online("load_rule", "acme/uncachable", cache_dir=str(cache))
    assert info.value.kind == "PretrainedError"
    message = info.value.message
    assert "'acme/uncachable'" in message and f"cannot be stored in the Hugging Face cache {str(cache)!r}" in message


# ---------------------------------------------------------------------- upload
@pytest.mark.parametrize("config", ["online", "xet"])
def test_push_to_hub_round_trips_exactly(
    hub: HubServer, workers: dict[str, Worker], tmp_path: Path, config: str
) -> None:
    client = workers[config]
    repo_id = f"acme/pushed-{config}"
    cache = str(tmp_path / "cache")
    first = make_rule(6)
    local = save_pretrained(first, tmp_path / "first")

    url = client("push", str(local), repo_id)

    assert url == f"{hub.url}/{repo_id}/commit/{hub.commit_id(repo_id)}"
    for name in RULE_FILES:
        assert (hub.revision_dir(repo_id) / name).read_bytes() == (local / name).read_bytes()
    assert client("load_rule", repo_id, cache_dir=cache) == rule_state(first)

    # Pushing again to the existing repo (create_repo(exist_ok=True)) replaces the weights, and
    # the new commit id makes the next download see them despite the warm cache.
    second = make_rule(7)
    client("push", str(save_pretrained(second, tmp_path / "second")), repo_id)
    assert client("load_rule", repo_id, cache_dir=cache) == rule_state(second)


def test_push_to_hub_to_a_new_branch_and_with_a_model_card(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    main, v2 = make_rule(8), make_rule(9)
    card = "---\nlibrary_name: learned_optim\n---\n# A tiny LSTM rule\n"
    online("push", str(save_pretrained(main, tmp_path / "main")), "acme/branched", model_card=card)
    online("push", str(save_pretrained(v2, tmp_path / "v2")), "acme/branched", revision="v2")

    cache = str(tmp_path / "cache")
    assert online("load_rule", "acme/branched", cache_dir=cache) == rule_state(main)
    assert online("load_rule", "acme/branched", revision="v2", cache_dir=cache) == rule_state(v2)
    assert (hub.revision_dir("acme/branched") / "README.md").read_text() == card


def test_a_rule_that_cannot_be_saved_is_not_pushed(hub: HubServer, online: Worker, tmp_path: Path) -> None:
    # Checked before anything reaches the Hub: no repo is created for it.
    local = save_pretrained(make_rule(10), tmp_path / "rule")
    with pytest.raises(WorkerError, match=r"non-finite values"):
        online("push_non_finite", str(local), "acme/never-created")
    assert not (hub.root / "acme" / "never-created").exists()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
