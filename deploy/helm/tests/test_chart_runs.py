"""The command lines the chart renders for the CPU demo, run as processes on
this machine: two workers and the router, each with its rendered arguments
and environment, and the router's tokens equal in-process generation's;
then worker 1's preStop hook, as the kubelet runs it before the pod stops,
has its experts moved to worker 0, and once worker 1 is gone the tokens are
still the same. A chart whose
arguments the binary refuses, or whose router and workers do not fit
together (placement, model, dtype, names, ports), fails here.

As root, every pod gets a network namespace of its own, with an address on
a bridge that exists only inside the test's namespaces. The router's
namespace has an /etc/hosts (through `ip netns exec`) giving each worker's
stable DNS name its worker's address, so the network arguments run verbatim:
the workers listen on 0.0.0.0:PORT, and the router dials the names. Without
root, every process listens on loopback port 0 instead, and the router's
`--workers` names the ports the workers got, in index order.

What a cluster provides is stood in for, and nothing else is changed:
- Kubernetes substitutes `$(POD_NAME)` (the StatefulSet's name and the
  pod's ordinal) in a worker's command: here each worker gets its pod's name;
- the placement ConfigMap mounted at /etc/tramontane: here the rendered
  placement.json is in a temporary folder;
- the checkpoint volume mounted at `model.path`: here `model.path` is a
  generated `tiny` checkpoint's folder;
- an environment variable from a Secret: here the rendered Secret's value;
- the router's admin Service: the worker's namespace resolves its name to
  the router's address (on loopback, its URL names the router's port).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helm_python import values_from_yaml
from helm_python.chart import Chart

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "tramontane"
ROOT = HERE.parents[2]
BIN = os.environ.get("TRAMONTANE_BIN", str(ROOT / "target/release/tramontane"))
PROMPT = "The wind from the north"
LISTENING = " listening on "
# Exists only on the test's bridge (cli/tests/it/hosts.rs uses 10.203.0.0/24).
SUBNET = "10.204.0"


def rendered(model: Path) -> list[dict]:
    values = values_from_yaml((CHART / "ci/cpu-demo-values.yaml").read_text())
    values["model"]["path"] = str(model)
    values["model"]["volume"]["hostPath"] = str(model)
    with Chart.load(CHART) as chart:
        files = chart.render(values, name="demo", namespace="moe")
    docs = []
    for path, text in files.items():
        if not path.endswith("NOTES.txt"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def command_of(workload: dict) -> list[str]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return list(container["command"]) + list(container.get("args", []))


def env_of(workload: dict, secrets: dict[str, dict[str, str]], **given: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it: values with
    `$(VAR)` of the variables before them, Secrets' keys, the pod's labels
    (`given`, by variable name: the pod's fields)."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if name in given:
            env[name] = given[name]
        elif "value" in item:
            value = item["value"]
            for known, known_value in env.items():
                value = value.replace(f"$({known})", known_value)
            env[name] = value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[name] = secrets[ref["name"]][ref["key"]]
    return env


def secrets_of(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for d in docs
        if d["kind"] == "Secret"
    }


def value_of(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} not in {command}"
    return command[command.index(flag) + 1]


def replace_value(command: list[str], flag: str, value: str) -> list[str]:
    at = command.index(flag) + 1
    value_of(command, flag)
    return command[:at] + [value] + command[at + 1 :]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def namespaces_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"tc{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


class Pods:
    """Where the pods run: `prefix(pod)` is what their commands run behind
    (`ip netns exec NS`, or nothing on loopback)."""

    def __init__(self, names: list[str], isolated: bool):
        self.isolated = isolated
        self.tag = f"tc{os.getpid()}"
        self.made: list[str] = []
        self.addresses = {}
        if not isolated:
            return
        hub = f"{self.tag}-hub"
        self.add(hub)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = self.namespace(name)
            self.add(ns)
            port = f"v{i}"
            ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", hub, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET}.{i + 1}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self.addresses[name] = address

    def namespace(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def add(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)

    def hosts(self, pod: str, names: dict[str, str]) -> None:
        """The /etc/hosts `ip netns exec` shows `pod`: `names` to addresses."""
        folder = Path("/etc/netns") / self.namespace(pod)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, a in names.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def prefix(self, pod: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(pod)] if self.isolated else []

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def start(prefix: list[str], command: list[str], lines: int, log: Path, env: dict[str, str]):
    """Starts `tramontane ...` (the image's binary is this build's) behind
    `prefix` with `env`, its logs into `log`; reads its first `lines`
    listening addresses."""
    assert command[0] == "tramontane", command
    process = subprocess.Popen(
        [*prefix, BIN, *command[1:]],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env={**os.environ, **env},
    )
    addrs = []
    while len(addrs) < lines:
        line = process.stdout.readline()
        if not line:
            process.wait()
            raise AssertionError(f"{command[:2]} did not start: {log.read_text()[-2000:]}")
        if LISTENING in line:
            addrs.append(line.strip().rsplit(LISTENING, 1)[1])
    return process, addrs


def generate(prefix: list[str], *where: str) -> list[int]:
    output = subprocess.run(
        [*prefix, BIN, "generate", "--json", "--max-tokens", "8", "--prompt", PROMPT, *where],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout)["token_ids"]


@pytest.mark.parametrize("isolated", [True, False], ids=["namespaces", "loopback"])
def test_the_rendered_command_lines_serve_the_in_process_tokens(tmp_path, isolated):
    if isolated and not namespaces_possible():
        pytest.skip("network namespaces need root and `ip netns`")
    model = tmp_path / "model"
    subprocess.run(
        [BIN, "gen-model", "--preset", "tiny", "--seed", "3", "--out", str(model)],
        check=True,
        capture_output=True,
    )
    docs = rendered(model)
    (placement,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "placement.json" in d.get("data", {})
    ]
    placement_file = tmp_path / "placement.json"
    placement_file.write_text(placement["data"]["placement.json"])
    workers = one(docs, "StatefulSet")
    replicas = workers["spec"]["replicas"]
    mounted = lambda command: [  # noqa: E731
        arg.replace("/etc/tramontane/placement.json", str(placement_file)) for arg in command
    ]
    worker_command = mounted(command_of(workers))
    deployment = one(docs, "Deployment")
    router_command = mounted(command_of(deployment))
    secrets = secrets_of(docs)
    names = value_of(router_command, "--workers").split(",")
    assert len(names) == replicas

    pods = Pods(["router"] + [f"worker-{i}" for i in range(replicas)], isolated)
    processes = []
    try:
        addrs = []
        for index in range(replicas):
            pod_name = f"{workers['metadata']['name']}-{index}"
            command = [arg.replace("$(POD_NAME)", pod_name) for arg in worker_command]
            if not isolated:
                command = replace_value(command, "--listen", "127.0.0.1:0")
                command = replace_value(command, "--metrics-listen", "127.0.0.1:0")
            pod = f"worker-{index}"
            env = env_of(workers, secrets, POD_NAME=pod_name)
            process, (addr,) = start(pods.prefix(pod), command, 1, tmp_path / f"{pod}.log", env)
            processes.append(process)
            addrs.append(addr)
        command = router_command
        if isolated:
            # The workers' stable names, as the cluster's DNS would answer.
            hosts = {name.rsplit(":", 1)[0]: pods.addresses[f"worker-{i}"] for i, name in enumerate(names)}
            pods.hosts("router", hosts)
        else:
            command = replace_value(command, "--workers", ",".join(addrs))
            for flag in ("--listen", "--http-listen", "--metrics-listen", "--admin-listen"):
                command = replace_value(command, flag, "127.0.0.1:0")
        router, (grpc, _http, _metrics, admin) = start(
            pods.prefix("router"), command, 4, tmp_path / "router.log", env_of(deployment, secrets)
        )
        processes.append(router)
        grpc_port = grpc.rsplit(":", 1)[1]
        in_process = generate([], "--model", str(model))
        served = generate(pods.prefix("router"), "--server", f"127.0.0.1:{grpc_port}")
        assert served == in_process

        # `helm test`: its pod's script, as its shell runs it, against the
        # router (its Service's name is the cluster's to resolve: here the
        # router's port beside it; `tramontane` is the binary built here).
        (tester,) = one(docs, "Pod")["spec"]["containers"]
        script = tester["command"][2]
        server = script.split("--server ", 1)[1].split()[0]
        assert server.endswith(f":{grpc_port}") or not isolated, server
        script = script.replace(server, f"127.0.0.1:{grpc_port}").replace("tramontane generate", f"{BIN} generate")
        tested = subprocess.run(
            [*pods.prefix("router"), *tester["command"][:2], script],
            capture_output=True, text=True, timeout=120,
        )
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert json.loads(tested.stdout)["token_ids"] == in_process[:4], tested.stdout

        # Worker 1's pod stops: first its preStop hook, with its environment.
        (container,) = workers["spec"]["template"]["spec"]["containers"]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        env = env_of(workers, secrets, POD_NAME=f"{workers['metadata']['name']}-1")
        if isolated:
            service = env["TRAMONTANE_ADMIN_SERVER"].split("://", 1)[1].rsplit(":", 1)[0]
            pods.hosts("worker-1", {service: pods.addresses["router"]})
        else:
            env["TRAMONTANE_ADMIN_SERVER"] = f"http://{admin}"
        assert hook[0] == "tramontane", hook
        moved = subprocess.run(
            [*pods.prefix("worker-1"), BIN, *hook[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )
        assert moved.returncode == 0, moved.stderr
        assert json.loads(moved.stdout)["moved"] == 8 * 2 // replicas, moved.stdout
        processes[1].kill()
        processes[1].wait()
        served = generate(pods.prefix("router"), "--server", f"127.0.0.1:{grpc_port}")
        assert served == in_process
    finally:
        for process in processes:
            process.kill()
            process.wait()
        pods.close()
