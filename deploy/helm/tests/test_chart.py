"""The Helm chart deploy/helm/tramontane, rendered offline by the real Helm
engine (helm-python-sdk, Helm v4's Go SDK, no cluster, no helm binary).

For the default values, the CPU demo (ci/cpu-demo-values.yaml), a Mixtral
8x7B plan (mixtral-8x7b-values.json, the shape of `tramontane plan
--helm-values`) and a TLS + API key + monitoring set: `helm lint --strict`
is clean, every manifest validates strictly against the Kubernetes 1.30
schemas (the Prometheus Operator's CRDs by structure), the router dials
every worker's stable DNS name in index order, ports / Services / probes /
the NetworkPolicy agree, the placement ConfigMap is the values' placement
(or expert e on worker e mod N), bad values are refused naming the value,
and every flag passed to `tramontane worker` / `router` is one the binary
takes (`TRAMONTANE_BIN`, default target/release/tramontane).

    pytest -q deploy/helm/tests
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmError, values_from_yaml
from helm_python.chart import Chart, lint

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "tramontane"
REPO = HERE.parents[2]
KUBERNETES = "1.30.0"
RELEASE = "moe"
NAMESPACE = "serving"
FULLNAME = "moe-tramontane"
WORKERS = f"{FULLNAME}-workers"
CRDS = {"ServiceMonitor", "PodMonitor", "HTTPRoute"}
STANDARD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}


def cpu_demo() -> dict:
    return values_from_yaml((CHART / "ci/cpu-demo-values.yaml").read_text())


def mixtral() -> dict:
    return json.loads((HERE / "mixtral-8x7b-values.json").read_text())


def secured() -> dict:
    """Everything optional on: TLS, API keys, both monitors, metricsFrom."""
    return {
        "tls": {"enabled": True, "existingSecret": "moe-certs"},
        "apiKey": {"enabled": True, "value": "sk-one\nsk-two\n"},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
        },
        "networkPolicy": {
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ]
        },
        "image": {"pullSecrets": ["registry", {"name": "mirror"}]},
        "workers": {"extraArgs": ["--log-format", "json"], "threads": 4},
        "router": {"extraArgs": ["--micro-batches", "auto"], "service": {"type": "LoadBalancer"}},
        "model": {"servedModelName": "mixtral"},
    }


def operated() -> dict:
    """The knobs operators add to every chart, on both components."""

    def knobs(component: str) -> dict:
        return {
            "env": [
                {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                {"name": "FROM_FIELD", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
            "extraArgs": ["--dtype", "bf16"] if component == "router" else [],
            "podAnnotations": {"example.com/owner": "serving-team"},
            "podLabels": {"team": "serving"},
            "priorityClassName": "inference-critical",
            "runtimeClassName": "nvidia",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
                        ]
                    }
                }
            },
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"},
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": {"matchLabels": {"team": "serving"}},
                },
            ],
            "extraVolumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
            "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        }

    return {
        "logLevel": "info,tramontane_router=debug",
        "serviceAccount": {
            "create": True,
            "annotations": {"iam.gke.io/gcp-service-account": "moe@example.iam.gserviceaccount.com"},
        },
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": ["api.example.com"],
            "tls": [{"secretName": "api-tls", "hosts": ["api.example.com"]}],
        },
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["api.example.com"],
        },
        "router": {**knobs("router"), "autoscaling": {"enabled": True, "maxReplicas": 3}},
        "workers": knobs("workers"),
    }


VALUE_SETS = {
    "default": dict,
    "cpu-demo": cpu_demo,
    "mixtral-8x7b": mixtral,
    "secured": secured,
    "operated": operated,
}


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None, name: str = RELEASE) -> dict[str, str]:
    return chart.render(values or {}, name=name, namespace=NAMESPACE)


def manifests(chart, values: dict | None = None, name: str = RELEASE) -> list[dict]:
    docs = []
    for path, text in render(chart, values, name).items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def flag(command: list[str], name: str) -> str | None:
    """The value after `name` in a command line, or None."""
    return command[command.index(name) + 1] if name in command else None


def merged(chart, values: dict) -> dict:
    return chart.merge_values(copy.deepcopy(values))


# --- lint and schemas ----------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_is_clean(values):
    report = lint(CHART, values(), strict=True, namespace=NAMESPACE, kube_version=KUBERNETES)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_validates_against_kubernetes_1_30(chart, values):
    docs = manifests(chart, values())
    assert docs
    for doc in docs:
        assert STANDARD_LABELS <= doc["metadata"]["labels"].keys(), doc["metadata"]
        assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["kind"] in CRDS:
            continue  # CRDs: test_prometheus_operator_monitors checks them
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}"
            )


def test_kinds_rendered(chart):
    def kinds(values):
        return sorted(d["kind"] for d in manifests(chart, values))

    base = [
        "ConfigMap",  # the dashboard
        "ConfigMap",  # the placement
        "Deployment",
        "NetworkPolicy",  # the router's
        "NetworkPolicy",  # the workers'
        "PodDisruptionBudget",
        "Secret",  # the admin key
        "Service",  # the router's API
        "Service",  # the router's metrics
        "Service",  # the router's admin API
        "Service",  # the workers' headless
        "StatefulSet",
        "Pod",  # helm test's
    ]
    base = sorted(base)
    assert kinds({}) == base
    assert kinds(secured()) == sorted(base + ["PodMonitor", "Secret", "ServiceMonitor"])
    bare = {
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "metrics": {"grafanaDashboard": {"enabled": False}},
        "router": {"admin": {"enabled": False}},
    }
    assert kinds(bare) == [
        "ConfigMap",
        "Deployment",
        "Pod",
        "Service",
        "Service",
        "Service",
        "StatefulSet",
    ]
    # Existing Secrets of API keys and of the admin key: the chart makes none.
    with_existing = {
        "apiKey": {"enabled": True, "existingSecret": "keys"},
        "router": {"admin": {"existingSecret": "admin"}},
    }
    assert "Secret" not in kinds(with_existing)


def test_image_volume_validates_against_kubernetes_1_33(chart):
    # Image volumes are not in the 1.30 API (alpha in 1.31, beta in 1.33).
    values = {"model": {"volume": {"type": "image", "image": {"reference": "registry/mixtral:1"}}}}
    docs = manifests(chart, values)
    for kind in ("StatefulSet", "Deployment"):
        workload = one(docs, kind)
        volume = next(
            v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"
        )
        assert volume == {
            "name": "model",
            "image": {"reference": "registry/mixtral:1", "pullPolicy": "IfNotPresent"},
        }
        kubernetes_validate.validate(workload, "1.33.0", strict=True)


# --- workers and router ------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_router_dials_every_worker_by_its_stable_name_in_index_order(chart, values):
    docs = manifests(chart, values())
    replicas = merged(chart, values())["workers"]["replicas"]
    workers = one(docs, "StatefulSet")
    headless = one(docs, "Service", WORKERS)
    assert workers["metadata"]["name"] == WORKERS
    assert workers["spec"]["serviceName"] == WORKERS
    assert workers["spec"]["replicas"] == replicas
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None"
    port = container(workers)["ports"][0]["containerPort"]
    expected = [
        f"{WORKERS}-{i}.{WORKERS}.{NAMESPACE}.svc.cluster.local:{port}" for i in range(replicas)
    ]
    command = container(one(docs, "Deployment"))["command"]
    assert flag(command, "--workers").split(",") == expected


def test_worker_index_is_the_pod_names_ordinal(chart):
    # The pod's name, NAME-N on every Kubernetes version; the binary takes
    # its ordinal (the pod-index label is only there from 1.28).
    worker = container(one(manifests(chart), "StatefulSet"))
    assert flag(worker["command"], "--worker-index") == "$(POD_NAME)"
    (env,) = [e for e in worker["env"] if e["name"] == "POD_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_the_chart_states_the_kubernetes_it_needs(chart, values):
    # 1.27: gRPC readiness probes are GA. Nothing newer is needed: no
    # pod-index label (1.28 beta, 1.32 GA); image volumes (1.33) only when
    # chosen (model.volume.type image, validated against 1.33 below).
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_yaml["kubeVersion"] == ">=1.27.0-0"
    rendered = json.dumps(manifests(chart, values()))
    assert "apps.kubernetes.io/pod-index" not in rendered


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_ports_services_and_probes_agree(chart, values):
    docs = manifests(chart, values())
    config = merged(chart, values())
    tls = config["tls"]["enabled"]

    workers = one(docs, "StatefulSet")
    worker = container(workers)
    wport = config["workers"]["port"]
    mport = config["workers"]["metricsPort"]
    assert worker["ports"] == [
        {"name": "grpc", "containerPort": wport, "protocol": "TCP"},
        {"name": "metrics", "containerPort": mport, "protocol": "TCP"},
    ]
    assert flag(worker["command"], "--listen") == f"0.0.0.0:{wport}"
    headless = one(docs, "Service", WORKERS)
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(wport, "grpc")]
    assert (
        headless["spec"]["selector"].items()
        <= workers["spec"]["template"]["metadata"]["labels"].items()
    )
    if tls:
        assert worker["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    else:
        assert worker["readinessProbe"]["grpc"] == {"port": wport, "service": ""}
    assert worker["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert worker["startupProbe"]["tcpSocket"] == {"port": "grpc"}

    deployment = one(docs, "Deployment")
    router = container(deployment)
    ports = config["router"]["ports"]
    admin_port = config["router"]["admin"]["port"]
    by_name = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert by_name == {**ports, "admin": admin_port}
    command = router["command"]
    assert flag(command, "--admin-listen") == f"0.0.0.0:{admin_port}"
    admin = one(docs, "Service", f"{FULLNAME}-admin")
    assert [(p["name"], p["port"], p["targetPort"]) for p in admin["spec"]["ports"]] == [
        ("admin", admin_port, "admin")
    ]
    assert admin["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert flag(command, "--listen") == f"0.0.0.0:{ports['grpc']}"
    assert flag(command, "--http-listen") == f"0.0.0.0:{ports['http']}"
    assert flag(command, "--metrics-listen") == f"0.0.0.0:{ports['metrics']}"
    readiness = router["readinessProbe"]["httpGet"]
    assert readiness == {"path": "/health", "port": "metrics", "scheme": "HTTPS" if tls else "HTTP"}
    assert router["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert router["startupProbe"]["tcpSocket"] == {"port": "grpc"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    api = one(docs, "Service", FULLNAME)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in api["spec"]["ports"]} == {
        "http": (ports["http"], "http"),
        "grpc": (ports["grpc"], "grpc"),
    }
    assert api["spec"]["type"] == config["router"]["service"]["type"]
    metrics = one(docs, "Service", f"{FULLNAME}-metrics")
    assert [(p["name"], p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [
        ("metrics", ports["metrics"], "metrics")
    ]
    for service in (api, metrics):
        assert service["spec"]["selector"].items() <= pod_labels.items()
    # The selectors tell router and worker pods apart.
    assert (
        not api["spec"]["selector"].items()
        <= workers["spec"]["template"]["metadata"]["labels"].items()
    )

    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == config["router"]["drainTimeoutSeconds"] + 10
    assert flag(command, "--drain-timeout") == str(config["router"]["drainTimeoutSeconds"])


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_command_lines_carry_the_values(chart, values):
    docs = manifests(chart, values())
    config = merged(chart, values())
    worker = container(one(docs, "StatefulSet"))["command"]
    router = container(one(docs, "Deployment"))["command"]
    assert worker[:2] == ["tramontane", "worker"]
    assert router[:2] == ["tramontane", "router"]
    for command, part in ((worker, "workers"), (router, "router")):
        assert flag(command, "--model") == config["model"]["path"]
        assert flag(command, "--placement") == "/etc/tramontane/placement.json"
        assert flag(command, "--dtype") == config["model"]["dtype"]
        assert flag(command, "--device") == config[part]["device"]
        threads = config[part]["threads"]
        assert flag(command, "--threads") == (str(threads) if threads else None)
        assert (
            command[-len(config[part]["extraArgs"]) or len(command) :] == config[part]["extraArgs"]
        )
    assert flag(worker, "--queue") == str(config["workers"]["queue"])
    scheduler = config["router"]["scheduler"]
    assert flag(router, "--queue") == str(scheduler["queue"])
    assert flag(router, "--max-running") == str(scheduler["maxRunning"])
    assert flag(router, "--max-batch-tokens") == str(scheduler["maxBatchTokens"])
    assert flag(router, "--max-kv-tokens") == str(scheduler["maxKvTokens"])
    assert flag(router, "--dispatch-timeout-ms") == str(config["router"]["dispatchTimeoutMs"])
    assert flag(router, "--served-model-name") == (config["model"]["servedModelName"] or None)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_files_named_on_the_command_lines_are_mounted(chart, values):
    """Every /etc/tramontane/... path a command names is an item of the
    projected volume mounted there; the model volume is mounted read-only."""
    config = merged(chart, values())
    for workload in (one(manifests(chart, values()), k) for k in ("StatefulSet", "Deployment")):
        spec = workload["spec"]["template"]["spec"]
        main = container(workload)
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert mounts[config["model"]["path"]] == {
            "name": "model",
            "mountPath": config["model"]["path"],
            "readOnly": True,
        }
        assert mounts["/etc/tramontane"]["name"] == "config"
        volumes = {v["name"]: v for v in spec["volumes"]}
        items = {
            "/etc/tramontane/" + item["path"]
            for source in volumes["config"]["projected"]["sources"]
            for kind in ("configMap", "secret")
            if kind in source
            for item in source[kind]["items"]
        }
        named = {arg for arg in main["command"] if arg.startswith("/etc/tramontane/")}
        assert named and named <= items, named - items
        model = volumes["model"]
        if config["model"]["volume"]["type"] == "pvc":
            assert model["persistentVolumeClaim"]["readOnly"] is True
        elif config["model"]["volume"]["type"] == "hostPath":
            assert model["hostPath"] == {
                "path": config["model"]["volume"]["hostPath"],
                "type": "Directory",
            }


def test_tls_and_api_keys_reach_both_commands(chart):
    docs = manifests(chart, secured())
    worker = container(one(docs, "StatefulSet"))["command"]
    router = container(one(docs, "Deployment"))["command"]
    assert flag(worker, "--tls-cert") == "/etc/tramontane/tls/worker.pem"
    assert flag(worker, "--tls-key") == "/etc/tramontane/tls/worker-key.pem"
    assert flag(worker, "--tls-ca") == "/etc/tramontane/tls/ca.pem"
    assert flag(router, "--tls-cert") == "/etc/tramontane/tls/router.pem"
    assert flag(router, "--tls-key") == "/etc/tramontane/tls/router-key.pem"
    assert flag(router, "--tls-ca") == "/etc/tramontane/tls/ca.pem"
    assert flag(router, "--api-key-file") == "/etc/tramontane/api-key/api-key"
    assert "--api-key-file" not in worker
    secret = one(docs, "Secret", f"{FULLNAME}-api-key")
    assert secret["metadata"]["name"] == f"{FULLNAME}-api-key"
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "sk-one\nsk-two\n"
    sources = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    secrets = {
        s["secret"]["name"]
        for v in sources
        if "projected" in v
        for s in v["projected"]["sources"]
        if "secret" in s
    }
    assert secrets == {"moe-certs", f"{FULLNAME}-api-key"}
    # Off by default.
    plain = manifests(chart)
    for kind in ("StatefulSet", "Deployment"):
        command = container(one(plain, kind))["command"]
        assert not {"--tls-cert", "--tls-key", "--tls-ca", "--api-key-file"} & set(command)


def test_gpus_requested_by_default_and_not_in_the_cpu_demo(chart):
    for values in ({}, mixtral()):
        docs = manifests(chart, values)
        for kind in ("StatefulSet", "Deployment"):
            assert container(one(docs, kind))["resources"]["limits"]["nvidia.com/gpu"] == 1
    docs = manifests(chart, cpu_demo())
    for kind in ("StatefulSet", "Deployment"):
        main = container(one(docs, kind))
        resources = main["resources"]
        assert not any("gpu" in name for part in resources.values() for name in part), resources
        assert flag(main["command"], "--device") == "cpu"
        assert resources["requests"]["memory"] and resources["requests"]["cpu"] == "500m"
    worker = container(one(docs, "StatefulSet"))
    assert flag(worker["command"], "--dtype") == "f32"
    model = one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"][0]
    assert model == {
        "name": "model",
        "hostPath": {"path": "/var/lib/tramontane/tiny", "type": "Directory"},
    }


def test_mixtral_plan_values_size_the_workers(chart):
    """What the plan sizes (workers, their memory and GPUs, the router's) is
    what the pods ask for."""
    plan = mixtral()
    docs = manifests(chart, plan)
    workers = one(docs, "StatefulSet")
    assert workers["spec"]["replicas"] == plan["workers"]["replicas"] == 8
    for part, workload in (("workers", workers), ("router", one(docs, "Deployment"))):
        resources = container(workload)["resources"]
        for kind in ("requests", "limits"):
            assert plan[part]["resources"][kind].items() <= resources[kind].items()
    assert flag(container(workers)["command"], "--dtype") == plan["model"]["dtype"]


# --- placement -------------------------------------------------------------


def placement_of(docs: list[dict]) -> dict:
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-placement")
    return json.loads(configmap["data"]["placement.json"])


def round_robin(workers: int, layers: int, experts: int) -> dict:
    return {
        "workers": workers,
        "experts": [[[e % workers] for e in range(experts)] for _ in range(layers)],
    }


def test_placement_configmap_is_the_given_placement(chart):
    values = mixtral()
    assert placement_of(manifests(chart, values)) == values["placement"]
    # Expert e on worker e: one expert of every layer per worker.
    assert all(layer == [[e] for e in range(8)] for layer in values["placement"]["experts"])
    # Replicas and uneven splits go through as given.
    skewed = {
        "workers": {"replicas": 3},
        "model": {"numLayers": 2, "numExperts": 4},
        "placement": {"workers": 3, "experts": [[[0, 2], [1], [2], [0]], [[0], [1], [2], [0, 1]]]},
    }
    assert placement_of(manifests(chart, skewed)) == skewed["placement"]


@pytest.mark.parametrize(
    ("workers", "layers", "experts"), [(2, 32, 8), (3, 32, 8), (2, 2, 8), (5, 3, 4), (1, 1, 1)]
)
def test_placement_default_is_expert_e_on_worker_e_mod_n(chart, workers, layers, experts):
    values = {
        "workers": {"replicas": workers},
        "model": {"numLayers": layers, "numExperts": experts},
    }
    docs = manifests(chart, values)
    assert placement_of(docs) == round_robin(workers, layers, experts)
    assert (
        len(flag(container(one(docs, "Deployment"))["command"], "--workers").split(",")) == workers
    )


def test_dense_layers_have_empty_placement_rows(chart):
    # Layer 0 dense (e.g. Qwen3-MoE's mlp_only_layers), layers 1 and 2 routed.
    model = {"numLayers": 3, "numExperts": 4, "denseLayers": [0]}
    values = {"workers": {"replicas": 2}, "model": model}
    assert placement_of(manifests(chart, values)) == {
        "workers": 2,
        "experts": [[], [[0], [1], [0], [1]], [[0], [1], [0], [1]]],
    }
    given = {"workers": 2, "experts": [[], [[1], [0], [1], [0]], [[0, 1], [1], [0], [1]]]}
    assert placement_of(manifests(chart, {**values, "placement": given})) == given
    routed_dense = {**values, "placement": round_robin(2, 3, 4)}
    with pytest.raises(HelmError) as refused:
        render(chart, routed_dense)
    message = "placement.experts[0] has 4 experts but the model's layer 0 has 0"
    assert message in str(refused.value), str(refused.value)


def test_cpu_demo_placement_is_the_tiny_presets(chart):
    assert placement_of(manifests(chart, cpu_demo())) == round_robin(2, 2, 8)


def test_a_placement_change_rolls_the_pods(chart):
    def checksums(values):
        docs = manifests(chart, values)
        return {
            kind: one(docs, kind)["spec"]["template"]["metadata"]["annotations"][
                "checksum/placement"
            ]
            for kind in ("StatefulSet", "Deployment")
        }

    before, after = checksums({}), checksums({"model": {"numLayers": 31}})
    assert before["StatefulSet"] == before["Deployment"]
    assert before != after


# --- refusals --------------------------------------------------------------

BAD_VALUES = {
    "dtype f16": ({"model": {"dtype": "f16"}}, "/model/dtype"),
    "zero workers": ({"workers": {"replicas": 0}}, "/workers/replicas"),
    "port 0": ({"workers": {"port": 0}}, "/workers/port"),
    "port 70000": ({"router": {"ports": {"http": 70000}}}, "/router/ports/http"),
    "port as text": ({"router": {"ports": {"grpc": "50051"}}}, "/router/ports/grpc"),
    "volume type": ({"model": {"volume": {"type": "nfs"}}}, "/model/volume/type"),
    "relative model path": ({"model": {"path": "models/mixtral"}}, "/model/path"),
    "device gpu": ({"workers": {"device": "gpu"}}, "/workers/device"),
    "unknown value": ({"workers": {"replica": 3}}, "replica"),
    "unknown top-level value": ({"routers": {}}, "routers"),
    "autoscaling max below min": (
        {"router": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}},
        "router.autoscaling.maxReplicas",
    ),
    "autoscaling target zero": (
        {"router": {"autoscaling": {"targetWaitingRequests": 0}}},
        "/router/autoscaling/targetWaitingRequests",
    ),
    "ingress without hosts": ({"ingress": {"enabled": True}}, "ingress.hosts"),
    "route without a gateway": ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs"),
    "route timeout": ({"httpRoute": {"requestTimeout": "1 hour"}}, "/httpRoute/requestTimeout"),
    "fill onto a host path": (
        {"model": {"volume": {"type": "hostPath"}, "fill": {"enabled": True, "from": "pvc", "pvc": {"claimName": "src"}}}},
        "model.volume.type",
    ),
    "fill from s3 without a url": (
        {"model": {"volume": {"type": "emptyDir"}, "fill": {"enabled": True, "s3": {"secret": "keys"}}}},
        "model.fill.s3.url",
    ),
    "fill from a pvc without a claim": (
        {"model": {"volume": {"type": "emptyDir"}, "fill": {"enabled": True, "from": "pvc"}}},
        "model.fill.pvc.claimName",
    ),
    "fill from an image without a reference": (
        {"model": {"volume": {"type": "emptyDir"}, "fill": {"enabled": True, "from": "image"}}},
        "model.fill.image.reference",
    ),
    "fill from http": ({"model": {"fill": {"from": "http"}}}, "/model/fill/from"),
    "env without a name": ({"router": {"env": [{"value": "1"}]}}, "/router/env/0"),
    "env as a map": ({"workers": {"env": {"A": "1"}}}, "/workers/env"),
    "empty log level": ({"logLevel": ""}, "/logLevel"),
    "service account key": ({"serviceAccount": {"create": True, "role": "x"}}, "role"),
    "pod labels not text": ({"workers": {"podLabels": {"tier": 1}}}, "/workers/podLabels/tier"),
    "service type": ({"router": {"service": {"type": "Ingress"}}}, "/router/service/type"),
    "replicas as text": ({"workers": {"replicas": "8"}}, "/workers/replicas"),
    "placement without experts": ({"placement": {"workers": 2}}, "experts"),
    "placement worker negative": (
        {"placement": {"workers": 2, "experts": [[[-1]]]}},
        "/placement/experts/0/0/0",
    ),
    "placement with the wrong worker count": (
        {"placement": {"workers": 4, "experts": round_robin(4, 32, 8)["experts"]}},
        "placement.workers is 4 but workers.replicas is 2",
    ),
    "placement of another shape": (
        {"placement": round_robin(2, 2, 8)},
        "placement.experts has 2 layers but model.numLayers is 32",
    ),
    "placement with too few experts": (
        {"placement": round_robin(2, 32, 4)},
        "placement.experts[0] has 4 experts but the model's layer 0 has 8",
    ),
    "placement naming a missing worker": (
        {"placement": {"workers": 2, "experts": [[[0], [2]] + [[1]] * 6] * 32}},
        "placement.experts[0][1] names worker 2",
    ),
    "api key without a key": ({"apiKey": {"enabled": True}}, "apiKey.enabled needs apiKey.value"),
    "tls without a secret": ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
    "image volume without a reference": (
        {"model": {"volume": {"type": "image"}}},
        "model.volume.type image needs model.volume.image.reference",
    ),
    "pvc without a claim": (
        {"model": {"volume": {"claimName": ""}}},
        "model.volume.type pvc needs",
    ),
    "one port twice": ({"router": {"ports": {"metrics": 8000}}}, "must differ"),
    "interval": (
        {"metrics": {"podMonitor": {"interval": "often"}}},
        "/metrics/podMonitor/interval",
    ),
    "pdb percentage": (
        {"podDisruptionBudget": {"maxUnavailable": "half"}},
        "/podDisruptionBudget/maxUnavailable",
    ),
}


@pytest.mark.parametrize(("values", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused_naming_the_value(chart, values, message):
    with pytest.raises(HelmError) as refused:
        render(chart, values)
    assert message in str(refused.value), str(refused.value)


def test_cpu_demo_replica_override_without_placement_still_renders(chart):
    # `--set workers.replicas=4` on the demo: the default placement follows.
    values = cpu_demo()
    values["workers"]["replicas"] = 4
    assert placement_of(manifests(chart, values)) == round_robin(4, 2, 8)


# --- the rest of the manifests ----------------------------------------------


def admitted(policy: dict, port: int) -> list[dict] | None:
    """The peers a NetworkPolicy lets reach `port`: None for none, [] for
    anyone (a rule without `from`)."""
    peers = None
    for rule in policy["spec"]["ingress"]:
        if any(p["port"] == port for p in rule["ports"]):
            if "from" not in rule:
                return []
            peers = (peers or []) + rule["from"]
    return peers


def pods_of(docs: list[dict], kind: str) -> dict:
    """The selector labels of a workload's pods, as a NetworkPolicy peer."""
    labels = one(docs, kind)["spec"]["selector"]["matchLabels"]
    return {"podSelector": {"matchLabels": labels}}


def test_network_policies_admit_the_router_the_workers_and_the_scrapers_only(chart):
    apis = [{"ipBlock": {"cidr": "10.8.0.0/16"}}]
    admins = [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]
    for values in ({}, secured(), {**secured(), "networkPolicy": {**secured()["networkPolicy"], "apiFrom": apis, "adminFrom": admins}}):
        docs = manifests(chart, values)
        config = merged(chart, values)["networkPolicy"]
        scrapers = config["metricsFrom"] or None
        workers, router = one(docs, "StatefulSet"), one(docs, "Deployment")
        worker_policy = one(docs, "NetworkPolicy", WORKERS)
        router_policy = one(docs, "NetworkPolicy", FULLNAME)
        for policy, workload in ((worker_policy, workers), (router_policy, router)):
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            assert {"podSelector": policy["spec"]["podSelector"]} == pods_of(docs, workload["kind"])
            # Every port the pods open is in a rule: nothing is let in by omission.
            for port in container(workload)["ports"]:
                assert admitted(policy, port["containerPort"]) is not None or (
                    port["name"] == "metrics" and scrapers is None
                ), port
        ports = {p["name"]: p["containerPort"] for p in container(workers)["ports"]}
        assert admitted(worker_policy, ports["grpc"]) == [pods_of(docs, "Deployment")]
        assert admitted(worker_policy, ports["metrics"]) == scrapers
        ports = {p["name"]: p["containerPort"] for p in container(router)["ports"]}
        tester = {"podSelector": {"matchLabels": {**pods_of(docs, "Deployment")["podSelector"]["matchLabels"], "app.kubernetes.io/component": "test"}}}
        api = [*config["apiFrom"], tester] if config["apiFrom"] else []
        assert admitted(router_policy, ports["http"]) == api
        assert admitted(router_policy, ports["grpc"]) == api
        if api:
            assert tester["podSelector"]["matchLabels"].items() <= one(docs, "Pod")["metadata"]["labels"].items()
        assert admitted(router_policy, ports["metrics"]) == scrapers
        assert admitted(router_policy, ports["admin"]) == [pods_of(docs, "StatefulSet"), *config["adminFrom"]]
    assert not [d for d in manifests(chart, {"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]


def test_several_routers_get_a_budget_a_spread_and_optionally_an_autoscaler(chart):
    def router_parts(values):
        docs = manifests(chart, values)
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == FULLNAME]
        scalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
        return docs, budgets, scalers

    # One router: no budget (it would block every drain), no spread.
    docs, budgets, scalers = router_parts({})
    assert not budgets and not scalers
    assert "affinity" not in one(docs, "Deployment")["spec"]["template"]["spec"]
    for values in ({"router": {"replicas": 3}}, {"router": {"autoscaling": {"enabled": True}}}):
        docs, (budget,), scalers = router_parts(values)
        deployment = one(docs, "Deployment")
        selector = deployment["spec"]["selector"]
        assert budget["spec"]["selector"] == selector and budget["spec"]["maxUnavailable"] == 1
        (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"] == selector
        if values["router"].get("autoscaling"):
            (scaler,) = scalers
            # The autoscaler owns the count.
            assert "replicas" not in deployment["spec"]
            assert scaler["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME,
            }
            assert (scaler["spec"]["minReplicas"], scaler["spec"]["maxReplicas"]) == (1, 4)
            (metric,) = scaler["spec"]["metrics"]
            assert metric["pods"]["metric"]["name"] == "tramontane_router_waiting_requests"
            assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
        else:
            assert not scalers and deployment["spec"]["replicas"] == 3
    # An affinity of the operator's replaces the spread.
    mine = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    docs, _, _ = router_parts({"router": {"replicas": 2, "affinity": mine}})
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["affinity"] == mine


def test_the_api_is_reachable_through_an_ingress_or_a_gateway_with_streaming_timeouts(chart):
    assert not [d for d in manifests(chart) if d["kind"] in ("Ingress", "HTTPRoute")]
    docs = manifests(chart, operated())
    service = one(docs, "Service", FULLNAME)
    http = {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"]
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "api-tls", "hosts": ["api.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "api.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    # Streamed answers: no buffering, an hour to read and send.
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    route = one(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["api.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": FULLNAME, "port": http}]
    assert rule["timeouts"] == {"request": "0s", "backendRequest": "0s"}


def test_the_readmes_cluster_values_render_a_valid_release(chart):
    readme = (REPO / "README.md").read_text()
    text = re.search(r"cat > cluster-values.yaml <<'YAML'\n(.*?)\nYAML\n", readme, re.S)
    assert text, "the README's cluster-values.yaml"
    values = mixtral()
    for key, value in yaml.safe_load(text.group(1)).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    report = lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=KUBERNETES)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report
    docs = manifests(chart, values)
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Ingress", "ServiceMonitor", "PodMonitor", "Pod"} <= kinds
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "kps"


def filled(source: dict, volume: dict | None = None) -> dict:
    return {"model": {"volume": volume or {"type": "emptyDir"}, "fill": {"enabled": True, **source}}}


FILLS = {
    "s3": filled({"from": "s3", "s3": {"url": "s3://models/mixtral", "endpoint": "https://minio:9000", "secret": "s3-keys"}}),
    "pvc": filled({"from": "pvc", "pvc": {"claimName": "model-store", "subPath": "mixtral"}}),
    "image": filled(
        {"from": "image", "image": {"reference": "registry.example/mixtral:1"}},
        {"type": "pvc", "claimName": "shared-rwx"},
    ),
}


@pytest.mark.parametrize("values", FILLS.values(), ids=FILLS.keys())
def test_an_init_container_fills_the_model_volume_before_the_pods_start(chart, values):
    docs = manifests(chart, values)
    source = values["model"]["fill"]["from"]
    for kind in ("Deployment", "StatefulSet"):
        spec = one(docs, kind)["spec"]["template"]["spec"]
        (fill,) = spec["initContainers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        # It writes the model volume; the servers read it.
        (model_mount,) = [m for m in fill["volumeMounts"] if m["name"] == "model"]
        assert model_mount["mountPath"] == "/models/model" and not model_mount.get("readOnly")
        assert [m["readOnly"] for m in container(one(docs, kind))["volumeMounts"] if m["name"] == "model"] == [True]
        if "persistentVolumeClaim" in volumes["model"]:
            assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is False
        script = fill["command"][2]
        assert ".tramontane-filled" in script
        if source == "s3":
            assert ':s3:models/mixtral" "$target"' in script
            env = {e["name"]: e for e in fill["env"]}
            assert env["RCLONE_S3_ENDPOINT"]["value"] == "https://minio:9000"
            for name, key in (("RCLONE_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("RCLONE_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")):
                assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": key}
            assert "model-source" not in volumes
        else:
            (mount,) = [m for m in fill["volumeMounts"] if m["name"] == "model-source"]
            assert mount == {"name": "model-source", "mountPath": "/source", "readOnly": True}
            if source == "pvc":
                assert volumes["model-source"]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
                assert "cp -R /source/mixtral/. " in script
            else:
                assert volumes["model-source"]["image"]["reference"] == "registry.example/mixtral:1"
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
    # Without a fill: no init container, the claim read-only.
    spec = one(manifests(chart), "StatefulSet")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    assert {v["name"]: v for v in spec["volumes"]}["model"]["persistentVolumeClaim"]["readOnly"] is True


def test_the_fill_script_copies_once_and_then_leaves_the_volume_alone(chart, tmp_path):
    (fill,) = one(manifests(chart, FILLS["pvc"]), "StatefulSet")["spec"]["template"]["spec"]["initContainers"]
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "mixtral" / "sub").mkdir(parents=True)
    (source / "mixtral" / "config.json").write_text("{}")
    (source / "mixtral" / "sub" / "model.safetensors").write_bytes(b"weights")
    target.mkdir()
    script = fill["command"][2].replace("/source/", f"{source}/").replace('"/models/model"', f'"{target}"')

    def run():
        done = subprocess.run([*fill["command"][:2], script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run()
    assert (target / "config.json").read_text() == "{}"
    assert (target / "sub" / "model.safetensors").read_bytes() == b"weights"
    assert (target / ".tramontane-filled").exists()
    # A second pod (or a restart) finds it filled and copies nothing.
    (source / "mixtral" / "config.json").write_text('{"changed": true}')
    assert "already" in run()
    assert (target / "config.json").read_text() == "{}"


def test_pod_disruption_budget_covers_the_workers(chart):
    docs = manifests(chart, {"podDisruptionBudget": {"maxUnavailable": "25%"}})
    pdb = one(docs, "PodDisruptionBudget", WORKERS)
    assert pdb["spec"]["maxUnavailable"] == "25%"
    labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(manifests(chart), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("tls", [False, True])
def test_prometheus_operator_monitors(chart, tls):
    values = secured()
    values["tls"]["enabled"] = tls
    docs = manifests(chart, values)
    service_monitor = one(docs, "ServiceMonitor")
    pod_monitor = one(docs, "PodMonitor")
    for monitor in (service_monitor, pod_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert set(monitor["spec"]) <= {"selector", "endpoints", "podMetricsEndpoints"}

    metrics = one(docs, "Service", f"{FULLNAME}-metrics")
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    # Only the metrics Service: not the API's, not the workers'.
    for other in (one(docs, "Service", FULLNAME), one(docs, "Service", WORKERS)):
        assert not selector.items() <= other["metadata"]["labels"].items()
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    assert endpoint["scheme"] == ("https" if tls else "http")

    workers = one(docs, "StatefulSet")
    assert (
        pod_monitor["spec"]["selector"]["matchLabels"].items()
        <= workers["spec"]["template"]["metadata"]["labels"].items()
    )
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    # The workers' metrics port (--metrics-listen), not their gRPC port.
    ports = {p["name"]: p["containerPort"] for p in container(workers)["ports"]}
    assert endpoint["port"] == "metrics"
    assert flag(container(workers)["command"], "--metrics-listen") == f"0.0.0.0:{ports['metrics']}"
    assert ports["metrics"] != ports["grpc"]
    assert endpoint["path"] == "/metrics" and endpoint["enableHttp2"] is False
    assert endpoint["scheme"] == ("https" if tls else "http")
    if tls:
        # The worker's certificate verified; no key of the cluster's given
        # to the scraper.
        config = endpoint["tlsConfig"]
        assert config["ca"]["secret"] == {"name": "moe-certs", "key": "ca.pem"}
        assert "cert" not in config and "keySecret" not in config
        assert config["serverName"].endswith(f".{WORKERS}.{NAMESPACE}.svc.cluster.local")
    else:
        assert "tlsConfig" not in endpoint


def relabeled(labels: dict[str, str], rules: list[dict]) -> dict[str, str]:
    """Prometheus's `replace` relabeling, as the operator writes it into the
    scrape configuration: the source labels joined by `;`, the regex
    anchored at both ends, `$1`-style groups in the replacement."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace", rule
        value = ";".join(labels.get(name, "") for name in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["targetLabel"]] = match.expand(replacement)
    return {name: value for name, value in labels.items() if not name.startswith("__")}


def test_monitors_label_targets_as_the_dashboard_reads_them(chart):
    docs = manifests(chart, secured())
    (router,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    meta = {"__meta_kubernetes_pod_name": f"{FULLNAME}-7d9f-x2x", "job": f"{FULLNAME}-metrics"}
    assert relabeled(meta, router["relabelings"]) == {
        "job": f"{FULLNAME}-metrics",
        "component": "router",
        "release": RELEASE,
    }
    (workers,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    for index in (0, 3, 12):
        meta = {"__meta_kubernetes_pod_name": f"{WORKERS}-{index}"}
        assert relabeled(meta, workers["relabelings"]) == {
            "component": "worker",
            "worker": str(index),
            "release": RELEASE,
        }


def covers(names: list[str], host: str) -> bool:
    """Whether a certificate for `names` is valid for `host` (a wildcard
    stands for one leftmost label)."""
    for name in names:
        if name.startswith("*."):
            label, _, rest = host.partition(".")
            if label and rest == name[2:]:
                return True
        elif name == host:
            return True
    return False


@pytest.mark.parametrize("where", ["README", "NOTES"])
def test_the_documented_certificates_carry_every_name_the_chart_verifies(chart, where):
    # Release moe in namespace moe, as the README installs it.
    values = secured()
    values["router"] = {"admin": {"enabled": True}}
    rendered = chart.render(values, name="moe", namespace="moe")
    docs = [
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    if where == "README":
        text = (REPO / "README.md").read_text()
    else:
        (text,) = [t for path, t in rendered.items() if path.endswith("NOTES.txt")]
    command = re.search(r"tramontane certs --out certs \\\n(.*?)\n\s*kubectl", text, re.S)
    assert command, f"no `tramontane certs` command in the {where}"
    nodes = {
        node: hosts.split(",")
        for node, hosts in re.findall(r"--node (\w+)='?([^'\s]+)'?", command.group(1))
    }
    # The router's certificate serves its Services; the workers' theirs.
    (router,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    verified = {"router": [router["tlsConfig"]["serverName"]], "worker": []}
    (workers,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    verified["worker"].append(workers["tlsConfig"]["serverName"])
    env = {e["name"]: e.get("value") for e in container(one(docs, "StatefulSet"))["env"]}
    admin = env["TRAMONTANE_ADMIN_SERVER"].split("://", 1)[1].rsplit(":", 1)[0]
    verified["router"].append(admin)
    dialled = flag(container(one(docs, "Deployment"))["command"], "--workers")
    verified["worker"].extend(name.rsplit(":", 1)[0] for name in dialled.split(","))
    for node, hosts in verified.items():
        for host in hosts:
            assert covers(nodes[node], host), f"{where}: {node}'s certificate lacks {host}"


def test_local_grafana_loads_the_charts_dashboard():
    # One copy of the dashboard, in the chart (Helm's .Files.Get reads only
    # the chart's folder); the local provisioning and the README name it.
    dashboard = CHART / "dashboards/tramontane.json"
    folder = dashboard.parent.relative_to(REPO).as_posix()
    provisioning = (REPO / "deploy/grafana/provisioning/dashboards/tramontane.yml").read_text()
    assert dashboard.relative_to(REPO).as_posix() in provisioning
    (provider,) = yaml.safe_load(provisioning)["providers"]
    mount = provider["options"]["path"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"mount `{folder}/` at `{mount}`" in readme
    assert not (REPO / "deploy/grafana/dashboards").exists(), "a second copy of the dashboard"
    panels = json.loads(dashboard.read_text())["panels"]
    assert panels and all(target["expr"] for panel in panels for target in panel["targets"])


def test_the_knobs_operators_add_reach_both_pods(chart):
    values = operated()
    docs = manifests(chart, values)
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == FULLNAME
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    for kind, component in (("Deployment", "router"), ("StatefulSet", "workers")):
        given = values[component]
        pod = one(docs, kind)["spec"]["template"]
        spec = pod["spec"]
        assert spec["serviceAccountName"] == FULLNAME
        assert spec["automountServiceAccountToken"] is False
        for key in ("priorityClassName", "runtimeClassName", "tolerations", "affinity"):
            assert spec[key] == given[key], (kind, key)
        assert given["podLabels"].items() <= pod["metadata"]["labels"].items()
        assert given["podAnnotations"].items() <= pod["metadata"]["annotations"].items()
        spread, zoned = spec["topologySpreadConstraints"]
        selector = one(docs, kind)["spec"]["selector"]
        assert spread["labelSelector"] == selector, "a constraint without one gets the pods' selector"
        assert zoned["labelSelector"] == {"matchLabels": {"team": "serving"}}
        worker = container(one(docs, kind))
        env = {e["name"]: e for e in worker["env"]}
        assert env["TRAMONTANE_LOG"]["value"] == "info,tramontane_router=debug"
        for item in given["env"]:
            assert env[item["name"]] == item
        assert {"name": "scratch", "mountPath": "/scratch"} in worker["volumeMounts"]
        assert {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}} in spec["volumes"]
    # Without them: the default account, no token, the log level info.
    docs = manifests(chart)
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    for kind in ("Deployment", "StatefulSet"):
        spec = one(docs, kind)["spec"]["template"]["spec"]
        assert "serviceAccountName" not in spec and spec["automountServiceAccountToken"] is False
        env = {e["name"]: e.get("value") for e in container(one(docs, kind))["env"]}
        assert env["TRAMONTANE_LOG"] == "info"


def test_dashboard_queries_the_chosen_data_source_namespace_and_release():
    dashboard = json.loads((CHART / "dashboards/tramontane.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "release"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert f", {name})" in variables[name]["query"]["query"]
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == chosen, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == chosen, panel["title"]
            # Every series selected, by the namespace and release chosen.
            expr = re.sub(r'"[^"]*"', '""', target["expr"])
            for metric in re.finditer(r"\b(tramontane_\w+|up)\b(\{[^}]*\})?", expr):
                selector = metric.group(0)
                assert 'namespace=~""' in selector and 'release=~""' in selector, (
                    panel["title"],
                    target["expr"],
                )
    assert "tramontane-prometheus" not in json.dumps(dashboard)


def test_dashboard_configmap_carries_the_dashboard_and_the_sidecar_label(chart):
    dashboard = one(manifests(chart), "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert (
        dashboard["data"]["tramontane.json"] == (CHART / "dashboards/tramontane.json").read_text()
    )
    json.loads(dashboard["data"]["tramontane.json"])


def test_selectors_are_stable_labels_only(chart):
    # A selector is immutable: no version or chart label in it.
    for kind in ("StatefulSet", "Deployment"):
        workload = one(manifests(chart), kind)
        selector = workload["spec"]["selector"]["matchLabels"]
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(
    ("release", "fullname"),
    [
        ("tramontane", "tramontane"),
        ("tramontane-prod", "tramontane-prod"),
        (
            "a-release-name-of-fifty-three-characters-at-the-most",
            "a-release-name-of-fifty-three-characters",
        ),
    ],
)
def test_names_fit_kubernetes_limits(chart, release, fullname):
    docs = manifests(chart, {}, name=release)
    workers = one(docs, "StatefulSet")
    assert workers["metadata"]["name"] == f"{fullname}-workers"
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
    # The pod name, and the StatefulSet's controller-revision-hash label
    # (name, dash, 10 characters), stay within a DNS label.
    assert len(workers["metadata"]["name"]) + 11 <= 63
    command = container(one(docs, "Deployment"))["command"]
    host = flag(command, "--workers").split(",")[0].split(":")[0]
    assert host.startswith(f"{fullname}-workers-0.{fullname}-workers.")
    assert all(len(label) <= 63 for label in host.split("."))


def test_notes_say_where_to_send_requests(chart):
    notes = render(chart, secured())["tramontane/templates/NOTES.txt"]
    assert f"service/{FULLNAME} 8000" in notes
    assert f"--node worker=*.{WORKERS}.{NAMESPACE}.svc.cluster.local" in notes
    assert "Authorization: Bearer" in notes


# --- updates and drains without an outage ---------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_a_stopping_worker_has_its_experts_moved_first(chart, values):
    docs = manifests(chart, values())
    config = merged(chart, values())
    tls = config["tls"]["enabled"]
    workers = one(docs, "StatefulSet")
    worker = container(workers)
    hook = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["tramontane", "admin", "workers", "remove"]
    # The hook's arguments come from the environment: its own index, the
    # router's admin Service, the key the router was given.
    names = [e["name"] for e in worker["env"]]
    env = {e["name"]: e for e in worker["env"]}
    assert names.index("POD_NAME") < names.index("TRAMONTANE_WORKER_INDEX")
    assert env["TRAMONTANE_WORKER_INDEX"]["value"] == "$(POD_NAME)"
    port = config["router"]["admin"]["port"]
    scheme = "https" if tls else "http"
    assert env["TRAMONTANE_ADMIN_SERVER"]["value"] == (
        f"{scheme}://{FULLNAME}-admin.{NAMESPACE}.svc:{port}"
    )
    router = container(one(docs, "Deployment"))
    router_env = {e["name"]: e for e in router["env"]}
    key_ref = env["TRAMONTANE_ADMIN_KEY"]["valueFrom"]
    assert key_ref == router_env["TRAMONTANE_ADMIN_KEY"]["valueFrom"]
    secret = one(docs, "Secret", key_ref["secretKeyRef"]["name"])
    key = base64.b64decode(secret["data"][key_ref["secretKeyRef"]["key"]]).decode()
    assert len(key) == 40 and key.isalnum()
    # Not on a command line: the API keys must not open it either.
    assert key not in router["command"]
    if tls:
        ca = env["TRAMONTANE_TLS_CA"]["value"]
        assert ca == flag(worker["command"], "--tls-ca")
    else:
        assert "TRAMONTANE_TLS_CA" not in env
    spec = workers["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == config["workers"]["drainTimeoutSeconds"]
    # The router heals a worker lost without notice, within spare slots.
    assert "--self-heal" in router["command"]
    assert flag(router["command"], "--spare-slots") == str(config["workers"]["spareSlots"])
    assert "--rebalance-interval" not in router["command"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rollouts_wait_for_model_sized_starts(chart, values):
    docs = manifests(chart, values())
    config = merged(chart, values())
    workers = one(docs, "StatefulSet")
    # One worker at a time, the next once this one is back for a while.
    assert workers["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"partition": 0},
    }
    assert workers["spec"]["minReadySeconds"] == config["workers"]["minReadySeconds"] >= 10
    assert one(docs, "PodDisruptionBudget", WORKERS)["spec"]["maxUnavailable"] == 1
    # A worker's startup probe allows its whole load time.
    probe = container(workers)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= config["workers"]["loadTimeoutSeconds"]
    # A new router serves before an old one stops, and the Deployment
    # does not call it stuck while it loads and waits for its workers.
    router = one(docs, "Deployment")
    assert router["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    budget = config["router"]["loadTimeoutSeconds"] + config["router"]["startupTimeoutSeconds"]
    assert router["spec"]["progressDeadlineSeconds"] > budget
    probe = container(router)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= budget


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_test_sends_one_completion_through_the_routers_service(chart, values):
    docs = manifests(chart, values())
    config = merged(chart, values())
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (tester,) = pod["spec"]["containers"]
    assert tester["image"] == container(one(docs, "Deployment"))["image"]
    script = tester["command"][2]
    assert tester["command"][:2] == ["sh", "-c"]
    (line,) = [l for l in script.splitlines() if "tramontane generate" in l]
    args = line.split("tramontane generate", 1)[1].split(")", 1)[0].split()
    service = one(docs, "Service", FULLNAME)
    grpc = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert flag(args, "--server") == f"{FULLNAME}.{NAMESPACE}.svc:{grpc}"
    assert ("--tls-ca" in args) == config["tls"]["enabled"]
    assert ("TRAMONTANE_API_KEY" in script) == config["apiKey"]["enabled"]
    accepted = help_flags("generate")
    assert {a for a in args if a.startswith("--")} <= accepted
    # The answer must hold tokens: an empty one fails the test.
    assert "grep -q '\"token_ids\":\\[[0-9]'" in script
    if config["tls"]["enabled"] or config["apiKey"]["enabled"]:
        mounts = {m["mountPath"] for m in tester["volumeMounts"]}
        assert "/etc/tramontane" in mounts


def test_the_admin_api_and_the_hook_are_optional(chart):
    off = {"router": {"admin": {"enabled": False}, "selfHeal": False, "rebalanceIntervalSeconds": 60}}
    docs = manifests(chart, off)
    worker = container(one(docs, "StatefulSet"))
    assert "lifecycle" not in worker
    assert not [e for e in worker["env"] if e["name"].startswith("TRAMONTANE_ADMIN")]
    router = container(one(docs, "Deployment"))
    assert "--admin-listen" not in router["command"]
    assert [e["name"] for e in router["env"]] == ["TRAMONTANE_LOG"]
    assert "--self-heal" not in router["command"]
    assert flag(router["command"], "--rebalance-interval") == "60"
    assert not [d for d in docs if d["metadata"]["name"].endswith("-admin")]
    # An existing Secret holds the key: both read it from there.
    docs = manifests(chart, {"router": {"admin": {"existingSecret": "pool-admin"}}})
    for kind in ("StatefulSet", "Deployment"):
        env = {e["name"]: e for e in container(one(docs, kind))["env"]}
        assert env["TRAMONTANE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "pool-admin"


# --- the binary takes every flag -------------------------------------------


def binary() -> Path:
    path = Path(os.environ.get("TRAMONTANE_BIN", REPO / "target/release/tramontane"))
    if not path.exists():
        pytest.skip(f"{path} not built (TRAMONTANE_BIN)")
    return path


def help_flags(subcommand: str) -> set[str]:
    done = subprocess.run(
        [binary(), subcommand, "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_flag_the_chart_passes_is_one_the_binary_takes(chart, values):
    docs = manifests(chart, values())
    for kind, subcommand in (("StatefulSet", "worker"), ("Deployment", "router")):
        command = container(one(docs, kind))["command"]
        assert command[:2] == ["tramontane", subcommand]
        passed = {arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("--")}
        accepted = help_flags(subcommand)
        assert passed, command
        assert passed <= accepted, (
            f"`tramontane {subcommand}` does not take {sorted(passed - accepted)}"
        )
    # The preStop hook takes its arguments from the environment: each
    # variable is one `tramontane admin workers remove` reads.
    worker = container(one(docs, "StatefulSet"))
    hook = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == "tramontane"
    read = set()
    for depth in range(2, len(hook) + 1):
        done = subprocess.run(
            [binary(), *hook[1:depth], "--help"], capture_output=True, text=True, timeout=60
        )
        read |= set(re.findall(r"env: (TRAMONTANE_[A-Z_]+)", done.stdout))
    passed = {e["name"] for e in worker["env"] if e["name"].startswith("TRAMONTANE_")}
    # Every command's log filter (cli/src/telemetry.rs), not a flag's.
    assert 'EnvFilter::try_from_env("TRAMONTANE_LOG")' in (REPO / "cli/src/telemetry.rs").read_text()
    passed.discard("TRAMONTANE_LOG")
    assert passed <= read, f"the hook does not read {sorted(passed - read)}"
