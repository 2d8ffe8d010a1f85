"""The deployment files, checked offline with real tools and against the service's own settings."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hcl2.api import loads as parse_hcl

from konnichiwa.routes import ROUTES
from konnichiwa.settings import VARIABLES, Settings
from tests.support import free_port, http_get

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ECS = DEPLOY / "terraform" / "ecs"
KUBERNETES = DEPLOY / "kubernetes"
TOOLS = Path(sys.executable).parent  # the `test` extra installs the linters beside Python
ROLES = ("api", "aux")
PORT = Settings().port
LIVENESS, READINESS = "/health", "/health/ready"
SECRETS = ("API_KEYS", "DATABASE_URL", "REDIS_URL")

# Settings a deployment does not set, and why; every other name in VARIABLES must be provided by
# compose, the ECS task definitions and the Kubernetes manifests.
NOT_DEPLOYED = {
    "API_KEY": "the one-key shorthand; deployments pass API_KEYS so keys can be rotated",
    "API_KEY_SECRET_ID": "another key source; platforms inject API_KEYS from their secret store",
    "AWS_ENDPOINT_URL": "an AWS emulator: compose sets it, on AWS it must stay unset",
    "KONNICHIWA_STATE_DIR": "the embedded dev stack's data; the image sets it to its volume",
    **dict.fromkeys(
        ("HEADER_TIMEOUT_SECONDS", "BODY_TIMEOUT_SECONDS", "KEEPALIVE_SECONDS", "MAX_CONNECTIONS"),
        "slow-client tuning whose defaults suit an ALB, nginx or ingress in front",
    ),
}
DEPLOYED = sorted(set(VARIABLES) - NOT_DEPLOYED.keys())


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


# --- Reading the files --------------------------------------------------------------------------


def unwrap(value: Any) -> Any:
    """python-hcl2 (checkov's fork here) wraps blocks and attribute values in one-element lists."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        return {key: unwrap(item) for key, item in value.items()}
    return value


def terraform_module(directory: Path) -> list[dict[str, Any]]:
    return [parse_hcl(path.read_text()) for path in sorted(directory.glob("*.tf"))]


def terraform_locals(directory: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for parsed in terraform_module(directory):
        for block in parsed.get("locals", []):
            found.update(unwrap(block))
    return found


def terraform_blocks(directory: Path, kind: str, type_: str) -> dict[str, Any]:
    """Every `kind "type_" "name" {...}` block of a module, by name."""
    return {
        name: unwrap(body)
        for parsed in terraform_module(directory)
        for block in parsed.get(kind, [])
        for name, body in block.get(type_, {}).items()
    }


def jsonencoded(expression: str) -> Any:
    """The value inside a `jsonencode(...)` attribute, as python-hcl2 renders it."""
    prefix, suffix = "${jsonencode(", ")}"
    assert expression.startswith(prefix), expression
    assert expression.endswith(suffix), expression
    return ast.literal_eval(expression[len(prefix) : -len(suffix)])


def ecs_container() -> dict[str, Any]:
    (task,) = terraform_blocks(ECS, "resource", "aws_ecs_task_definition").values()
    (definition,) = jsonencoded(task["container_definitions"])
    assert isinstance(definition, dict)
    return definition


def manifests() -> list[Path]:
    return sorted(KUBERNETES.glob("*.yaml"))


def kubernetes_objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_object(role: str, kind: str) -> dict[str, Any]:
    (found,) = (o for o in kubernetes_objects(KUBERNETES / f"{role}.yaml") if o["kind"] == kind)
    return found


def container(role: str) -> dict[str, Any]:
    (found,) = kubernetes_object(role, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def config_map() -> dict[str, str]:
    (found,) = kubernetes_objects(KUBERNETES / "configmap.yaml")
    data: dict[str, str] = found["data"]
    return data


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(pair.partition("=")[::2] for pair in args.split())
    return env


def nginx_conf() -> str:
    return (DEPLOY / "nginx" / "konnichiwa.conf").read_text()


# --- The tools ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkov(checkov_binary: Path) -> dict[str, dict[str, Any]]:
    """One checkov run over the repository (Terraform, Kubernetes, Dockerfile), by framework."""
    result = run(
        checkov_binary, "--directory", ".", "--skip-path", ".venv", "--skip-path", "tests",
        "--framework", "terraform", "kubernetes", "dockerfile",
        "--output", "json", "--compact", "--skip-download",
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    return {report["check_type"]: report for report in reports}


@pytest.mark.slow
def test_terraform_is_formatted(terraform: Path) -> None:
    result = run(terraform, "fmt", "-check", "-recursive", "-diff", DEPLOY / "terraform")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.glob("terraform/**/*.tf")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_terraform_parses(path: Path) -> None:
    assert parse_hcl(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("framework", "files"),
    [
        ("terraform", {"/deploy/terraform/ecs/ecs.tf", "/deploy/terraform/single-host/main.tf"}),
        ("kubernetes", {f"/deploy/kubernetes/{role}.yaml" for role in ROLES}),
        ("dockerfile", {"/Dockerfile"}),
    ],
)
def test_checkov_finds_nothing_unexplained(
    checkov: dict[str, dict[str, Any]], framework: str, files: set[str]
) -> None:
    report = checkov[framework]
    results = report["results"]
    checked = {c["file_path"] for c in results["passed_checks"] + results["skipped_checks"]}
    assert files <= checked
    assert report["summary"]["parsing_errors"] == 0
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results["failed_checks"]]
    assert failed == []
    unexplained = [
        (c["check_id"], c["resource"])
        for c in results["skipped_checks"]
        if len(c["check_result"].get("suppress_comment", "").split()) < 3
    ]
    assert unexplained == []


def test_dockerfile_passes_hadolint() -> None:
    result = run(TOOLS / "hadolint", "--failure-threshold", "warning", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    result = run(TOOLS / "kubernetes-validate", "--strict", "--quiet", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_passes_yamllint() -> None:
    result = run(TOOLS / "yamllint", "--strict", ".")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Every setting the service needs is provided everywhere -------------------------------------


def compose_environment(role: str) -> dict[str, str]:
    environment: dict[str, str] = compose()["services"][role]["environment"]
    return environment


def ecs_environment(role: str) -> tuple[dict[str, str], set[str]]:
    """The plain variables and the names of the secrets of a role's task definition."""
    found = terraform_locals(ECS)
    plain = found["task_environment"] | found["role_environment"][role]
    return plain, set(found["secret_values"])


def kubernetes_environment(role: str) -> tuple[dict[str, str], set[str]]:
    """The plain variables (ConfigMap and literal values) and the secret references of a role."""
    env = container(role)["env"]
    assert container(role)["envFrom"] == [{"configMapRef": {"name": "konnichiwa-config"}}]
    plain = config_map() | {item["name"]: item["value"] for item in env if "value" in item}
    secrets = {item["name"] for item in env if "secretKeyRef" in item.get("valueFrom", {})}
    return plain, secrets


def assert_provided(names: Iterable[str]) -> None:
    missing = sorted(set(DEPLOYED) - set(names))
    assert missing == [], "set these, or list them in NOT_DEPLOYED with the reason"


@pytest.mark.parametrize("role", ROLES)
def test_compose_provides_every_setting(role: str) -> None:
    environment = compose_environment(role)
    assert_provided(environment.keys())
    assert environment["SERVICE_NAME"] == role
    assert environment["AWS_ENDPOINT_URL"] == "http://aws:5000"
    assert "aws" in compose()["services"]
    assert "moto" in compose()["services"]["aws"]["image"]


@pytest.mark.parametrize(
    "environment", [ecs_environment, kubernetes_environment], ids=["ecs", "kubernetes"]
)
@pytest.mark.parametrize("role", ROLES)
def test_platform_provides_every_setting(
    role: str, environment: Callable[[str], tuple[dict[str, str], set[str]]]
) -> None:
    plain, secrets = environment(role)
    assert_provided(plain.keys() | secrets)
    assert secrets == set(SECRETS)
    assert not secrets & set(plain), "a secret must never be a plain variable"
    assert plain["SERVICE_NAME"] == role
    assert plain["SSM_PREFIX"].endswith(f"/{role}/")
    assert "AWS_ENDPOINT_URL" not in plain


def test_ecs_task_definition_uses_the_checked_settings() -> None:
    definition = ecs_container()
    assert (
        "merge(local.task_environment,local.role_environment[each.key])"
        in definition["environment"]
    )
    assert "in aws_secretsmanager_secret.service" in definition["secrets"]
    assert "${secret.arn}" in definition["secrets"]
    (task,) = terraform_blocks(ECS, "resource", "aws_ecs_task_definition").values()
    assert task["execution_role_arn"] != task["task_role_arn"]
    secrets = terraform_blocks(ECS, "resource", "aws_secretsmanager_secret")["service"]
    assert secrets["for_each"] == "${local.secret_values}"


def test_not_deployed_settings_exist() -> None:
    assert set(NOT_DEPLOYED) <= set(VARIABLES)


# --- Ports and health paths agree everywhere ---------------------------------------------------


def test_health_paths_are_the_service_routes() -> None:
    assert {LIVENESS, READINESS} <= {route.path for route in ROUTES if route.method == "GET"}


def test_dockerfile_port_and_healthcheck() -> None:
    instructions = dict(dockerfile_instructions())
    assert instructions["EXPOSE"] == str(PORT)
    assert dockerfile_env()["PORT"] == str(PORT)
    healthcheck = instructions["HEALTHCHECK"]
    assert f"'{LIVENESS}'" in healthcheck
    assert f"os.environ.get('PORT', '{PORT}')" in healthcheck


@pytest.mark.parametrize("role", ROLES)
def test_compose_port(role: str) -> None:
    assert compose_environment(role)["PORT"] == str(PORT)
    assert all(m.endswith(f":{PORT}") for m in compose()["services"][role]["ports"])


def test_ecs_port_and_health_checks() -> None:
    found = terraform_locals(ECS)
    assert found["container_port"] == PORT
    assert found["health_path"] == READINESS
    assert found["task_environment"]["PORT"] == "${tostring(local.container_port)}"
    (group,) = terraform_blocks(ECS, "resource", "aws_lb_target_group").values()
    assert group["port"] == "${local.container_port}"
    assert group["health_check"]["path"] == "${local.health_path}"
    assert group["health_check"]["port"] == "traffic-port"
    definition = ecs_container()
    assert definition["portMappings"] == [
        {"containerPort": "${local.container_port}", "protocol": "tcp"}
    ]
    assert (
        f"127.0.0.1:${{local.container_port}}{LIVENESS}'"
        in definition["healthCheck"]["command"][-1]
    )
    (service,) = terraform_blocks(ECS, "resource", "aws_ecs_service").values()
    assert service["load_balancer"]["container_port"] == "${local.container_port}"


@pytest.mark.parametrize("role", ROLES)
def test_kubernetes_port_and_probes(role: str) -> None:
    spec = container(role)
    assert spec["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    assert config_map()["PORT"] == str(PORT)
    probes = {name: spec[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes == {
        "livenessProbe": {"path": LIVENESS, "port": "http"},
        "readinessProbe": {"path": READINESS, "port": "http"},
    }
    (port,) = kubernetes_object(role, "Service")["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_ingress_checks_readiness_and_reaches_both_roles() -> None:
    (ingress,) = kubernetes_objects(KUBERNETES / "ingress.yaml")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == READINESS
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [{"name": f"konnichiwa-{role}", "port": {"name": "http"}} for role in ROLES]


def test_ingress_alb_takes_the_terraform_web_acl() -> None:
    (ingress,) = kubernetes_objects(KUBERNETES / "ingress.yaml")
    arn = ingress["metadata"]["annotations"]["alb.ingress.kubernetes.io/wafv2-acl-arn"]
    variables = dict(terraform_variables(ECS))
    region, environment = variables["region"]["default"], variables["environment"]["default"]
    assert re.fullmatch(
        rf"arn:aws:wafv2:{region}:\d{{12}}:regional/webacl/konnichiwa-{environment}/[\w-]+", arn
    )
    outputs = {
        name: unwrap(body)
        for parsed in terraform_module(ECS)
        for block in parsed.get("output", [])
        for name, body in block.items()
    }
    assert outputs["waf_web_acl_arn"]["value"] == "${aws_wafv2_web_acl.main.arn}"


def test_nginx_proxies_to_the_service_port() -> None:
    assert re.search(rf"upstream konnichiwa_api \{{\s*server api:{PORT};", nginx_conf())


# --- Least privilege: aux never gets S3 ---------------------------------------------------------


def iam_actions(role: str) -> set[str]:
    statements = terraform_locals(ECS)["task_role_statements"][role]
    return {action for statement in statements for action in statement["Action"]}


def test_only_the_api_role_may_list_buckets() -> None:
    assert "s3:ListAllMyBuckets" in iam_actions("api")
    assert not {a for a in iam_actions("aux") if a.lower().startswith("s3")}
    assert {a.split(":")[0] for a in iam_actions("aux")} == {"ssm", "kms"}


def test_task_and_irsa_roles_take_the_role_statements() -> None:
    for policy_type in ("task", "irsa"):
        policy = terraform_blocks(ECS, "resource", "aws_iam_role_policy")[policy_type]
        assert jsonencoded(policy["policy"])["Statement"] == "${each.value}"
    assert terraform_locals(ECS)["irsa_roles"].endswith(": local.task_role_statements}")


@pytest.mark.parametrize("role", ROLES)
def test_service_accounts_use_their_own_irsa_role(role: str) -> None:
    account = kubernetes_object(role, "ServiceAccount")
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert arn.endswith(f":role/konnichiwa-prod-{role}-irsa")
    pod = kubernetes_object(role, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_aux_manifests_mention_no_s3() -> None:
    assert "s3" not in (KUBERNETES / "aux.yaml").read_text().lower()


# --- What the issue asks of each file -----------------------------------------------------------


def test_image_is_multi_stage_non_root_and_read_only_friendly() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    python_bases = [base for base in bases if base.startswith("python:")]
    assert len(python_bases) >= 2
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base) for base in python_bases)
    values = dict(instructions)
    assert values["ARG"] == "SERVICE=api"
    assert dockerfile_env()["SERVICE_NAME"] == "${SERVICE}"
    assert values["USER"] == "10001:10001"
    assert json.loads(values["CMD"]) == ["konnichiwa", "serve"]
    state_dir = dockerfile_env()["KONNICHIWA_STATE_DIR"]
    assert set(json.loads(values["VOLUME"])) == {state_dir, "/tmp"}  # noqa: S108  (the path the image declares)
    ignored = [
        line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] != "#"
    ]
    assert ignored[0] == "*", "the build context admits only what is listed"


def test_read_only_root_gets_writable_volumes_everywhere() -> None:
    writable = {dockerfile_env()["KONNICHIWA_STATE_DIR"], "/tmp"}  # noqa: S108
    for role in ROLES:
        spec = container(role)
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert {mount["mountPath"] for mount in spec["volumeMounts"]} == writable
        assert compose()["services"][role]["read_only"] is True
    definition = ecs_container()
    assert definition["readonlyRootFilesystem"] is True
    assert {mount["containerPath"] for mount in definition["mountPoints"]} == writable


@pytest.mark.parametrize("role", ROLES)
def test_pods_meet_the_restricted_standard(role: str) -> None:
    pod = kubernetes_object(role, "Deployment")["spec"]["template"]["spec"]
    context = container(role)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container(role)["resources"]["limits"]
    assert kubernetes_object(role, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
    assert kubernetes_object(role, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    namespace = kubernetes_objects(KUBERNETES / "namespace.yaml")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_compose_stack() -> None:
    services = compose()["services"]
    assert "--appendonly" in services["redis"]["command"]
    for store in ("redis", "postgres"):
        assert services[store]["healthcheck"]["test"]
        assert services[store]["volumes"]
    for role in ROLES:
        conditions = {dep["condition"] for dep in services[role]["depends_on"].values()}
        assert conditions == {"service_healthy"}
        assert services[role]["build"]["args"] == {"SERVICE": role}
    assert (
        "./deploy/nginx/konnichiwa.conf:/etc/nginx/conf.d/default.conf:ro"
        in services["nginx"]["volumes"]
    )
    load = {name for name, service in services.items() if service.get("profiles") == ["load"]}
    assert load == {"locust-master", "locust-worker"}


def test_load_test_image_runs_the_locustfile() -> None:
    assert (
        'ENTRYPOINT ["locust", "-f", "loadtests/locustfile.py"]'
        in (ROOT / "Dockerfile").read_text()
    )
    assert "locust>=" in (ROOT / "pyproject.toml").read_text()
    deployments = [
        o for o in kubernetes_objects(KUBERNETES / "locust.yaml") if o["kind"] == "Deployment"
    ]
    assert {d["metadata"]["name"] for d in deployments} == {"locust-master", "locust-worker"}


@pytest.mark.parametrize(
    "directive",
    [
        "server_tokens off;",
        "keepalive 32;",
        "client_header_timeout 10s;",
        "client_body_timeout 10s;",
        f"client_max_body_size {Settings().max_body_bytes // 1024}k;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Request-ID $konnichiwa_request_id;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "limit_req_zone $konnichiwa_limited_client zone=konnichiwa_requests:10m rate=500r/s;",
        "limit_req zone=konnichiwa_requests burst=1000 nodelay;",
        "limit_req_status 429;",
        "limit_conn_zone $konnichiwa_limited_client zone=konnichiwa_connections:10m;",
        "limit_conn konnichiwa_connections 100;",
        "limit_conn_status 429;",
    ],
)
def test_nginx_directive(directive: str) -> None:
    assert directive in nginx_conf()


def test_nginx_limits_each_client_address_but_not_the_health_checks() -> None:
    (body,) = re.findall(r"map \$uri \$konnichiwa_limited_client \{([^}]*)\}", nginx_conf())
    keys = dict(re.findall(r"^\s*(\S+)\s+(\S+);", body, re.MULTILINE))
    # nginx counts no request whose key is empty.
    assert keys == {LIVENESS: '""', READINESS: '""', "default": "$binary_remote_addr"}


def nginx_prefix(directory: Path, port: int, **replacements: str) -> list[str]:
    """nginx's options to run deploy/nginx's config from `directory`, listening on `port`, with
    each `replacements` key replaced once; nginx itself answers 200 for the service (compose's
    `api` host does not resolve here)."""
    upstream = free_port()
    text = nginx_conf()
    for old, new in {
        "listen 8080;": f"listen 127.0.0.1:{port};",
        f"server api:{PORT};": f"server 127.0.0.1:{upstream};",
        **replacements,
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (directory / "konnichiwa.conf").write_text(text)
    (directory / "nginx.conf").write_text(
        f"pid {directory}/nginx.pid;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        f'    server {{ listen 127.0.0.1:{upstream}; return 200 "ok"; }}\n'
        f"    include {directory}/konnichiwa.conf;\n"
        "}\n"
    )
    # A log file, not stderr: the daemon would hold the caller's pipe open.
    error_log = str(directory / "error.log")
    return ["-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", error_log]


@pytest.mark.slow
def test_nginx_accepts_the_config(nginx: Path, tmp_path: Path) -> None:
    result = run(nginx, "-t", *nginx_prefix(tmp_path, free_port()))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.slow
def test_nginx_answers_429_past_the_burst_but_never_to_health_checks(
    nginx: Path, tmp_path: Path
) -> None:
    port = free_port()
    # A rate nothing refills within the test and a burst of 2: the third request is the last.
    options = nginx_prefix(tmp_path, port, **{"rate=500r/s": "rate=1r/m", "burst=1000": "burst=2"})
    started = run(nginx, *options)  # returns once the daemon listens
    assert started.returncode == 0, started.stderr
    try:
        front = f"http://127.0.0.1:{port}"
        assert [http_get(front + "/status")[0] for _ in range(5)] == [200, 200, 200, 429, 429]
        assert [http_get(front + path)[0] for path in (LIVENESS, READINESS) * 5] == [200] * 10
        assert http_get(front + "/")[0] == 429, "another path, the same client: still limited"
    finally:
        run(nginx, *options, "-s", "stop")


def terraform_variables(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for parsed in terraform_module(directory):
        for block in parsed.get("variable", []):
            yield from unwrap(block).items()


@pytest.mark.parametrize("module", ["ecs", "single-host"])
def test_terraform_variables_are_typed_described_and_validated(module: str) -> None:
    directory = DEPLOY / "terraform" / module
    variables = dict(terraform_variables(directory))
    untyped = [
        name
        for name, body in variables.items()
        if not {"type", "description", "validation"} <= set(body)
    ]
    assert untyped == []
    assert variables["region"]["default"] == "ap-northeast-1"
    example = (directory / "terraform.tfvars.example").read_text()
    given = set(re.findall(r"^(\w+)\s*=", example, re.MULTILINE))
    required = {name for name, body in variables.items() if "default" not in body}
    assert required <= given <= set(variables)


def test_waf_limits_each_client_address_in_front_of_the_alb() -> None:
    acl = terraform_blocks(ECS, "resource", "aws_wafv2_web_acl")["main"]
    assert (acl["scope"], acl["default_action"]) == ("REGIONAL", {"allow": {}})
    rule = acl["rule"]
    assert rule["action"]["block"]["custom_response"]["response_code"] == 429
    rate = rule["statement"]["rate_based_statement"]
    assert rate["aggregate_key_type"] == "IP"
    assert (rate["limit"], rate["evaluation_window_sec"]) == ("${var.waf_requests_per_minute}", 60)
    # The scope-down statement counts every request but those this pattern matches.
    uncounted = rate["scope_down_statement"]["not_statement"]["statement"]["regex_match_statement"]
    assert uncounted["field_to_match"] == {"uri_path": {}}
    matched = [p for p in (LIVENESS, READINESS, "/", "/status", "/healthz", "/health/x")
               if re.search(uncounted["regex_string"], p)]  # fmt: skip
    assert matched == [LIVENESS, READINESS]
    (association,) = terraform_blocks(ECS, "resource", "aws_wafv2_web_acl_association").values()
    assert association["resource_arn"] == "${aws_lb.main.arn}"
    assert association["web_acl_arn"] == "${aws_wafv2_web_acl.main.arn}"
    variables = dict(terraform_variables(ECS))
    assert variables["waf_requests_per_minute"]["default"] == 12000  # 200 r/s, coarse


def test_subnets_take_zones_pinned_by_id() -> None:
    zones = terraform_blocks(ECS, "data", "aws_availability_zones")["available"]
    assert zones["filter"] == {"name": "zone-id", "values": "${var.availability_zone_ids}"}
    assert terraform_locals(ECS)["azs"] == "${data.aws_availability_zones.available.names}"
    variables = dict(terraform_variables(ECS))
    assert variables["region"]["default"] == "ap-northeast-1"
    assert variables["availability_zone_ids"]["default"] == ["apne1-az1", "apne1-az2", "apne1-az4"]
    subnets = terraform_blocks(ECS, "resource", "aws_subnet")
    assert {subnet["count"] for subnet in subnets.values()} == {3}


def test_ecs_scaling_and_alarms() -> None:
    found = terraform_locals(ECS)
    assert "70]" in found["scaling_targets"]
    assert "75]" in found["scaling_targets"]
    alarm = terraform_blocks(ECS, "resource", "aws_cloudwatch_metric_alarm")["utilization"]
    assert alarm["metric_name"] == "${each.value.metric}"
    assert found["utilization_levels"]["cpu-high"]["threshold"] == 70
    variables = dict(terraform_variables(ECS))
    assert (variables["desired_count"]["default"], variables["task_cpu"]["default"]) == (2, 1024)
    assert variables["task_memory"]["default"] == 2048


def test_single_host_admits_only_the_deployer() -> None:
    directory = DEPLOY / "terraform" / "single-host"
    (rule,) = terraform_blocks(
        directory, "resource", "aws_vpc_security_group_ingress_rule"
    ).values()
    assert rule["cidr_ipv4"] == "${var.deployer_cidr}"
    modules = terraform_module(directory)
    outputs = {name for parsed in modules for block in parsed.get("output", []) for name in block}
    assert {"url", "aux_url"} <= outputs


def test_workflow_tests_everything_and_deploys_main_with_oidc() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert set(workflow[True]) == {"push", "pull_request"}  # YAML 1.1 reads the key `on` as true
    assert workflow["permissions"] == {"contents": "read"}
    test_steps = workflow["jobs"]["test"]["steps"]
    assert any(step.get("run") == "bash .ci/run" for step in test_steps)
    deploy = workflow["jobs"]["deploy"]
    assert "refs/heads/main" in deploy["if"]
    assert deploy["permissions"]["id-token"] == "write"
    (credentials,) = [
        s for s in deploy["steps"] if "configure-aws-credentials" in s.get("uses", "")
    ]
    assert set(credentials["with"]) == {"role-to-assume", "aws-region"}
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "aws-access-key-id" not in text
    assert "secrets." not in text


def test_workflow_matches_what_terraform_creates() -> None:
    deploy = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())["jobs"][
        "deploy"
    ]
    # A job `environment` would make the OIDC subject environment-based, not the branch trusted.
    assert "environment" not in deploy
    trust = jsonencoded(
        terraform_blocks(ECS, "resource", "aws_iam_role")["deploy"]["assume_role_policy"]
    )
    (statement,) = trust["Statement"]
    subject = statement["Condition"]["StringEquals"]["token.actions.githubusercontent.com:sub"]
    assert subject == "repo:${var.github_repository}:ref:refs/heads/main"
    variables = dict(terraform_variables(ECS))
    assert deploy["env"]["AWS_REGION"] == variables["region"]["default"]
    assert deploy["env"]["CLUSTER"] == f"konnichiwa-{variables['environment']['default']}"
    assert terraform_locals(ECS)["name"] == "konnichiwa-${var.environment}"
    repository = terraform_blocks(ECS, "resource", "aws_ecr_repository")["service"]["name"]
    (build,) = [s for s in deploy["steps"] if "build-push-action" in s.get("uses", "")]
    assert build["with"]["tags"].endswith(f"/{repository}:${{{{ env.IMAGE_TAG }}}}")
    assert build["with"]["target"] == "service"


# --- Monitoring: the compose profile and CloudWatch's share of the alerts -----------------------

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
# Each CloudWatch alarm level (deploy/terraform/ecs/alarms.tf) and the alert it stands for on AWS.
CLOUDWATCH_TWINS = {
    "cpu-high": "KonnichiwaCpuHigh",
    "cpu-critical": "KonnichiwaCpuCritical",
    "memory-high": "KonnichiwaMemoryHigh",
    "memory-critical": "KonnichiwaMemoryCritical",
    "server-errors": "KonnichiwaServerErrors",
    "server-errors-critical": "KonnichiwaServerErrorsCritical",
}


def prometheus_alerts() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def alert_level(rule: dict[str, Any]) -> tuple[float, int]:
    """An alert's threshold (the number its expression compares with) and its `for` minutes."""
    found = re.fullmatch(r"[\w:]+ > ([\d.]+)", rule["expr"].strip())
    assert found, rule["expr"]
    return float(found[1]), int(rule.get("for", "0m").removesuffix("m"))


def test_cloudwatch_alarms_have_the_levels_of_the_prometheus_alerts() -> None:
    found = terraform_locals(ECS)
    levels = found["utilization_levels"] | found["server_error_levels"]
    assert set(levels) == set(CLOUDWATCH_TWINS)
    alerts = prometheus_alerts()
    for name, alert in CLOUDWATCH_TWINS.items():
        threshold, minutes = alert_level(alerts[alert])
        level = levels[name]
        alarm_threshold = level["threshold"] if "threshold" in level else level["percent"] / 100
        assert (alarm_threshold, level["minutes"]) == (threshold, minutes), name


def test_cloudwatch_watches_the_objective_and_the_tasks_health() -> None:
    levels = terraform_locals(ECS)["target_levels"]
    latency = levels["latency"]
    assert (latency["metric"], latency["statistic"], latency["threshold"]) == (
        "TargetResponseTime",
        "p95",
        0.3,
    )
    assert 'le="0.3"' in (PROMETHEUS / "rules" / "recording.yml").read_text()
    health = {name: levels[name]["metric"] for name in ("unhealthy-tasks", "no-healthy-task")}
    assert health == {
        "unhealthy-tasks": "UnHealthyHostCount",
        "no-healthy-task": "HealthyHostCount",
    }
    alarms = terraform_blocks(ECS, "resource", "aws_cloudwatch_metric_alarm")
    for name in ("utilization", "server_errors", "target"):
        assert alarms[name]["alarm_actions"] == "${local.alarm_actions}", name
    share = alarms["server_errors"]
    assert share["metric_query"]["expression"] == "100 * FILL(errors, 0) / requests"
    counts = share["dynamic"]["metric_query"]
    assert counts["for_each"] == {"errors": "HTTPCode_Target_5XX_Count", "requests": "RequestCount"}


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts: source in the repository -> path in the container."""
    return dict(volume.split(":")[:2] for volume in service["volumes"] if volume.startswith("./"))


def test_compose_monitoring_profile_scrapes_both_roles() -> None:
    services = compose()["services"]
    monitoring = {name for name, service in services.items()
                  if service.get("profiles") == ["monitoring"]}  # fmt: skip
    assert monitoring == {"prometheus", "grafana"}
    prometheus = services["prometheus"]
    assert volume_targets(prometheus) == {"./deploy/prometheus": "/etc/prometheus"}
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"].startswith("konnichiwa")  # the alerts match up{job=~"konnichiwa.*"}
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"{role}:{PORT}" for role in ROLES]}]
    # The key Prometheus presents is the stack's own, as a file compose mounts.
    (key,) = prometheus["configs"]
    assert key["target"] == job["authorization"]["credentials_file"]
    assert compose()["configs"][key["source"]]["content"] == compose()["x-api-key"]
    assert set(prometheus["depends_on"]) == set(ROLES)


def test_compose_monitoring_profile_provisions_grafana() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = volume_targets(grafana)
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = GRAFANA / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "konnichiwa.yml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (GRAFANA / "dashboards" / home.name).is_file()
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert "9090:9090" in services["prometheus"]["ports"]
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
