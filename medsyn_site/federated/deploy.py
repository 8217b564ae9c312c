"""Deployment of a federation, secure by default: the certificates and keys (``cryptography``, which
Flower itself uses), the SuperLink and SuperNode command lines (TLS + SuperNode authentication on,
no dependency installation at run time) and the ``flwr`` CLI connection the operator uses.

Who holds what: the federation operator holds ca.key and superlink.key; each site holds its own
node private key and sends only its ``.pub`` to the operator, who registers it."""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medsyn_site.atomic import atomic_write, atomic_write_text, refuse_existing

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parent / "app"  # the Flower app bundle: only its pyproject.toml
CONNECTION = "medsyn"
INSECURE_WARNING = ("WARNING: INSECURE federation: no TLS and no SuperNode authentication. Model weights "
                    "travel in clear text and ANY machine that reaches this port can join and receive the "
                    "model. Use only on a closed test network.")


class DeployError(ValueError):
    """A certificate, key or Flower process is missing or refused; the message says what to do."""


# -- certificates and keys --------------------------------------------------------------------
def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    def writer(tmp: Path) -> None:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
    return atomic_write(path, writer)


def _write_private(path: Path, data: bytes) -> Path:
    return _write(path, data, 0o600)


def _cert(subject: str, public_key, issuer_key, issuer_name=None, ca: bool = False, sans=(), days: int = 825):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        b = (b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(out: str | Path, hosts: tuple[str, ...] = (), force: bool = False) -> Path:
    """ca.pem/ca.key (the federation's CA) and superlink.pem/superlink.key (TLS certificate for
    localhost, 127.0.0.1 and ``hosts``). Sites get ca.pem only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    if (out / "ca.key").exists() and not force:
        raise DeployError(f"{out / 'ca.key'}: a CA already exists; pass --force to replace it (registered "
                          "sites then need the new ca.pem)")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("medsyn federation CA", ca_key.public_key(), ca_key, ca=True, days=3650)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _cert("medsyn superlink", key.public_key(), ca_key, issuer_name=ca.subject,
                 sans=("localhost", "127.0.0.1", *hosts))
    nopass = serialization.NoEncryption()
    fmt = serialization.PrivateFormat.PKCS8
    _write_private(out / "ca.key", ca_key.private_bytes(pem, fmt, nopass))
    _write(out / "ca.pem", ca.public_bytes(pem))
    _write_private(out / "superlink.key", key.private_bytes(pem, fmt, nopass))
    _write(out / "superlink.pem", cert.public_bytes(pem))
    return out


def make_node_key(out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """A site's SuperNode key pair (ECDSA P-384, OpenSSH format, as `ssh-keygen -t ecdsa -b 384`):
    ``out`` (private, 0600, stays at the site) and ``out.pub`` (sent to the federation operator)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    refuse_existing(out, force)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    pub = Path(f"{out}.pub")
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + b"\n")
    return out, pub


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise DeployError(f"{path}: {what} not found (make it with `medsyn fl init` / `medsyn fl site-key`)")
    return str(path.resolve())


# -- processes --------------------------------------------------------------------------------
BIN = Path(sys.executable).parent  # this environment's scripts (flower-superlink, flwr, ...)


