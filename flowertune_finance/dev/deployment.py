"""A Flower deployment on this machine's loopback: SuperLink + SuperNodes over TLS, optional node auth.

The same processes a real federation runs (`flower-superlink`, `flower-supernode`, `flwr run`
against a named connection), started on 127.0.0.1 so that the Deployment Engine can be tried, and
tested, without a second machine. Each server starts on a port derived from the folder and its
name, and on the next candidate if another process took that port first (`servers.Server`).
Every process gets its own process group and a marker in its environment; `LocalDeployment.stop`
(also on Ctrl-C, via the context manager) kills all of them, including the SuperExec the SuperLink
detaches into its own session.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from flowertune_finance.dev import control, launch
from flowertune_finance.dev.credentials import (
    LOOPBACK,
    Certificates,
    existing_certificates,
    generate_certificates,
    generate_node_keys,
)
from flowertune_finance.dev.processes import (
    console_script,
    flwr_env,
    flwr_executable,
    kill_processes_with_env,
    signals_ignored,
)
from flowertune_finance.dev.servers import Server, StartFailed, owns_listener, port_candidates

CONNECTION = "local-deployment"
MARKER = "FLOWERTUNE_DEPLOYMENT"  # env var carried by every process a deployment starts
NODE_READY_LINE = "SuperNode ID:"  # logged by flower-supernode once the SuperLink accepted it


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or exited when it should be running."""


def node_configs(
    num_partitions: int, dataset_paths: list[str] | tuple[str, ...] = ()
) -> dict[str, dict[str, str | int]]:
    """Node configs for a try-out federation: `num_partitions` partition nodes, one node per own file."""
    configs: dict[str, dict[str, str | int]] = {
        f"node-{i}": {"partition-id": i, "num-partitions": num_partitions} for i in range(num_partitions)
    }
    configs.update({f"owner-{i}": {"dataset-path": str(Path(path).resolve())} for i, path in enumerate(dataset_paths)})
    return configs


def node_config_argument(node_config: dict[str, str | int]) -> str:
    """`--node-config` text: space-separated `key=value`, strings quoted as TOML strings."""
    pairs = (f"{key}={value if isinstance(value, int) else json.dumps(str(value))}" for key, value in node_config.items())
    return " ".join(pairs)


