"""A cluster of separate processes for the expert-pool scenarios: workers
(`tramontane worker`, each on its own loopback port, started and stopped one
by one as a StatefulSet would) and a router with its admin API, which the
scenarios drive as an operator or a pod's preStop hook would.
"""

import http.client
import json
import os
import time

from benchlib import get, parse_samples, start, wait_healthy
from chaoslib import log

ADMIN_KEY = "chaos-admin-key"


class Worker:
    def __init__(self, binary, model, experts, log_path, addr="127.0.0.1:0", threads=1):
        self.binary, self.model, self.experts = binary, model, experts
        self.log_path = log_path
        self.process = start([binary, "worker", "--model", model, "--experts", experts, "--listen", addr,
                              "--threads", str(threads)], log_path=log_path)
        self.addr = self.process.listening("tramontane worker")

    @property
    def pid(self):
        return self.process.pid

    def alive(self):
        return self.process.alive()

    def again(self):
        """The same worker started again on its address (a pod's restart)."""
        return Worker(self.binary, self.model, self.experts, self.log_path + ".again", self.addr)

    def stop(self, grace_s=0.0):
        self.process.stop(grace_s)


class Cluster:
    """Workers and a router (`--admin-listen`); quacks like chaoslib.serve.Serve where the
    scenarios' load, monitor and cleanup need it."""

    def __init__(self, binary, model, name, log_dir, experts, router_args=(), threads=1):
        self.binary, self.model, self.name, self.log_dir = binary, model, name, log_dir
        self.api_key = None
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.workers = [Worker(binary, model, spec, os.path.join(log_dir, f"{name}-worker-{i}.log"),
                               threads=threads)
                        for i, spec in enumerate(experts)]
        self.router = start([binary, "router", "--model", model, "--workers", ",".join(w.addr for w in self.workers),
                             "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                             "--admin-listen", "127.0.0.1:0", "--admin-key", ADMIN_KEY,
                             "--threads", str(threads), "--drain-timeout", "5", *router_args],
                            log_path=self.log_path)
        self.pid = self.router.pid
        self.grpc = self.router.listening("tramontane router")
        self.http = self.router.listening("tramontane http")
        self.admin_addr = self.router.listening("tramontane admin")
        from chaoslib.serve import Serve  # the runner stops every Serve.started
        Serve.started.append(self)

    def add_worker(self, experts):
        worker = Worker(self.binary, self.model, experts,
                        os.path.join(self.log_dir, f"{self.name}-worker-{len(self.workers)}.log"))
        self.workers.append(worker)
        return worker

    def get(self, path, timeout=5.0):
        return get(self.http, path, {}, timeout)

    def metrics(self):
        status, text = self.get("/metrics")
        return parse_samples(text) if status == 200 else {}

    def wait_healthy(self, timeout=60.0):
        wait_healthy(self.http, timeout, self.router, {}, poll_s=0.2)

    def model_name(self):
        status, text = self.get("/v1/models")
        if status != 200:
            raise RuntimeError(f"GET /v1/models answered {status}: {text[:200]}")
        return json.loads(text)["data"][0]["id"]

    def admin(self, method, path, body=None, timeout=120.0):
        """(status, JSON answer) of an admin request."""
        host, port = self.admin_addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            data = None
            if body is not None:
                data = json.dumps(body)
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def placement(self):
        status, answer = self.admin("GET", "/admin/placement")
        if status != 200:
            raise RuntimeError(f"GET /admin/placement answered {status}: {answer}")
        return answer

    def alive(self):
        return self.router.alive()

    def stop(self):
        self.router.stop(grace_s=10)
        for worker in self.workers:
            worker.stop()
        log(f"{self.name}: stopped")


def wait_placement(cluster, predicate, timeout=30.0):
    """The first placement within `timeout` s for which `predicate` holds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        placement = cluster.placement()
        if predicate(placement):
            return placement
        time.sleep(0.1)
    return None