def flower_env(helpers: str | Path | None = None) -> dict[str, str]:
    """The environment for Flower's processes: ``helpers`` (lifeline.clientapp_shim) then this
    environment's scripts first on PATH, because
    Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name, and a
    virtual environment need not be activated (e.g. `.venv/bin/medsyn fl superlink`). Flower's
    telemetry is off: a hospital's processes do not report to a third party (and a blocked network
    must not hold up their exit)."""
    first = [str(helpers)] if helpers else []
    return {**os.environ, "PATH": os.pathsep.join([*first, str(BIN), os.environ.get("PATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0"}


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).is_file() else shutil.which(name) or name


def superlink_command(pki: str | Path | None, port: int = 9100, host: str = "0.0.0.0",
                      database: str | None = None, insecure: bool = False) -> list[str]:
    """flower-superlink with TLS (the federation's certificate) and SuperNode authentication
    (only registered site keys may join); one port serves the sites, the ServerApp and the CLI."""
    cmd = [_exe("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if database:
        cmd += ["--database", str(database)]
    if insecure:
        return cmd + ["--insecure"]
    pki = Path(pki) if pki else None
    if pki is None:
        raise DeployError("the SuperLink needs --pki (from `medsyn fl init`), or --insecure")
    return cmd + ["--ssl-ca-certfile", _need(pki / "ca.pem", "CA certificate"),
                  "--ssl-certfile", _need(pki / "superlink.pem", "SuperLink certificate"),
                  "--ssl-keyfile", _need(pki / "superlink.key", "SuperLink key"), "--enable-supernode-auth"]


def supernode_command(superlink: str, cohort: str | Path, work_dir: str | Path, ca: str | Path | None = None,
                      key: str | Path | None = None, port: int = 9200, hardware: dict | None = None,
                      insecure: bool = False) -> list[str]:
    """flower-supernode for one site: TLS to the SuperLink (the federation's ca.pem), authenticated
    with the site's key; the node config names the site's cohort and work dir."""
    from medsyn_site.data.cohort import Cohort

    Cohort(cohort)  # fails early: missing or broken cohort
    node = {"cohort": str(Path(cohort).resolve()), "work-dir": str(Path(work_dir).resolve()), **(hardware or {})}
    cmd = [_exe("flower-supernode"), "--superlink", superlink,
           "--host", "127.0.0.1", "--port", str(port),
           "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node.items())]
    if insecure:
        return cmd + ["--insecure"]
    if ca is None or key is None:
        raise DeployError("the SuperNode needs --ca (the federation's ca.pem) and --key (this site's node key), "
                          "or --insecure")
    return cmd + ["--root-certificates", _need(Path(ca), "CA certificate"),
                  "--auth-supernode-private-key", _need(Path(key), "node private key")]


# -- the operator's flwr CLI ------------------------------------------------------------------
def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def write_connection(superlink: str, ca: str | Path | None, insecure: bool = False) -> Path:
    """The ``medsyn`` SuperLink connection in $FLWR_HOME/config.toml (used by `flwr run`, `flwr ls`,
    `flwr supernode register`); other connections there are kept."""
    import tomli_w
    import tomllib

    path = flwr_home() / "config.toml"
    doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    conn = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    else:
        if ca is None:
            raise DeployError("the connection needs --ca (the federation's ca.pem), or --insecure")
        conn["root-certificates"] = _need(Path(ca), "CA certificate")
    links = doc.setdefault("superlink", {})
    links.setdefault("default", CONNECTION)
    links[CONNECTION] = conn
    return atomic_write_text(path, tomli_w.dumps(doc))


def flwr(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``flwr`` CLI on the ``medsyn`` connection; a failure raises DeployError with its message."""
    proc = subprocess.run([_exe("flwr"), *args], capture_output=True, text=True, timeout=timeout, env=flower_env())
    if check and proc.returncode != 0:
        raise DeployError(f"flwr {' '.join(args)} failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    return proc


def register(public_key: str | Path, name: str | None = None) -> str:
    """Register a site's public key with the SuperLink (only registered keys may join)."""
    args = ["supernode", "register", _need(Path(public_key), "node public key"), CONNECTION]
    return flwr(*args, *(["--name", name] if name else [])).stdout.strip()


def submit(run_config: str | None = None, stream: bool = False) -> int:
    """`flwr run` the federated app on the ``medsyn`` connection; returns the Flower run id."""
    args = ["run", str(APP_DIR), CONNECTION, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    out = flwr(*args).stdout
    try:
        return int(json.loads(out)["run-id"])
    except (ValueError, KeyError) as e:
        raise DeployError(f"flwr run gave no run id: {out[-500:]}") from e


def control():
    """Flower's Control API client on the ``medsyn`` connection: what the flwr CLI itself uses, here in
    process, so waiting for a run does not start a ``flwr`` process (about 1.3 s of CPU) at every poll.
    Close it after use."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    try:
        return init_http_client_from_connection(read_superlink_connection(CONNECTION))
    except Exception as e:  # flwr raises click exceptions naming the problem
        raise DeployError(f"cannot reach the SuperLink of connection {CONNECTION!r} in {flwr_home()}/config.toml: "
                          f"{getattr(e, 'message', e)} (`medsyn fl connect` writes it)") from e


def _ask(what: str, call):
    try:
        return call()
    except Exception as e:  # transport or Flower errors: the SuperLink is down or refuses
        raise DeployError(f"{what}: the SuperLink of connection {CONNECTION!r} did not answer: "
                          f"{' '.join(str(e).split())[:300]}") from e


def run_status(run_id: int, client) -> str:
    """The run's status as `flwr ls` shows it (pending, starting, running, finished:completed,
    finished:failed, finished:stopped)."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    res = _ask(f"status of run {run_id}", lambda: client.ListRuns(ListRunsRequest(run_id=run_id)))
    if run_id not in res.run_dict:
        return "unknown"
    status = run_from_proto(res.run_dict[run_id]).status
    return f"{status.status}:{status.sub_status}" if status.sub_status else status.status


def nodes(client) -> dict[int, str]:
    """Each SuperNode the SuperLink knows, with its status (registered, online, offline, ...)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    res = _ask("list of SuperNodes", lambda: client.ListNodes(ListNodesRequest()))
    return {int(n.node_id): n.status for n in res.nodes_info}


def wait(run_id: int, timeout: float = 24 * 3600, poll: float = 3.0) -> str:
    """Wait until the run finishes; returns its final status."""
    client = control()
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = run_status(run_id, client)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
    finally:
        client.close()
    raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (`flwr ls` shows its status)")
