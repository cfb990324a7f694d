"""deploy/: the compose file, the Dockerfiles, the systemd units and the deployment guide, checked without a
Docker engine.

Every ``cmoe-*`` command line they contain is parsed by the real command-line interface (the click command
behind each Typer app), so an option that is renamed, removed or made required breaks this file rather than a
deployment. The security-relevant structure is asserted directly: the SuperLink listens on loopback, the proxy
shares the server's network namespace and renders the lead's nginx template, and the fleet port is the only
port published beyond loopback. When ``docker-compose`` and ``systemd-analyze`` are installed (CI installs them:
``apt-get install -y --no-install-recommends docker-compose systemd``), the files also go through them.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import typer
import typer.main
import yaml

from server.cli import LOOPBACK
from server.config import resolve_configs

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_ENV = DEPLOY / "compose.env.example"
TEMPLATE = DEPLOY / "nginx" / "cmoe-fleet.conf.template"
GUIDE = DEPLOY / "README.md"
SYSTEMD = DEPLOY / "systemd"
CLIENT_UNIT = SYSTEMD / "cmoe-client@.service"
SERVER_UNIT = SYSTEMD / "cmoe-server.service"
UNIT_ENV = {CLIENT_UNIT: SYSTEMD / "site.env.example", SERVER_UNIT: SYSTEMD / "server.env.example"}
SITE = "A"  # the instance name the client unit is checked with


# ----------------------------------------------------------------------------------------------------------------
# Reading the files


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose .env and systemd EnvironmentFile syntax, as used here: no quotes, no export)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        present = name in env and (env[name] != "" or operator not in (":-", ":?"))
        if present:
            return env[name]
        if operator in (":?", "?"):
            raise KeyError(f"compose needs {name}: {argument}")
        return argument if operator in (":-", "-") else ""

    return COMPOSE_VARIABLE.sub(value, text)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string of a parsed compose file, as compose does (after parsing, values only)."""
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_all(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    """Every string value of a parsed YAML document (not its keys, not its comments)."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings(value)]
    return [node] if isinstance(node, str) else []


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose() -> dict:
    """compose.yaml with the variables of compose.env.example filled in."""
    return interpolate_all(raw_compose(), read_env_file(COMPOSE_ENV))


def service_command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each short-syntax volume."""
    result = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        result[target] = source
    return result


def mounted_from(service: dict, path: str) -> str | None:
    """The container mount point under which ``path`` lies, or None."""
    for target in mounts(service):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target
    return None


def published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host IP or '' for all interfaces, published port, container port) of each short-syntax port."""
    result = []
    for port in service.get("ports", []):
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 3:
            result.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            result.append(("", parts[0], parts[1]))
        else:
            result.append(("", parts[0], parts[0]))
    return result


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit: section -> [(key, value)] in order, repeated keys kept (configparser would merge them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for line in path.read_text().splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            current = stripped.strip("[]")
            sections.setdefault(current, [])
            continue
        key, sep, value = stripped.partition("=")
        assert sep and current, f"{path}: cannot parse {stripped!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict, section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def unit_value(unit: dict, section: str, key: str) -> str | None:
    values = unit_values(unit, section, key)
    return values[-1] if values else None


def unit_environment(path: Path) -> dict[str, str]:
    """What the service sees: Environment= assignments, then the example EnvironmentFile (which overrides them)."""
    unit = read_unit(path)
    env: dict[str, str] = {}
    for line in unit_values(unit, "Service", "Environment"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    env.update(read_env_file(UNIT_ENV[path]))
    return env


def unit_name(path: Path) -> str:
    return path.name.replace("@.", f"@{SITE}.")


def expand_exec(path: Path) -> list[str]:
    """ExecStart as systemd runs it: specifiers %i, %d, %% resolved; ${VAR} one word, $VAR split on whitespace."""
    unit = read_unit(path)
    specifiers = {"%i": SITE, "%d": f"/run/credentials/{unit_name(path)}", "%%": "%"}
    line = re.sub(r"%[a-zA-Z%]", lambda m: specifiers[m.group(0)], unit_value(unit, "Service", "ExecStart"))
    env = unit_environment(path)
    words = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words += env[whole.group(1)].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def compose_builds() -> list[tuple[str, Path, Path]]:
    """(service, build context, Dockerfile) of every service compose builds."""
    builds = []
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            builds.append((name, context, context / build.get("dockerfile", "Dockerfile")))
    return builds


def unique_builds() -> list[tuple[Path, Path]]:
    """(build context, Dockerfile) of compose_builds(), each Dockerfile once (the example sites share one)."""
    return sorted({(context, dockerfile) for _, context, dockerfile in compose_builds()})


# ----------------------------------------------------------------------------------------------------------------
# The real command-line interfaces


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def click_command(script: str) -> click.Command:
    """The click command behind a console script: the one Typer app of the module its entry point lives in."""
    module = importlib.import_module(console_scripts()[script].split(":")[0])
    apps = [value for value in vars(module).values() if isinstance(value, typer.Typer)]
    assert len(apps) == 1, f"{script}: expected one Typer app in {module.__name__}, found {len(apps)}"
    return typer.main.get_command(apps[0])


def parse_command_line(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``argv`` with the real CLI, without running it: (subcommand or '', parameters). Raises on any error."""
    script, args = Path(argv[0]).name, argv[1:]
    command = click_command(script)
    subcommand = ""
    if isinstance(command, click.Group):
        subcommand, args = args[0], args[1:]
        assert subcommand in command.commands, f"{script} has no subcommand {subcommand!r}"
        command = command.commands[subcommand]
    try:
        context = command.make_context(f"{script} {subcommand}".strip(), list(args))
    except click.exceptions.Exit as stop:  # --help
        assert stop.exit_code == 0
        return subcommand, {}
    except click.ClickException as error:
        raise AssertionError(f"{shlex.join(argv)}: {error.format_message()}") from None
    return subcommand, context.params


