"""A localhost Flower federation started and stopped by PID (``glora flower run``).

:class:`LocalFederation` starts ``flower-superlink`` and N ``flower-supernode`` processes on
127.0.0.1 (free ports found at run time) under an isolated ``FLWR_HOME``, each in its own process
group, submits the app with ``flwr run … --stream``, and on exit (also on an error, Ctrl-C or
SIGTERM) kills every process group it started. With ``tls=True`` it generates a CA and a server
certificate for 127.0.0.1/localhost; with ``auth=True`` it enables SuperNode authentication
(``--enable-supernode-auth``, one EC key pair per SuperNode registered with
``flwr supernode register``). :func:`run_simulation` runs the same app on Flower's simulation
runtime and stops the local SuperLink that ``flwr run`` leaves behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = [
    "APP_DIR",
    "FederationError",
    "LocalFederation",
    "SuperLinkDied",
    "free_port",
    "generate_auth_keys",
    "generate_tls",
    "handle_signals",
    "run_config_arg",
    "run_simulation",
]

#: The thin Flower app folder shipped in the repository.
APP_DIR = Path(__file__).resolve().parents[3] / "apps" / "flower"
CONNECTION = "glora-local"


class FederationError(RuntimeError):
    """A Flower process failed to start or the run failed."""


class SuperLinkDied(FederationError):
    """The SuperLink exited during a run (resume from the last checkpoint with ``--resume``)."""


def _bin(name: str) -> str:
    """Path of a Flower executable next to the running Python (the venv), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name} not found; install glora[flower]")
    return found


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"{what} exited with code {proc.returncode} during start-up")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FederationError(f"{what} did not open 127.0.0.1:{port} within {timeout:.0f} s")


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``--run-config`` text: TOML ``k=v`` pairs (strings quoted, booleans lower-case)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            text = str(v).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{k}="{text}"')
    return " ".join(parts)


# ---------------------------------------------------------------------- TLS and auth material


