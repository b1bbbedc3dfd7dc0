"""The deployment examples under deploy/ (Kubernetes manifests, prometheus-adapter values, the KubeRay
cluster) parse, are valid for Kubernetes' own schemas, point at each other by names that resolve, and agree
with what they describe: the settings the service reads, the routes and port BentoML serves, the folders
the container mounts, the metric BentoML exports. Fast: no cluster, no server (tests/test_deploy_replicas.py
checks the same names against a real `bentoml serve`)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import kubernetes_validate
import pytest
import yaml

from slapgen.serving.settings import SlapSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
HELM_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"  # Helm values, not a Kubernetes object
SHARED_FOLDER_SETTINGS = ("SLAP_ADAPTERS_DIR", "SLAP_DATA_DIR", "SLAP_RESULTS_DIR", "SLAP_COMPILE_CACHE_DIR")


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def objects(folder: Path = DEPLOY) -> list[dict]:
    return [document for path in MANIFESTS if path.is_relative_to(folder) and path != HELM_VALUES
            and path.name != "kustomization.yaml" for document in documents(path)]


def one(kind: str, folder: Path = DEPLOY) -> dict:
    found = [document for document in objects(folder) if document["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under {folder}, found {len(found)}"
    return found[0]


def service_container() -> dict:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def environment(container: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def pod_templates(document: dict) -> list[dict]:
    """The pod templates of one object (a Deployment's or StatefulSet's, a RayCluster's head and worker groups)."""
    spec = document.get("spec", {})
    templates = [spec.get("template"), spec.get("headGroupSpec", {}).get("template"),
                 *(group.get("template") for group in spec.get("workerGroupSpecs", []))]
    return [template for template in templates if template]


def all_containers() -> list[dict]:
    """Every container of every pod template under deploy/ (Deployment, StatefulSet, RayCluster groups)."""
    return [container for document in objects() for template in pod_templates(document)
            for container in template["spec"]["containers"]]


def test_every_manifest_parses_and_names_its_kind():
    """Guards a manifest broken by an edit (bad indentation, a tab, a missing apiVersion) that only
    `kubectl apply` would find; and kustomization.yaml listing a file that is not there, or missing one
    of the base's files."""
    assert len(MANIFESTS) >= 8, MANIFESTS
    for path in MANIFESTS:
        parsed = documents(path)
        assert parsed, f"{path} is empty"
        if path == HELM_VALUES:
            continue
        for document in parsed:
            assert document.get("apiVersion") and document.get("kind"), f"{path}: {document}"
    listed = documents(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


# Kinds whose schemas their operators install (KubeRay, the Prometheus Operator), not Kubernetes itself: the
# schema check below cannot see them, and every other kind must be one it knows.
OPERATOR_KINDS = {"RayCluster", "PodMonitor"}
# A floor of our choosing, not a release the examples name: 1.29 (December 2023; HPA autoscaling/v2, startupProbe
# and ReadWriteMany are all older), and the newest the schemas installed know.
SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


@pytest.mark.parametrize("kubernetes_version", SCHEMA_VERSIONS)
def test_every_kubernetes_object_is_valid_for_the_api_server(kubernetes_version):
    """Guards a manifest that parses but that the API server would reject or silently mangle: a misspelt
    field (`httpget` for `httpGet`, which `kubectl apply` refuses with strict field validation and older
    servers drop, leaving a pod with no readiness probe), a number where a string belongs, a field in the
    wrong place. Checked against Kubernetes' own OpenAPI schemas (kubernetes-validate's copies), in strict
    mode: no property the schema does not name. No cluster runs here, so this is the API server's schema
    check without its admission; RayCluster and PodMonitor are the operators' and are left out."""
    checked = []
    for document in objects():
        if document["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{document['kind']} {document['metadata']['name']}: {error.message} at "
                        f"{'.'.join(map(str, error.path))}")
        checked.append(document["kind"])
    assert {"Deployment", "Service", "StatefulSet", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
            "Secret"} <= set(checked), checked


def test_the_schema_check_rejects_a_misspelt_probe():
    """Guards the check above passing everything (a schema version it silently does not have, strict mode
    off): the real Deployment with its readiness probe's `httpGet` misspelt must fail it."""
    deployment = one("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["readinessProbe"]["httpget"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError, match="'httpget' was unexpected"):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def unresolved_references(applied: list[dict]) -> list[str]:
    """What a cluster would not find among objects applied together (deploy/k8s, deploy/ray): the names
    by which they point at each other. The API server refuses a few of these (a selector its own template
    does not match, a mount of no volume); the rest it accepts and the cluster fails later, often silently:
    a Service with no endpoints, an HPA that never scales, a pod pending on a claim nobody made, a
    container that cannot start for a missing Secret key, a probe on a port no container has, or a
    database URL whose host, port, user or password is not the database's."""
    def named(kind: str) -> dict[str, dict]:
        return {document["metadata"]["name"]: document for document in applied if document["kind"] == kind}

    services, secrets, claims = named("Service"), named("Secret"), named("PersistentVolumeClaim")
    workloads = [document for document in applied if document["kind"] in ("Deployment", "StatefulSet")]

    def selected(selector: dict) -> list[dict]:
        return [workload for workload in workloads
                if selector and selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()]

    def port_names(containers: list[dict]) -> set[str]:
        """The names a probe or a Service's targetPort may use (a number reaches its port declared or not)."""
        return {port["name"] for container in containers for port in container.get("ports", []) if "name" in port}

    def secret_value(name: str, key: str) -> str | None:
        secret = secrets.get(name, {})
        if key in secret.get("stringData", {}):
            return secret["stringData"][key]
        encoded = secret.get("data", {}).get(key)
        return base64.b64decode(encoded).decode() if encoded is not None else None

    def value_of(variable: dict | None) -> str | None:
        """An env variable's value, given or read from a Secret (None: neither)."""
        if variable is None:
            return None
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        return secret_value(reference["name"], reference["key"]) if reference else variable.get("value")

    problems = []
    for document in applied:
        kind, spec = document["kind"], document.get("spec", {})
        where = f"{kind} {document['metadata']['name']}"
        for template in pod_templates(document):
            volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
            volumes |= {claim["metadata"]["name"]: claim for claim in spec.get("volumeClaimTemplates", [])}
            for volume in volumes.values():
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                if claim and claim not in claims:
                    problems.append(f"{where}: volume {volume['name']} claims {claim}, which is not defined")
            for container in template["spec"]["containers"]:
                problems += [f"{where}: {container['name']} mounts {mount['name']}, which is not a volume"
                             for mount in container.get("volumeMounts", []) if mount["name"] not in volumes]
                for variable in container.get("env", []):
                    reference = variable.get("valueFrom", {}).get("secretKeyRef")
                    if reference and secret_value(reference["name"], reference["key"]) is None:
                        problems.append(f"{where}: {variable['name']} reads {reference['name']}/{reference['key']}, "
                                        "which is not defined")
                for probe in PROBES:
                    port = container.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str) and port not in port_names([container]):
                        problems.append(f"{where}: the {probe} is on port {port}, which {container['name']} does not have")
        if kind in ("Deployment", "StatefulSet") and document not in selected(spec["selector"]["matchLabels"]):
            problems.append(f"{where}: its selector does not match its own pods' labels")
        if kind == "StatefulSet" and spec["serviceName"] not in services:
            problems.append(f"{where}: its serviceName {spec['serviceName']} is not a Service")
        if kind in ("Service", "PodMonitor"):
            targets = selected(spec["selector"].get("matchLabels", spec["selector"]))
            if len(targets) != 1:
                problems.append(f"{where}: selects {len(targets)} workloads, not one")
            # a Service port without targetPort targets its own number
            wanted = [port.get("targetPort", port.get("port")) for port in spec.get("ports", [])] + \
                     [endpoint["port"] for endpoint in spec.get("podMetricsEndpoints", [])]
            problems += [f"{where}: port {port} is not a port its pods name" for target in targets for port in wanted
                         if isinstance(port, str) and port not in port_names(target["spec"]["template"]["spec"]["containers"])]
        if kind == "HorizontalPodAutoscaler":
            target = spec["scaleTargetRef"]
            if not any(other["kind"] == target["kind"] and other["metadata"]["name"] == target["name"]
                       and other["apiVersion"] == target["apiVersion"] for other in applied):
                problems.append(f"{where}: scales {target['kind']} {target['name']}, which is not defined")
    for name in secrets:
        url = secret_value(name, "SLAP_DATABASE_URL")
        if url is None:
            continue
        parsed = urlsplit(url)
        host = (parsed.hostname or "").split(".")[0]  # a Service answers as NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc...
        database = services.get(host)
        port = parsed.port or 5432  # PostgreSQL's, when the URL names none
        if database is None or port not in {service_port["port"] for service_port in database["spec"]["ports"]}:
            problems.append(f"Secret {name}: SLAP_DATABASE_URL names {parsed.hostname}:{port}, not a Service port")
            continue
        servers = [container for workload in selected(database["spec"]["selector"])
                   for container in workload["spec"]["template"]["spec"]["containers"]]
        if len(servers) != 1:
            problems.append(f"Secret {name}: SLAP_DATABASE_URL's Service {parsed.hostname} reaches {len(servers)} servers")
            continue
        env = environment(servers[0])
        # the postgres image's own variables and defaults: user postgres, database the user's name (libpq's
        # default database is the user's name too)
        user = value_of(env.get("POSTGRES_USER")) or "postgres"
        password, database_name = value_of(env.get("POSTGRES_PASSWORD")), value_of(env.get("POSTGRES_DB")) or user
        given_user = unquote(parsed.username or "")
        given = (given_user, unquote(parsed.password or ""), unquote(parsed.path.lstrip("/")) or given_user)
        if given != (user, password, database_name):
            problems.append(f"Secret {name}: SLAP_DATABASE_URL's user, password or database is not the database's")
    return problems


@pytest.mark.parametrize("folder", [K8S, DEPLOY / "ray"], ids=["k8s", "ray"])
def test_every_reference_between_the_objects_resolves(folder):
    """Guards an example that `kubectl apply` accepts and the cluster then fails to run: an edit that
    renames one end of a reference (a label, a port name, a claim, a Secret key, the database's password)
    but not the other. No cluster runs here; `unresolved_references` follows each name as one would."""
    assert unresolved_references(objects(folder)) == []


def _the(applied: list[dict], kind: str, name: str) -> dict:
    (found,) = [document for document in applied if document["kind"] == kind and document["metadata"]["name"] == name]
    return found


def _rename_label(applied):
    _the(applied, "Service", "slapgen")["spec"]["selector"] = {"app.kubernetes.io/name": "slapgn"}


def _rename_deployment(applied):
    _the(applied, "Deployment", "slapgen")["metadata"]["name"] = "slapgen-service"


def _rename_claim(applied):
    _the(applied, "PersistentVolumeClaim", "slapgen-shared")["metadata"]["name"] = "shared"


def _rename_port(applied):
    _the(applied, "Deployment", "slapgen")["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "web"


def _change_one_password(applied):
    _the(applied, "Secret", "slapgen-database")["stringData"]["POSTGRES_PASSWORD"] = "s3cret"


def _rename_database_host(applied):
    secret = _the(applied, "Secret", "slapgen-database")
    secret["stringData"]["SLAP_DATABASE_URL"] = secret["stringData"]["SLAP_DATABASE_URL"].replace("@slapgen-postgres:", "@postgres:")


def _rename_headless_service(applied):
    _the(applied, "StatefulSet", "slapgen-postgres")["spec"]["serviceName"] = "slapgen-pg"


def _rename_secret_key(applied):
    secret = _the(applied, "Secret", "slapgen-database")
    secret["stringData"]["DATABASE_URL"] = secret["stringData"].pop("SLAP_DATABASE_URL")


def _equivalent_forms(applied):
    """The same example written the other ways Kubernetes and PostgreSQL accept: the Secret's values base64 in
    `data`, the URL's default port left out, its host qualified with the namespace and a password %-encoded,
    POSTGRES_DB left to default to the user's name, the database Service's targetPort left to default to its
    port, a probe on a port number."""
    secret = _the(applied, "Secret", "slapgen-database")
    password = "change me/now"
    secret["stringData"]["POSTGRES_PASSWORD"] = password
    url = f"postgresql://slapgen:{quote(password, safe='')}@slapgen-postgres.slapgen.svc.cluster.local/slapgen"
    secret["stringData"]["SLAP_DATABASE_URL"] = url
    secret["data"] = {key: base64.b64encode(value.encode()).decode() for key, value in secret.pop("stringData").items()}
    server = _the(applied, "StatefulSet", "slapgen-postgres")["spec"]["template"]["spec"]["containers"][0]
    server["env"] = [variable for variable in server["env"] if variable["name"] != "POSTGRES_DB"]
    del _the(applied, "Service", "slapgen-postgres")["spec"]["ports"][0]["targetPort"]
    _the(applied, "Deployment", "slapgen")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = 3000


def test_equivalent_forms_of_the_references_resolve():
    """Guards the reference check reporting what a cluster accepts (a false alarm makes a correct edit look broken):
    every form in `_equivalent_forms` must still resolve, and the real example must differ from it."""
    applied = objects(K8S)
    _equivalent_forms(applied)
    assert applied != objects(K8S)
    assert unresolved_references(applied) == []


@pytest.mark.parametrize("break_it, said", [
    (_rename_label, "Service slapgen: selects 0 workloads"),
    (_rename_deployment, "HorizontalPodAutoscaler slapgen: scales Deployment slapgen"),
    (_rename_claim, "claims slapgen-shared, which is not defined"),
    (_rename_port, "the readinessProbe is on port http"),
    (_change_one_password, "SLAP_DATABASE_URL's user, password or database"),
    (_rename_database_host, "SLAP_DATABASE_URL names postgres:5432, not a Service port"),
    (_rename_headless_service, "StatefulSet slapgen-postgres: its serviceName slapgen-pg is not a Service"),
    (_rename_secret_key, "SLAP_DATABASE_URL reads slapgen-database/SLAP_DATABASE_URL"),
], ids=lambda value: getattr(value, "__name__", "")[1:] or None)
def test_a_broken_reference_is_found(break_it, said):
    """Guards the check above finding nothing because it looks at nothing: each of these edits of the real
    deploy/k8s objects, one end of a reference renamed, must be reported."""
    applied = objects(K8S)
    break_it(applied)
    problems = unresolved_references(applied)
    assert any(said in problem for problem in problems), problems


def test_every_slap_variable_in_the_manifests_is_a_setting():
    """Guards a variable that the service silently ignores (SlapSettings takes `extra="ignore"`): a typo
    (SLAP_ADAPTER_DIR) or a setting renamed in slapgen/serving/settings.py but not in deploy/. The names
    are read from the settings class itself."""
    known = {f"SLAP_{field.upper()}" for field in SlapSettings.model_fields}
    named = {name for container in all_containers() for name in environment(container) if name.startswith("SLAP_")}
    named |= set(re.findall(r"\bSLAP_[A-Z_]+\b", (K8S / "database-secret.yaml").read_text()))
    assert SHARED_FOLDER_SETTINGS[0] in named and "SLAP_DATABASE_URL" in named
    assert sorted(named - known) == []


def test_the_service_settings_in_the_manifests_validate(monkeypatch, tmp_path):
    """Guards a value the service would refuse at start-up (a crash loop in every pod): the Deployment's
    plain values and the Secret's SLAP_DATABASE_URL go through SlapSettings as `bentoml serve` reads them
    (absolute folders re-rooted under tmp_path: some settings make and write their folder when validated)."""
    container = service_container()
    secret = one("Secret")
    for name, variable in environment(container).items():
        if "value" in variable:
            value = variable["value"]
            monkeypatch.setenv(name, str(tmp_path / value.lstrip("/")) if value.startswith("/") else value)
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret["metadata"]["name"]
            monkeypatch.setenv(name, secret["stringData"][reference["key"]])
    settings = SlapSettings()
    assert settings.database_url.startswith("postgresql") and settings.workers == 1 and settings.compile


def _system_routes() -> set[str]:
    """The routes BentoML's server adds to every service (its own code, not a copy of the list)."""
    from bentoml._internal.server.base_app import BaseAppFactory

    class Handlers:
        livez = readyz = metrics = staticmethod(lambda request: None)

    return {route.path for route in BaseAppFactory.get_system_routes(Handlers())}


def test_probes_are_routes_the_service_serves():
    """Guards probes on a path BentoML does not serve (every pod killed or never ready) or the wrong way
    round: readiness and start-up on /readyz (ready only after load + compile + warm-up), liveness on
    /livez (which a long generation does not block)."""
    container = service_container()
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert {probe["path"] for probe in probes.values()} <= _system_routes()
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    # Long enough for a cold start: download + compile of 5B, many minutes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60


def test_the_container_port_is_bentomls_and_the_services_target():
    """Guards a port that nothing listens on: the container port must be `bentoml serve`'s default (the
    image's EXPOSE), the one README's `docker run -p` publishes, and the one the Service, the probes and
    the PodMonitor reach by name."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    (port,) = service_container()["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get()
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"-p {port['containerPort']}:{port['containerPort']}" in readme
    (service,) = [document for document in objects(K8S) if document["kind"] == "Service"
                  and document["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    container = service_container()
    assert {container[kind]["httpGet"]["port"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")} == {port["name"]}
    monitor = documents(K8S / "monitoring" / "podmonitor.yaml")[0]
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == [port["name"]]


def test_folders_are_mounted_where_the_settings_point():
    """Guards a setting pointing at a folder that is not the shared volume (adapters or results written
    into one pod's own disk, unseen by the other replicas; a compile cache lost at every restart) and a
    shared BentoML home (BentoML recreates its task store at start-up, so replicas would break each other)."""
    deployment = one("Deployment")
    container = service_container()
    env = environment(container)
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    claims = {claim["metadata"]["name"]: claim for claim in objects(K8S) if claim["kind"] == "PersistentVolumeClaim"}
    for name in (*SHARED_FOLDER_SETTINGS, "HF_HOME"):
        mount = mounts.get(env[name]["value"])
        assert mount is not None, f"{name}={env[name]['value']} is not a mount path"
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name
    subpaths = [mounts[env[name]["value"]].get("subPath") for name in SHARED_FOLDER_SETTINGS]
    assert len(set(subpaths)) == len(subpaths), "two settings share one folder"
    home = mounts[env["BENTOML_HOME"]["value"]]
    assert "emptyDir" in volumes[home["name"]]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_hpa_scales_on_the_load_gauge_slapgen_exports():
    """Guards an HPA on a metric nobody exports (it never scales, silently), or on BentoML's in-flight request
    gauge, which forgets a job once /jobs/submit has answered (a replica busy with jobs read as idle): the HPA's
    metric, the prometheus-adapter rule that serves it and the gauge the service sets agree.
    tests/test_deploy_replicas.py checks the same name in a real server's /metrics, tests/test_jobs_service.py
    its value."""
    from slapgen.serving.load_metric import GENERATIONS_IN_FLIGHT

    metric = GENERATIONS_IN_FLIGHT
    (target,) = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert target["type"] == "Pods" and target["pods"]["metric"]["name"] == metric
    assert target["pods"]["target"] == {"type": "AverageValue", "averageValue": environment(service_container())["SLAP_WORKERS"]["value"]}
    (rule,) = documents(HELM_VALUES)[0]["rules"]["custom"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert re.fullmatch(rule["name"]["matches"], metric) and rule["name"]["as"] == metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]


def test_the_stop_grace_is_the_pods_grace_period():
    """Guards SLAP_STOP_GRACE_S and terminationGracePeriodSeconds drifting apart: shorter, the survivors fail a
    stopped replica's jobs while it still finishes them; longer, they keep saying `running` after its kill."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert int(environment(service_container())["SLAP_STOP_GRACE_S"]["value"]) == pod["terminationGracePeriodSeconds"]


def test_a_replica_holds_no_more_than_it_finishes_within_its_grace():
    """Guards the example's queue (SLAP_MAX_QUEUE) outgrowing its stop grace: a job stays on the replica that took
    it, so a replica holding 16 (the default) on a scale-down or rollout finished 2 and failed 14 (a walk-through's
    find). The jobs a replica may hold, at the compiled 50-step CogVideoX-5B time measured on the H200 plus a fifth
    for the VAE decode and the mp4 (not measured on a GPU yet), fit within terminationGracePeriodSeconds."""
    from tests.test_readme import h200_checks

    pod = one("Deployment")["spec"]["template"]["spec"]
    settings = environment(service_container())
    assert (settings["SLAP_COMPILE"]["value"], settings["SLAP_QUANT"]["value"]) == ("1", "none")  # the time below's
    video_s = h200_checks("call3-1-step.json")["bf16-compile-14-blocks"]["est_50_steps_s"]
    assert int(settings["SLAP_MAX_QUEUE"]["value"]) * video_s * 1.2 <= pod["terminationGracePeriodSeconds"]


def test_a_rollout_asks_for_no_gpu_beyond_the_replicas():
    """Guards a rollout that waits forever: Kubernetes' default surge adds a pod (a GPU) before removing one, and
    with the HPA at maxReplicas, which README sizes to the GPUs there are, none is free."""
    strategy = one("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxSurge"] == 0
    assert strategy["rollingUpdate"]["maxUnavailable"] >= 1


def test_every_ray_node_mounts_the_same_shared_sweep_volume():
    """Guards a sweep folder only some nodes see (a run on a worker writing checkpoints its retry on another
    node cannot find): the head and every worker group mount one ReadWriteMany claim at one path, and the
    workers ask for GPUs (`--gpus-per-run`)."""
    cluster = one("RayCluster", DEPLOY / "ray")
    claim = one("PersistentVolumeClaim", DEPLOY / "ray")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"])]
    mounted = set()
    for pod in pods:
        shared = {volume["name"] for volume in pod["volumes"]
                  if volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        (container,) = pod["containers"]
        mounted |= {(mount["mountPath"], mount.get("subPath")) for mount in container["volumeMounts"]
                    if mount["name"] in shared}
        assert shared and any(mount["name"] in shared for mount in container["volumeMounts"])
    assert len(mounted) == 1, mounted
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


@pytest.mark.parametrize("path", ["deploy/k8s/kustomization.yaml", "deploy/ray/raycluster.yaml"])
def test_readme_points_at_the_examples(path):
    """Guards README's Deploy section pointing at files that moved."""
    assert path.rsplit("/", 1)[0] in (REPO_ROOT / "README.md").read_text()
    assert (REPO_ROOT / path).is_file()


def test_worker_group_bounds_come_with_the_autoscaler_that_reads_them():
    """Guards a RayCluster whose worker group says `minReplicas` / `maxReplicas` (a walk-through read "one per grid
    cell") without `enableInTreeAutoscaling`: KubeRay then runs exactly `replicas` workers and the bounds do
    nothing. Bounds that differ from `replicas` need the autoscaler on, and room for a 3 x 3 sweep's runs and
    its driver (a Ray job holding a GPU of its own, README)."""
    cluster = one("RayCluster", DEPLOY / "ray")
    for group in cluster["spec"]["workerGroupSpecs"]:
        if {group.get("minReplicas", group["replicas"]), group.get("maxReplicas", group["replicas"])} != {group["replicas"]}:
            assert cluster["spec"].get("enableInTreeAutoscaling") is True
    assert sum(group.get("maxReplicas", group["replicas"]) for group in cluster["spec"]["workerGroupSpecs"]) >= 3 * 3 + 1


def _pinned_torch(requirements: list[str]) -> str:
    (torch_requirement,) = [item for item in requirements if re.match(r"torch\b(?![-_\w])", item)]
    assert re.fullmatch(r"torch==[\w.]+", torch_requirement), f"torch is not pinned: {torch_requirement}"
    return torch_requirement.split("==")[1]


def test_the_images_install_the_torch_the_tests_run_on():
    """Guards images that take whatever torch is newest on the day they are built (`torch>=2.5`): not the version
    tested, and replicas built on different days hold different versions, whose compile caches (keyed by
    torch's version) miss on each other. The bento's and the Ray image's torch are the one these tests run on."""
    import torch

    tested = torch.__version__.split("+")[0]
    bento = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    assert _pinned_torch(bento) == tested
    (install,) = [line for line in (DEPLOY / "ray" / "Dockerfile").read_text().splitlines() if line.startswith("RUN pip install")]
    assert _pinned_torch([word.strip("'\"") for word in install.split()]) == tested


def test_the_ray_image_leaves_what_a_clone_accumulates_out_of_its_build_context(tmp_path):
    """Guards `docker build -f deploy/ray/Dockerfile .` (which copies `.`) sending and baking in a clone's .venv
    (gigabytes with a CUDA torch), .git, runs and caches. A tree with what README's quick starts, the tests and
    the benches leave in a clone is read through .dockerignore by docker-py's implementation of Docker's rules:
    what `pip install -e .` needs stays in, the rest is out."""
    from docker.utils.build import exclude_paths

    kept = ["pyproject.toml", "README.md", "service.py", "slapgen/engine/generator.py", "slapgen/migrations/script.py.mako",
            "trainer/presets/conservative.yaml", "trainer/evaluate/run.py", "prompts/library.py"]
    left_out = [".git/HEAD", ".venv/lib/python3.11/site-packages/torch/__init__.py", "slapgen/__pycache__/video.cpython-311.pyc",
                "slapgen.egg-info/PKG-INFO", "runs/smoke/lora.safetensors", "training_logs/lr-rank/results.csv",
                "eval/smoke/videos/base/p000-s0.mp4", "demo/clip_000.mp4", "heldout/clips.csv", "adapters/v1.safetensors",
                "bench/results/runs/coldstart-cpu.json", "bench/gpu/wheels/bentoml.whl", ".pytest_cache/README.md",
                "curation/report.html", "slap.mp4", "shared/data/ratings.sqlite", "replica-a/task_result.db", "pg/data/PG_VERSION"]
    for name in kept + left_out:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sent = exclude_paths(str(tmp_path), patterns)
    assert set(kept) <= sent, set(kept) - sent
    assert not set(left_out) & sent, set(left_out) & sent


def test_replicas_wait_for_the_database_before_they_start(postgres_server):
    """Guards replicas crash-looping while PostgreSQL's StatefulSet starts beside them (a replica whose database
    does not answer at start-up exits with one sentence): an init container waits on the same Secret's
    SLAP_DATABASE_URL, with postgres.yaml's image. Its command, run here with Debian's pg_isready, ends at once
    against a PostgreSQL that answers (the URL as slapgen takes it, `+psycopg` and all) and keeps waiting
    against a port nothing listens on."""
    import shutil
    import subprocess

    from tests.conftest import free_port
    from tests.postgres import server_binaries

    pod = one("Deployment")["spec"]["template"]["spec"]
    (waiting,) = pod["initContainers"]
    assert environment(waiting)["SLAP_DATABASE_URL"] == environment(service_container())["SLAP_DATABASE_URL"]
    assert waiting["image"] == one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    command = waiting["command"]
    path = f"{server_binaries()}:{os.environ['PATH']}"
    assert shutil.which("pg_isready", path=path)
    up = postgres_server.url("postgres").replace("postgresql://", "postgresql+psycopg://")
    done = subprocess.run(command, env={**os.environ, "PATH": path, "SLAP_DATABASE_URL": up}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(command, env={**os.environ, "PATH": path,
                                     "SLAP_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/gone"},
                       capture_output=True, timeout=5)