def is_cmoe(word: str) -> bool:
    return Path(word).name in console_scripts()


SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def guide_command_lines() -> list[list[str]]:
    """Every cmoe-* invocation in the guide's code blocks (continuations joined, up to a shell operator)."""
    lines = []
    for info, block in re.findall(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```", GUIDE.read_text(), flags=re.M | re.S):
        if info.strip() == "text":
            continue  # a diagram
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            starts = [i for i, word in enumerate(words) if is_cmoe(word)]
            for start in starts[-1:]:  # `docker run ... image cmoe-client ...`: the last one is the program
                end = next((i for i in range(start, len(words)) if words[i] in SHELL_OPERATORS), len(words))
                lines.append(words[start:end])
    return lines


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every cmoe-* command line in compose.yaml, the Dockerfiles, the units and the guide."""
    found = []
    for name, service in compose()["services"].items():
        argv = service_command(service)
        if argv and is_cmoe(argv[0]):
            found.append((f"compose:{name}", argv))
    for _, dockerfile in unique_builds():
        for keyword, arguments in dockerfile_instructions(dockerfile):
            if keyword in ("CMD", "ENTRYPOINT") and arguments.startswith("["):
                argv = yaml.safe_load(arguments)  # the JSON form
                if is_cmoe(argv[0]):
                    found.append((f"{dockerfile.name}:{keyword}", argv))
    for unit in (CLIENT_UNIT, SERVER_UNIT):
        found.append((f"systemd:{unit.name}", expand_exec(unit)))
    found += [(f"guide:{argv[0]}", argv) for argv in guide_command_lines()]
    return found


# ----------------------------------------------------------------------------------------------------------------
# Command lines


def test_command_lines_are_found_in_every_file() -> None:
    places = {(where.split(":")[0], Path(argv[0]).name) for where, argv in command_lines()}
    expected = {("compose", "cmoe-server"), ("compose", "cmoe-client"), ("systemd", "cmoe-server"),
                ("systemd", "cmoe-client"), ("server.Dockerfile", "cmoe-server"),
                ("client.Dockerfile", "cmoe-client"), ("guide", "cmoe-certs"), ("guide", "cmoe-client")}
    assert expected <= places, f"missing: {sorted(expected - places)}"


@pytest.mark.parametrize(("where", "argv"), command_lines(), ids=[where for where, _ in command_lines()])
def test_command_line_is_accepted_by_the_real_cli(where: str, argv: list[str]) -> None:
    _, params = parse_command_line(argv)
    if Path(argv[0]).name == "cmoe-server" and params:
        # --set keys are checked by cmoe-server before anything starts; an unknown key would stop the job.
        resolve_configs(None, list(params["overrides"] or []),
                        {"rounds": params["rounds"], "min_sites": params["min_sites"],
                         "aggregation": params["aggregation"]})


def test_a_wrong_option_is_caught() -> None:
    """The check above can fail: a misspelt option, a missing required one and a bad value are all refused."""
    good = ["cmoe-server", "--rounds", "2", "--min-sites", "1", "--listen", "127.0.0.1:9091"]
    parse_command_line(good)
    misspelt = good + ["--tracking_uri", "http://mlflow:5000"]
    without_rounds = good[:1] + good[3:]
    zero_rounds = ["cmoe-server", "--rounds", "0", "--min-sites", "1"]
    for bad in (misspelt, without_rounds, zero_rounds):
        with pytest.raises(AssertionError):
            parse_command_line(bad)


# ----------------------------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_has_the_coordinator_and_optional_example_sites() -> None:
    services = compose()["services"]
    assert {"server", "proxy", "mlflow", "db"} <= set(services)
    sites = [name for name, service in services.items() if service_command(service)[:1] == ["cmoe-client"]]
    assert len(sites) >= 2
    for name in sites:
        # Behind a profile: a plain `docker compose up` deploys the coordinator without them.
        assert services[name].get("profiles"), f"{name} is not behind a profile"
    for name in ("server", "proxy", "mlflow", "db"):
        assert not services[name].get("profiles"), f"{name} must start without a profile"


def test_superlink_listens_on_loopback_and_uses_the_mounted_pki() -> None:
    services = compose()["services"]
    server = services["server"]
    _, params = parse_command_line(service_command(server))
    host, _, port = params["listen"].rpartition(":")
    assert host in LOOPBACK and port.isdigit()
    assert f"{mounts(server)[str(params['pki'])]}:{params['pki']}:ro" in server["volumes"]
    assert urlparse(params["tracking_uri"]).hostname == "mlflow"


def test_proxy_shares_the_server_network_and_renders_the_template() -> None:
    services = compose()["services"]
    proxy, server = services["proxy"], services["server"]
    assert proxy["network_mode"] == "service:server"
    assert "ports" not in proxy and "networks" not in proxy
    # The lead's template, mounted where the nginx image renders templates into conf.d.
    template_mounts = {target: source for target, source in mounts(proxy).items()
                       if target.startswith("/etc/nginx/templates/")}
    assert len(template_mounts) == 1
    (target, source), = template_mounts.items()
    assert (DEPLOY / source).resolve() == TEMPLATE and target.endswith(".conf.template")
    # Every variable of the template is set, to values that agree with the server service.
    environment = proxy["environment"]
    needed = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    assert needed and needed <= set(environment)
    _, params = parse_command_line(service_command(server))
    assert environment["CMOE_SUPERLINK"] == params["listen"]
    pki_target = mounted_from(proxy, environment["CMOE_PKI"])
    assert pki_target is not None and mounts(proxy)[pki_target] == mounts(server)[str(params["pki"])]
    (_, published, container), = [p for p in published_ports(server) if p[0] == ""]
    assert str(environment["CMOE_PUBLIC_PORT"]) == container
    # envsubst limited to our variables (the image's script selects names matching this regex), so nginx's own
    # ($host, ...) survive even if such an environment variable exists.
    variable_filter = environment.get("NGINX_ENVSUBST_FILTER", "")
    assert all(re.search(variable_filter, name) for name in needed) and not re.search(variable_filter, "host")


def test_only_the_fleet_port_is_published_beyond_loopback() -> None:
    services = compose()["services"]
    public = [(name, port) for name, service in services.items() for port in published_ports(service)
              if port[0] not in ("127.0.0.1", "::1", "[::1]")]
    assert public == [("server", ("", read_env_file(COMPOSE_ENV)["CMOE_PUBLIC_PORT"],
                                  read_env_file(COMPOSE_ENV)["CMOE_PUBLIC_PORT"]))]
    assert all(port[0] == "127.0.0.1" for port in published_ports(services["mlflow"]))
    assert not published_ports(services["db"])
    for name, service in services.items():
        assert service.get("network_mode", "") in ("", "service:server"), f"{name}: {service['network_mode']}"


def mlflow_cli_options() -> set[str]:
    """Every ``--option`` declared in the installed mlflow's command-line source. Read as text, not imported:
    importing mlflow.cli takes seconds (the venv's mlflow is the release the tracking image pins)."""
    distribution = importlib.metadata.distribution("mlflow")
    sources = ("mlflow/cli/__init__.py", "mlflow/utils/cli_args.py")
    text = "".join(Path(distribution.locate_file(source)).read_text() for source in sources)
    return set(re.findall(r"(?<=[\"/])(--[a-z][a-z0-9-]*)(?=[\"/])", text))


def test_mlflow_options_exist_and_the_server_is_an_allowed_host() -> None:
    services = compose()["services"]
    argv = service_command(services["mlflow"])
    assert argv[:2] == ["mlflow", "server"]
    known = mlflow_cli_options()
    assert "--backend-store-uri" in known and "--no-such-option" not in known
    flags = {"--serve-artifacts", "--no-serve-artifacts"}
    options: dict[str, str] = {}
    words = iter(argv[2:])
    for word in words:
        assert word in known, f"mlflow server has no option {word}"
        options[word] = "" if word in flags else next(words)
    store = urlparse(options["--backend-store-uri"])
    assert store.scheme.startswith("postgresql") and store.hostname == "db" and store.password is None
    assert "PGPASSWORD" in services["mlflow"]["environment"]
    # MLflow refuses requests whose Host header it does not know: the server's must be allowed, others not.
    _, server = parse_command_line(service_command(services["server"]))
    tracking = urlparse(server["tracking_uri"])
    assert tracking.port == int(options["--port"])
    allowed = options["--allowed-hosts"].split(",")
    assert any(fnmatch.fnmatch(tracking.netloc, pattern) for pattern in allowed)
    assert not any(fnmatch.fnmatch("evil.example.org:5000", pattern) for pattern in allowed)
    build = services["mlflow"]["build"]
    pinned = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", (DEPLOY / build["context"] / build["dockerfile"]).read_text(),
                       flags=re.M)
    assert pinned and build["args"]["MLFLOW_VERSION"] == pinned.group(1)
    # The database is on a network with no route out and no published port, shared with MLflow alone.
    networks = compose()["networks"]
    db_networks = set(services["db"]["networks"])
    assert db_networks and all(networks[name].get("internal") for name in db_networks)
    assert {name for name, service in services.items()
            if set(service.get("networks", [])) & db_networks} == {"mlflow", "db"}


def test_example_sites_dial_the_public_name_through_the_proxy() -> None:
    config = compose()
    services, env = config["services"], read_env_file(COMPOSE_ENV)
    server_networks = services["server"]["networks"]
    for name, service in services.items():
        argv = service_command(service)
        if argv[:1] != ["cmoe-client"]:
            continue
        _, params = parse_command_line(argv)
        host, _, port = params["superlink"].rpartition(":")
        assert (host, port) == (env["CMOE_PUBLIC_HOST"], env["CMOE_PUBLIC_PORT"])
        site_networks = service["networks"]
        assert all(config["networks"][network].get("internal") for network in site_networks)
        assert any(host in (server_networks.get(network) or {}).get("aliases", []) for network in site_networks)
        assert "ports" not in service
        for option in ("bank", "ca", "key"):
            target = mounted_from(service, str(params[option]))
            assert target is not None, f"{name}: --{option} {params[option]} is not in a mounted volume"
            assert any(v.startswith(mounts(service)[target] + ":" + target + ":ro") for v in service["volumes"])
        assert mounted_from(service, str(params["workdir"])) is not None


def test_compose_paths_in_the_repository_exist() -> None:
    raw = raw_compose()
    declared_volumes = set(raw.get("volumes", {}))
    for name, service in raw["services"].items():
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: {build}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if "${" in source:
                continue  # the operator's path (PKI, banks), set in deploy/.env
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: volume source {source} is not in the repository"
            else:
                assert source in declared_volumes, f"{name}: named volume {source} is not declared"


def test_env_example_sets_every_required_variable_and_documents_the_rest() -> None:
    values = "\n".join(strings(raw_compose()))
    used = {match.group(1) or match.group(4) for match in COMPOSE_VARIABLE.finditer(values) if match.group(0) != "$$"}
    required = set(re.findall(r"\$\{(\w+):?\?", values))
    example = read_env_file(COMPOSE_ENV)
    assert required and required <= {key for key, value in example.items() if value}
    assert used <= set(example), f"not in compose.env.example: {sorted(used - set(example))}"
    with pytest.raises(KeyError, match="CMOE_PKI_DIR"):
        interpolate_all(raw_compose(), {key: value for key, value in example.items() if key != "CMOE_PKI_DIR"})


# ----------------------------------------------------------------------------------------------------------------
# Dockerfiles


def dockerignore_allows(context: Path, dockerfile: Path, source: str) -> bool:
    """True unless ``<Dockerfile>.dockerignore`` (deny-all, then !allow patterns, as written here) excludes it."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return True
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and line[0] != "#"]
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(source.rstrip("/"), pattern) or pattern == "*":
            allowed = negated
    return allowed


@pytest.mark.parametrize(("context", "dockerfile"), unique_builds(), ids=[d.name for _, d in unique_builds()])
def test_dockerfile_copies_existing_files_and_runs_unprivileged(context: Path, dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    copies = [arguments.split() for keyword, arguments in instructions if keyword in ("COPY", "ADD")]
    assert copies or context != REPO  # the images built from the repository install the package from it
    for words in copies:
        if any(word.startswith("--from=") for word in words):
            continue  # from another image stage, not the build context
        sources = [word for word in words[:-1] if not word.startswith("--")]
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name}: COPY {source} not in {context}"
            assert dockerignore_allows(context, dockerfile, source), f"{dockerfile.name}: {source} is ignored"
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    text = dockerfile.read_text()
    assert "torch==" not in text, "users are not pinned to the test suite's torch"


def test_images_are_the_agreed_bases() -> None:
    builds = {service: dockerfile for service, _, dockerfile in compose_builds()}
    arguments = {}
    for keyword, words in dockerfile_instructions(builds["site-a"]):
        if keyword == "ARG" and "=" in words:
            key, _, value = words.partition("=")
            arguments[key] = value
    froms = [words.split()[0] for keyword, words in dockerfile_instructions(builds["site-a"]) if keyword == "FROM"]
    final_base = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], froms[-1])
    assert final_base.startswith("nvidia/cuda:")
    assert "uv python install 3.11" in builds["site-a"].read_text()
    for service in ("server", "mlflow"):
        froms = [words for keyword, words in dockerfile_instructions(builds[service]) if keyword == "FROM"]
        assert froms[-1].startswith("python:3.11")
    assert "psycopg2" in builds["mlflow"].read_text()


# ----------------------------------------------------------------------------------------------------------------
# systemd units


@pytest.mark.parametrize("path", [CLIENT_UNIT, SERVER_UNIT], ids=lambda p: p.name)
def test_unit_is_hardened_and_its_workdir_writable(path: Path) -> None:
    unit = read_unit(path)
    service = dict(unit["Service"])
    assert service["User"] not in ("root", "0")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "CapabilityBoundingSet": ""}.items():
        assert service.get(key) == value, f"{path.name}: {key}={service.get(key)!r}"
    assert service["EnvironmentFile"].startswith("/etc/cmoe/")
    _, params = parse_command_line(expand_exec(path))
    workdir = str(params["workdir"])
    writable = [f"/var/lib/{value.replace('%i', SITE)}" for value in unit_values(unit, "Service", "StateDirectory")]
    writable += " ".join(unit_values(unit, "Service", "ReadWritePaths")).split()
    assert any(workdir == path_ or workdir.startswith(path_ + "/") for path_ in writable), (workdir, writable)
    # Every variable the command line uses is given by the unit or the example environment file.
    exec_start = unit_value(unit, "Service", "ExecStart")
    assert set(re.findall(r"\$\{?(\w+)", exec_start)) <= set(unit_environment(path))


def test_site_unit_restarts_within_limits_and_takes_its_key_as_a_credential() -> None:
    unit = read_unit(CLIENT_UNIT)
    service = dict(unit["Service"])
    assert service["Restart"] == "on-failure" and service["RestartSec"]
    assert "2" in service["RestartPreventExitStatus"].split()  # a user error is not retried
    assert int(dict(unit["Unit"])["StartLimitBurst"]) > 0 and dict(unit["Unit"])["StartLimitIntervalSec"]
    assert "%i" in service["EnvironmentFile"]
    _, params = parse_command_line(expand_exec(CLIENT_UNIT))
    assert params["site"] == SITE
    credentials = f"/run/credentials/{unit_name(CLIENT_UNIT)}"
    loaded = {value.split(":")[0] for value in unit_values(unit, "Service", "LoadCredential")}
    for option in ("ca", "key"):
        path = Path(params[option])
        assert str(path.parent) == credentials and path.name in loaded


def test_site_unit_leaves_the_gpu_reachable() -> None:
    """Any device allow-list shuts CUDA's /dev/nvidia* out; so does ProtectClock before systemd 252."""
    service = dict(read_unit(CLIENT_UNIT)["Service"])
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert service.get(key, "no") == "no", f"{CLIENT_UNIT.name}: {key}={service[key]}"


def test_server_unit_keeps_the_superlink_on_loopback() -> None:
    unit = read_unit(SERVER_UNIT)
    _, params = parse_command_line(expand_exec(SERVER_UNIT))
    assert params["listen"].rpartition(":")[0] in LOOPBACK
    assert unit_value(unit, "Service", "IPAddressDeny") == "any"
    assert unit_value(unit, "Service", "IPAddressAllow") == "localhost"
    # $CMOE_SERVER_ARGS of server.env.example ("--set local-epochs=2 --aggregation load-aware") reached the CLI
    # as separate options, not as one word.
    assert list(params["overrides"]) == ["local-epochs=2"] and params["aggregation"] == "load-aware"


# ----------------------------------------------------------------------------------------------------------------
# The guide


def test_guide_lists_only_files_that_exist() -> None:
    table = GUIDE.read_text().split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", table, flags=re.M)
    paths = [path for pair in listed for path in pair if path]
    assert len(paths) >= 8
    for path in paths:
        assert (DEPLOY / path).is_file(), path


# ----------------------------------------------------------------------------------------------------------------
# The real tools, when installed


def compose_program() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.process
@pytest.mark.skipif(compose_program() is None and not os.environ.get("CI"),
                    reason="docker-compose is not installed (apt-get install docker-compose)")
def test_docker_compose_validates_the_file(tmp_path: Path) -> None:
    program = compose_program()
    assert program is not None, "CI must install docker-compose"
    base = [*program, "--env-file"]
    ok = subprocess.run([*base, str(COMPOSE_ENV), "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # A required variable left out is an error naming it, not an empty bind mount.
    partial = tmp_path / "partial.env"
    partial.write_text("".join(line + "\n" for line in COMPOSE_ENV.read_text().splitlines()
                               if not line.startswith("CMOE_PKI_DIR=")))
    missing = subprocess.run([*base, str(partial), "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0 and "CMOE_PKI_DIR" in missing.stderr


@pytest.mark.process
@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad values and bad specifiers are reported. The programs themselves
    (/opt/cmoe/venv/bin/cmoe-*) are not installed here, so that one message is expected and nothing else."""
    assert shutil.which("systemd-analyze"), "CI must install systemd"
    files = []
    for unit in (CLIENT_UNIT, SERVER_UNIT):
        copy = tmp_path / unit_name(unit)
        copy.write_text(unit.read_text())
        files.append(str(copy))
    result = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=60)
    expected = re.compile(r"\S+: Command /opt/cmoe/venv/bin/cmoe-(client|server) is not executable: .*")
    unexpected = [line for line in (result.stdout + result.stderr).splitlines() if line and not expected.match(line)]
    assert not unexpected, "\n".join(unexpected)