def generate_tls(
    directory: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")
) -> dict[str, Path]:
    """A self-signed CA and a server certificate/key for ``hosts`` (PEM files in ``directory``).

    Returns ``{"ca": ca.crt, "cert": server.pem, "key": server.key}``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "glora test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(out["key"], 0o600)
    return out


def generate_auth_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """An EC (SECP384R1) key pair in OpenSSH format, as ``flower-supernode`` expects.

    Returns ``(private_key_path, public_key_path)``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    os.chmod(priv, 0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return priv, pub


# ---------------------------------------------------------------------- processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[Any]
    log: Path
    handle: IO[bytes] | None = None


def _kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (its own session), then SIGKILL after ``grace``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # the group may hold children (flwr-serverapp, superexec, flwr-clientapp) even when the
    # leader is gone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt in this block, so ``finally`` runs."""

    def raiser(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not in the main thread
            old[sig] = signal.signal(sig, raiser)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@dataclass
class LocalFederation:
    """SuperLink + N SuperNodes on 127.0.0.1 (see the module docstring).

    Use as a context manager: entering starts everything, leaving stops every process group.

    Args:
        num_supernodes: SuperNodes to start; node ``i`` gets ``partition-id=i``.
        workdir: scratch folder (FLWR_HOME, logs, certificates, keys); a temp dir by default.
        tls: serve the SuperLink over TLS with a generated CA (else ``--insecure``).
        auth: enable SuperNode authentication with a generated key per SuperNode.
        env: extra environment for every process.
    """

    num_supernodes: int
    workdir: Path | None = None
    tls: bool = False
    auth: bool = False
    env: dict[str, str] = field(default_factory=dict)
    procs: list[_Proc] = field(default_factory=list)
    supernodes: list[_Proc] = field(default_factory=list)
    port: int = 0
    _own_workdir: bool = False

    # ------------------------------------------------------------------ setup
    def _environ(self) -> dict[str, str]:
        assert self.workdir is not None
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.workdir / "flwr-home"),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.env)
        return env

    def _spawn(self, name: str, cmd: list[str]) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        popen = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self._environ(),
            cwd=str(self.workdir),
            start_new_session=True,  # own process group: killpg reaches its children too
        )
        proc = _Proc(name, popen, log, fh)
        self.procs.append(proc)
        return proc

    def _flwr(self, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("flwr"), *args],
            env=self._environ(),
            cwd=str(self.workdir),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, register keys (``auth``) and start the SuperNodes."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="glora-flower-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir).resolve()
        (self.workdir / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        certs = generate_tls(self.workdir / "certs") if self.tls else None
        link = [
            _bin("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if certs is not None:
            link += [
                "--ssl-certfile", str(certs["cert"]),
                "--ssl-keyfile", str(certs["key"]),
                "--ssl-ca-certfile", str(certs["ca"]),
            ]  # fmt: skip
        else:
            link.append("--insecure")
        if self.auth:
            link.append("--enable-supernode-auth")
        self._write_connection(certs)
        superlink = self._spawn("superlink", link)
        _wait_port(self.port, superlink.popen, timeout, "flower-superlink")
        for i in range(self.num_supernodes):
            self.start_supernode(i, certs, timeout=timeout)

    def _write_connection(self, certs: dict[str, Path] | None) -> None:
        assert self.workdir is not None
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "127.0.0.1:{self.port}"',
        ]
        if certs is not None:
            lines.append(f'root-certificates = "{certs["ca"]}"')
        else:
            lines.append("insecure = true")
        (self.workdir / "flwr-home" / "config.toml").write_text("\n".join(lines) + "\n")

    def start_supernode(
        self, i: int, certs: dict[str, Path] | None = None, *, timeout: float = 60.0
    ) -> _Proc:
        """Start SuperNode ``i`` (``partition-id=i``) on a free port."""
        assert self.workdir is not None
        if certs is None and self.tls:
            certs = {"ca": self.workdir / "certs" / "ca.crt"}
        port = free_port()
        cmd = [
            _bin("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={i} num-partitions={self.num_supernodes}",
        ]
        if certs is not None:
            cmd += ["--root-certificates", str(certs["ca"])]
        else:
            cmd.append("--insecure")
        if self.auth:
            priv, pub = generate_auth_keys(self.workdir / "keys", f"supernode-{i}")
            res = self._flwr(["supernode", "register", str(pub), CONNECTION], timeout=timeout)
            if res.returncode != 0:
                raise FederationError(
                    f"flwr supernode register failed ({res.returncode}): {res.stdout}{res.stderr}"
                )
            cmd += ["--auth-supernode-private-key", str(priv)]
        proc = self._spawn(f"supernode-{i}", cmd)
        self.supernodes.append(proc)
        _wait_port(port, proc.popen, timeout, f"flower-supernode {i}")
        return proc

    # ------------------------------------------------------------------ run
    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any],
        *,
        timeout: float | None = None,
        poll: float = 1.0,
    ) -> int:
        """``flwr run APP glora-local --stream --run-config …``; its exit code.

        Its output goes to ``logs/flwr-run.log`` (and is echoed when ``GLORA_FLOWER_ECHO=1``).
        Every ``poll`` seconds it checks that the SuperLink is alive: ``flwr run`` and the
        ServerApp can wait indefinitely for a dead SuperLink, so a dead one stops the run.

        Raises:
            SuperLinkDied: the SuperLink process exited before ``flwr run`` finished.
            FederationError: ``timeout`` seconds passed.
        """
        assert self.workdir is not None
        cmd = [
            _bin("flwr"),
            "run",
            str(Path(app_dir).resolve()),
            CONNECTION,
            "--stream",
            "--run-config",
            run_config_arg(run_config),
        ]
        proc = self._spawn("flwr-run", cmd)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rc = proc.popen.wait(poll)
                    # flwr run may fail first when the SuperLink dies: name the real cause
                    if rc != 0 and self._superlink_exit(grace=2.0) is not None:
                        raise self._superlink_died()
                    return rc
                # flwr run (and the ServerApp) may also wait forever for a dead SuperLink
                if self._superlink_exit(grace=0.0) is not None:
                    raise self._superlink_died()
                if deadline is not None and time.monotonic() > deadline:
                    raise FederationError(f"flwr run did not finish within {timeout} s")
        finally:
            _kill_group(proc.popen, grace=2.0)

    def _superlink_exit(self, *, grace: float) -> int | None:
        """The SuperLink's exit code once it has exited (waiting up to ``grace`` s), else None."""
        link = self.superlink
        if link is None:
            return None
        try:
            return link.popen.wait(grace) if grace > 0 else link.popen.poll()
        except subprocess.TimeoutExpired:
            return None

    def _superlink_died(self) -> SuperLinkDied:
        code = self.superlink.popen.returncode if self.superlink is not None else None
        return SuperLinkDied(
            f"flower-superlink died (exit code {code}) during the run; every Flower process was "
            "stopped. Continue from the last checkpoint with `glora flower run --resume RUN_DIR`"
        )

    def kill_supernode(self, i: int) -> None:
        """Kill SuperNode ``i``'s whole process group (fault injection)."""
        _kill_group(self.supernodes[i].popen, grace=0.5)

    def logs(self) -> str:
        """All process logs, concatenated (for error messages)."""
        out = []
        for p in self.procs:
            with contextlib.suppress(OSError):
                out.append(f"===== {p.name} =====\n{p.log.read_text(errors='replace')[-6000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Kill every process group started (reverse order), then any stray process of this
        federation (found by its ``FLWR_HOME``), and close the logs.

        A stray: the ``flwr-serverapp`` that the SuperLink starts in a process group of its own;
        it outlives a killed SuperLink (and would hold the run directory's lock).
        """
        for p in reversed(self.procs):
            _kill_group(p.popen)
            if p.handle is not None:
                p.handle.close()
                p.handle = None
        if self.workdir is not None:
            _kill_pids(_pids_with_env("FLWR_HOME", str(self.workdir / "flwr-home")))

    @property
    def superlink(self) -> _Proc | None:
        """The SuperLink process (None before :meth:`start`)."""
        return next((p for p in self.procs if p.name == "superlink"), None)

    def pids(self) -> list[int]:
        """PIDs of the process-group leaders started."""
        return [p.popen.pid for p in self.procs]

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir and self.workdir is not None and not os.environ.get("GLORA_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _pids_with_env(key: str, value: str) -> list[int]:
    """PIDs (other than this process) whose environment has ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    pids = []
    for pdir in Path("/proc").iterdir():
        if not pdir.name.isdigit() or int(pdir.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (pdir / "environ").read_bytes().split(b"\0"):
                pids.append(int(pdir.name))
    return pids


def _kill_pids(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGKILL ``pids`` (and their process groups unless it is ours); wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _pids_listening(port: int) -> list[int]:
    """PIDs of processes with a socket listening on 127.0.0.1:``port`` (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inodes.add(cols[9])
    pids = []
    for pdir in Path("/proc").iterdir():
        if not pdir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (pdir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        pids.append(int(pdir.name))
                        break
    return pids


def run_simulation(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    workdir: str | Path | None = None,
    timeout: float | None = None,
) -> int:
    """``flwr run APP --federation-config num-supernodes=N --stream`` on the simulation runtime.

    Uses an isolated FLWR_HOME with free ports for the managed local SuperLink, and kills that
    lingering SuperLink (found by its listening port) afterwards. Returns ``flwr run``'s code.
    """
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="glora-flower-sim-")).resolve()
    (wd / "flwr-home").mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(wd / "flwr-home"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    cmd = [
        _bin("flwr"),
        "run",
        str(Path(app_dir).resolve()),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
        "--run-config",
        run_config_arg(run_config),
    ]
    log = wd / "flwr-run.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(wd), start_new_session=True
        )
        try:
            return popen.wait(timeout)
        finally:
            _kill_group(popen, grace=2.0)
            for port in (http_port, control_port):
                for pid in _pids_listening(port):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        if os.getpgid(pid) != os.getpgrp():
                            os.killpg(os.getpgid(pid), signal.SIGTERM)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            if own and not os.environ.get("GLORA_KEEP"):
                shutil.rmtree(wd, ignore_errors=True)