@dataclass
class LocalDeployment:
    """A SuperLink and its SuperNodes on loopback, started under `folder` and stopped together."""

    folder: Path
    supernode_auth: bool = False
    startup_timeout: float = 120.0
    port: int = 0  # 0: the first free one of the folder's candidates
    certificates: Certificates | None = None
    superlink: Server | None = None
    supernodes: dict[str, Server] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.folder / "flwr-home"
        # a folder used before keeps its CA (keys are never overwritten); a new one gets a fresh set
        certificates_dir = self.folder / "certificates"
        self.certificates = (
            self.certificates or existing_certificates(certificates_dir) or generate_certificates(certificates_dir)
        )

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        """Environment of every process: this venv first on PATH, a private FLWR_HOME, the marker."""
        return flwr_env({MARKER: str(self.folder)}, home=flwr_home or self.flwr_home)

    def _server(self, name: str, command: list[str], env: dict[str, str], ports: list[int]) -> Server:
        """A server of this deployment: `command` with `--port` appended, started on the first of `ports` it binds."""
        log_path = self.folder / "logs" / f"{name}.log"
        return Server(name, lambda port: [*command, "--port", str(port)], env, self.folder, log_path, ports).start()

    def _wait_ready(self, server: Server, ready: Callable[[Server], bool]) -> None:
        try:
            server.wait_ready(ready, self.startup_timeout)
        except StartFailed as error:
            raise DeploymentError(str(error)) from error

    def start_superlink(self) -> Server:
        """`flower-superlink` with TLS (and node auth if asked); returns once it accepts connections."""
        command = [
            console_script("flower-superlink"), "--host", LOOPBACK,
            "--ssl-ca-certfile", str(self.certificates.ca_cert),
            "--ssl-certfile", str(self.certificates.server_cert),
            "--ssl-keyfile", str(self.certificates.server_key),
            "--disable-runtime-dependency-installation",
        ] + (["--enable-supernode-auth"] if self.supernode_auth else [])
        ports = [self.port] if self.port else port_candidates(f"{self.folder}#superlink")
        self.superlink = self._server("superlink", command, self.env(), ports)
        self._wait_ready(self.superlink, lambda server: owns_listener(server.popen.pid, server.port)
                         and _accepts_connections(LOOPBACK, server.port))
        self.port = self.superlink.port
        self.write_connection()
        return self.superlink

    def start(self, node_configs: dict[str, dict[str, str | int]]) -> None:
        """The SuperLink, then one SuperNode per entry (its key registered first when auth is on); waits for all."""
        self.start_superlink()
        for name, node_config in node_configs.items():
            private_key = None
            if self.supernode_auth:
                private_key, public_key = self.folder / "keys" / name, self.folder / "keys" / f"{name}.pub"
                if not (private_key.is_file() and public_key.is_file()):  # a folder used before keeps its keys
                    private_key, public_key = generate_node_keys(self.folder / "keys", name)
                self.register_node(public_key)
            self.start_supernode(name, node_config, private_key, wait=False)
        for process in self.supernodes.values():
            self.wait_for_supernode(process)

    def write_connection(self, name: str = CONNECTION) -> Path:
        """Add `[superlink.<name>]` (address + CA) to this deployment's Flower config, for `flwr run . <name>`."""
        config_path = self.flwr_home / "config.toml"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": name, name: {
            "address": self.address, "root-certificates": str(self.certificates.ca_cert),
        }}}
        config_path.write_text(tomli_w.dumps(config))
        return config_path

    def register_node(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
        result = subprocess.run(
            [flwr_executable(), "supernode", "register", str(public_key), CONNECTION],
            check=False, env=self.env(), capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise DeploymentError(f"`flwr supernode register {public_key}` failed:\n{result.stdout}\n{result.stderr}")

    def online_nodes(self) -> list[str]:
        """Ids of the SuperNodes the SuperLink sees online (`flwr supernode ls`)."""
        try:
            return control.online_nodes(self.env(), [CONNECTION])
        except control.ControlError as error:
            raise DeploymentError(f"`flwr supernode ls` gave no node list: {error}") from error

    def start_supernode(
        self, name: str, node_config: dict[str, str | int], private_key: Path | None = None, wait: bool = True
    ) -> Server:
        """`flower-supernode` trusting the deployment's CA; with `wait`, returns once the SuperLink accepted it."""
        node_home = self.folder / "nodes" / name
        node_home.mkdir(parents=True, exist_ok=True)
        command = [
            console_script("flower-supernode"), "--superlink", self.address,
            "--root-certificates", str(self.certificates.ca_cert),
            "--node-config", node_config_argument(node_config),
        ] + (["--auth-supernode-private-key", str(private_key)] if private_key else [])
        process = self._server(name, command, self.env(node_home), port_candidates(f"{self.folder}#{name}"))
        self.supernodes[name] = process
        if wait:
            self.wait_for_supernode(process)
        return process

    def wait_for_supernode(self, process: Server) -> None:
        """Block until the node logs its node id (accepted), or raise if it exits or times out."""
        self._wait_ready(process, lambda server: NODE_READY_LINE in server.output())

    def wait_for_exit(self, process: Server, timeout: float) -> int:
        """The exit code of a process expected to stop by itself (a rejected SuperNode); one that lost
        its port to another process is started again on its next candidate first."""
        try:
            while process.popen.wait(timeout=timeout) != 0 and process.lost_port():
                process.start()
            return process.popen.returncode
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(f"{process.name} still running after {timeout:.0f} s; log: {process.log_path}") from error

    def _check_alive(self, process: Server) -> None:
        if process.popen.poll() is not None:
            raise DeploymentError(
                f"{process.name} exited with code {process.popen.returncode}:\n{process.log()[-3000:]}"
            )

    def kill(self, process: Server, sig: int = signal.SIGKILL, grace: float = 5.0) -> None:
        """Send `sig` to the process's whole group; SIGKILL what is left after `grace` seconds."""
        process.stop(grace, sig)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the SuperNodes, then the SuperLink, then anything else carrying this deployment's marker.

        A second Ctrl-C or SIGTERM during this (e.g. `timeout` signals its whole group) is ignored,
        so teardown always finishes; it is bounded by `grace` per process.
        """
        with signals_ignored((signal.SIGINT, signal.SIGTERM)):
            for process in [*self.supernodes.values(), *([self.superlink] if self.superlink else [])]:
                if process.popen.poll() is None:
                    self.kill(process, signal.SIGTERM, grace)
            kill_processes_with_env(MARKER, str(self.folder), grace)

    def describe(self) -> str:
        """How to use the running deployment: connection, `flwr run` command, logs."""
        nodes = "\n".join(f"  {name}: {process.log_path}" for name, process in self.supernodes.items())
        return (
            f"SuperLink (TLS{', SuperNode auth' if self.supernode_auth else ''}) on {self.address}; "
            f"CA certificate {self.certificates.ca_cert}\n"
            f"Connection '{CONNECTION}' is in {self.flwr_home / 'config.toml'}. Run the app with:\n"
            f"  FLWR_HOME={self.flwr_home} flwr run . {CONNECTION} --run-config '...' --stream\n"
            f"Logs: superlink: {self.superlink.log_path if self.superlink else '-'}\n{nodes}"
        )

    def wait_until_interrupted(self) -> None:
        """Block until Ctrl-C (KeyboardInterrupt); raise DeploymentError if a SuperLink or SuperNode exits."""
        while True:
            for process in [self.superlink, *self.supernodes.values()]:
                self._check_alive(process)
            time.sleep(1.0)

    def run_smoke(self, app_dir: str | Path, rounds: int = 2) -> launch.RunResult:
        """The tiny-model smoke (bundled sample, partitioned by the nodes' node config) on this deployment."""
        app_dir = Path(app_dir).resolve()
        model_dir = launch.ensure_tiny_model(app_dir / ".smoke" / "tiny-model")
        run_config = launch.smoke_run_config(app_dir, model_dir, rounds=rounds)
        run_config["strategy.fraction-train"] = 1.0  # every node, every round: a handful of nodes, not 50
        return launch.run_app(app_dir, run_config, env=self.env(), connection=CONNECTION)

    def __enter__(self) -> LocalDeployment:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False

