"""End-to-end check of the Ray cluster launcher with the committed ``cluster.yaml``, on this one machine.

The "cluster" is this machine reached over ssh as a user of its own: a private sshd on 127.0.0.1 (a free
high port, its own config, host key and pid file: the system sshd and port 22 are never touched), the
head at 127.0.0.1 and no workers. Steps, each timed:

1. ``packages``  openssh-server, rsync and netcat-openbsd with apt-get if any is missing (it says so);
2. ``sshd``      the node user ``ureid-e2e`` (created if missing), a fresh ed25519 key pair authorised for
                 it, the private sshd, and one ``ssh ... true`` through it;
3. ``token``     the launcher's token made exactly as cluster.yaml's header says, in a launcher home of
                 its own (``HOME=<tmp>/launcher``: nothing is written to the real ~/.ray);
4. ``ray up``    ``ray up -y`` on a copy of cluster.yaml where only the addresses, the ssh user and key
                 and the way ssh reaches the private port (``auth.ssh_proxy_command: nc 127.0.0.1 PORT``:
                 Ray's launcher has no ssh-port setting) differ; every setup and start command is the
                 committed one (checked). It copies the project to ~ureid-e2e/ureid, runs
                 scripts/bootstrap.sh there (a first run installs the pinned dependencies from PyPI:
                 minutes, about 6.5 GB) and starts the head with token auth; then ``ray exec ... ray
                 status`` must show the ``ureid_cluster_slot`` resource;
5. ``ray submit`` ``experiments/buc.py`` with the BUC CPU preset cut to one short stage on a tiny
                 synthetic set, ``ray.address=auto``, MLflow in a SQLite file of the temp folder;
6. ``mlflow``    the run read back with MLflow's client: FINISHED, with the stage metrics at step 0;
7. ``stop``      the head stopped by PID: every Ray process of the node user, in ``ray stop``'s order
                 and grace (the raylet; the dashboard, agents, monitor and workers; the gcs_server last;
                 SIGTERM, then SIGKILL after 16/3 s); then the private sshd by its PID.
                 Never ``ray down`` (it runs ``ray stop``, which kills every Ray process of the machine)
                 and never ``ray stop``: the node user owns only this check's processes, so no other Ray
                 on the machine is touched.

Isolation from another Ray on the machine: the node's and the launcher's Ray temp folders are in the
temp folder (``RAY_TMPDIR``: session files, ``ray_current_cluster`` that ``address=auto`` reads, the
launcher's cluster state), and the head keeps cluster.yaml's port 6379 and Ray's other fixed default ports
(8265 dashboard, 10001 client server, 52365 dashboard agent) only where nothing listens on them: a port in
use (another Ray on the machine holds 8265 and 52365 while it runs) is replaced in the copy's start command
by a free one (``--port``, ``--dashboard-port``, ``--ray-client-server-port``,
``--dashboard-agent-listen-port``), and the script says so.

Run as root (apt-get, useradd, sshd), from the repository root or anywhere:

    /work/main/.venv/bin/python benchmarks/launcher_e2e.py            # ray/ssh on PATH from that venv
    ... --keep-tmp          keep the temp folder (logs, the yaml copy, the MLflow store)
    ... --remove-user       delete ureid-e2e and its home (its ~6.5 GB venv) at the end

The node user and its venv are kept by default, so that a second run skips the install (bootstrap.sh's
stamp). Prints a table of the steps with their wall times and results; exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
USER = "ureid-e2e"
HEAD_PORT = 6379
# Ray's other fixed default ports of a head, with the `ray start` flag that moves each one.
OTHER_PORTS = {8265: "--dashboard-port", 10001: "--ray-client-server-port", 52365: "--dashboard-agent-listen-port"}
# BUC's CPU preset (buc_cpu.yaml on cpu_base.yaml) cut to one short stage on the tests' tiny synthetic set.
TINY_SYNTH = {"seed": 3, "num_train_ids": 6, "num_test_ids": 4, "num_distractors": 6, "num_junk": 3,
              "min_images": 3, "max_images": 5, "mean_images": 4, "height": 32, "width": 16}
SHORT = ["schedule.max_stages=1", "train.first_stage_epochs=1", "train.max_batches_per_epoch=2",
         "train.batch_size=8", "train.eval_batch_size=32", "data.height=32", "data.width=16",
         "model.embedding_dim=32", "ray.num_workers=1", "ray.cpus_per_worker=1", "ray.address=auto",
         *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]
STAGE_METRICS = ("mAP", "rank1", "num_clusters", "loss", "stage_time_s", "lf_silhouette")


class StepFailed(RuntimeError):
    pass


def sh(cmd, *, log: Path | None = None, check=True, timeout=None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list); its output goes to ``log`` (appended) or is captured."""
    if log is not None:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}\n")
            f.flush()
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        where = f"see {log}" if log else (p.stdout + p.stderr)[-3000:]
        raise StepFailed(f"`{' '.join(map(str, cmd))[:200]}` exited {p.returncode}: {where}")
    return p


def tail(path: Path, n=40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` on any address (a bind on 0.0.0.0 would fail) nor answers on 127.0.0.1."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_pids(uid: int | None = None, contains: str | None = None) -> dict[int, str]:
    """PID -> command line of every live process of ``uid`` (or whose command line has ``contains``). Zombies
    are left out: PID 1 of this machine reaps orphans late, and a zombie is already dead."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (uid is not None and d.stat().st_uid != uid) or _zombie(int(d.name)):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if contains is not None and contains not in cmd:
                continue
            out[int(d.name)] = cmd or (d / "comm").read_text().strip()
        except OSError:
            continue
    return out


def kill_pids(pids, timeout=30.0) -> list[int]:
    """SIGTERM, wait, SIGKILL what is left; returns the PIDs that needed SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in alive) and time.time() < deadline:
        time.sleep(0.2)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except (OSError, IndexError):
        return True


def ray_pids(uid: int) -> dict[int, str]:
    """The node user's Ray processes (the head: gcs_server, raylet, dashboard, monitor, workers, drivers)."""
    return {p: c for p, c in user_pids(uid).items()
            if "sshd" not in c.split(" ")[0] and ("ray" in c or "gcs_server" in c or "raylet" in c)}


class E2E:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ureid-e2e-", dir="/tmp"))  # short: Ray's socket paths
        self.tmp.chmod(0o711)  # the node user reaches its folders inside
        self.rows: list[tuple[str, float, str]] = []
        self.sshd: subprocess.Popen | None = None
        self.token_path = self.tmp / "launcher" / ".ray" / "ureid_auth_token"
        self.yaml_path = self.tmp / "cluster-e2e.yaml"
        self.head_port = HEAD_PORT
        self.venv_bin = Path(sys.executable).parent
        self.uid = -1
        self.run_id = None
        self.started = time.time()

    # -- helpers --------------------------------------------------------------------------------------
    def step(self, name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        try:
            result = fn() or "ok"
        except BaseException as e:  # noqa: BLE001 - the table and the cleanup still run
            self.rows.append((name, time.time() - t0, f"FAILED: {str(e).splitlines()[0][:160]}"))
            print(f"FAILED: {e}", flush=True)
            raise
        self.rows.append((name, time.time() - t0, result))
        print(f"-> {result} ({time.time() - t0:.1f} s)", flush=True)
        return result

    def launcher_env(self) -> dict:
        """The launching side: its own HOME (the token, ~/.ray), Ray temp folder and token auth."""
        return {**os.environ, "HOME": str(self.tmp / "launcher"), "RAY_TMPDIR": str(self.tmp / "l"),
                "TMPDIR": str(self.tmp / "l"), "PATH": f"{self.venv_bin}:{os.environ['PATH']}",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    # -- steps ----------------------------------------------------------------------------------------
    def packages(self):
        need = {"openssh-server": "/usr/sbin/sshd", "rsync": "rsync", "netcat-openbsd": "nc"}
        missing = [pkg for pkg, exe in need.items() if not shutil.which(exe)]
        if not missing:
            return "present: " + ", ".join(need)
        print(f"installing with apt-get: {' '.join(missing)}", flush=True)
        log = self.tmp / "apt.log"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update"], log=log, env=env)
        # Debian's policy-rc.d in containers keeps the system sshd from starting; nothing here starts it.
        sh(["apt-get", "install", "-y", "--no-install-recommends", *missing], log=log, env=env)
        return "installed: " + ", ".join(missing)

    def ssh_setup(self):
        made = ""
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            sh(["useradd", "--create-home", "--shell", "/bin/bash", USER])
            pw = pwd.getpwnam(USER)
            made = f"user {USER} created; "
        sh(["usermod", "-p", "*", USER])  # no password, but not "locked" (sshd refuses locked accounts)
        self.uid, home = pw.pw_uid, Path(pw.pw_dir)
        leftovers = ray_pids(self.uid)
        if leftovers:  # an earlier run of this check that died before its stop step: ours alone
            print(f"stopping Ray processes left by an earlier run: {sorted(leftovers)}", flush=True)
            kill_pids(list(leftovers))
        # The node user's environment: its Ray temp folder in ours (session files, ray_current_cluster,
        # the monitor's cluster state), apart from any other Ray on the machine; no pip cache (6.5 GB).
        node_tmp = self.tmp / "n"
        for d in (node_tmp, self.tmp / "node"):
            d.mkdir()
            shutil.chown(d, USER, pw.pw_gid)
        bashrc = home / ".bashrc"
        lines = [ln for ln in (bashrc.read_text().splitlines() if bashrc.exists() else [])
                 if "# ureid-e2e" not in ln]
        lines.insert(0, f'export RAY_TMPDIR={node_tmp} PIP_NO_CACHE_DIR=1  # ureid-e2e: launcher_e2e.py')
        bashrc.write_text("\n".join(lines) + "\n")
        shutil.chown(bashrc, USER, pw.pw_gid)
        # A fresh key pair, authorised for the node user.
        key = self.tmp / "id_ed25519"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "launcher_e2e", "-f", str(key)])
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            shutil.chown(p, USER, pw.pw_gid)
        (ssh_dir / "authorized_keys").chmod(0o600)
        # The private sshd: 127.0.0.1 only, a free high port, its own host key and pid file.
        self.ssh_port = free_port()
        host_key = self.tmp / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
        cfg = self.tmp / "sshd_config"
        cfg.write_text(f"""Port {self.ssh_port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {self.tmp}/sshd.pid
AllowUsers {USER}
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
X11Forwarding no
PrintMotd no
MaxSessions 20
MaxStartups 20:30:60
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        sh(["/usr/sbin/sshd", "-t", "-f", str(cfg)])
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(cfg), "-E", str(self.tmp / "sshd.log")],
                                     start_new_session=True)
        deadline = time.time() + 20
        while port_free(self.ssh_port):
            if self.sshd.poll() is not None or time.time() > deadline:
                raise StepFailed(f"sshd did not start: {tail(self.tmp / 'sshd.log')}")
            time.sleep(0.2)
        self.key = key
        out = sh(["ssh", "-i", str(key), "-o", f"ProxyCommand=nc 127.0.0.1 {self.ssh_port}",
                  "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                  "-o", "BatchMode=yes", f"{USER}@127.0.0.1", "id -un"]).stdout.strip()
        if out != USER:
            raise StepFailed(f"ssh answered {out!r}")
        return f"{made}sshd pid {self.sshd.pid} on 127.0.0.1:{self.ssh_port}; ssh as {USER} works"

    def token(self):
        (self.tmp / "launcher").mkdir()
        (self.tmp / "l").mkdir()
        header = next(ln for ln in (REPO / "cluster.yaml").read_text().splitlines()
                      if "get-auth-token --generate" in ln).lstrip("# ").strip()
        print(f"(cluster.yaml's header, with HOME={self.tmp / 'launcher'}) {header}", flush=True)
        env = {k: v for k, v in self.launcher_env().items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        sh(["bash", "-c", header], env=env, cwd=self.tmp, log=self.tmp / "token.log")
        tok = self.token_path.read_text().strip()
        mode = oct(self.token_path.stat().st_mode & 0o777)
        if len(tok) < 32 or mode != "0o600":
            raise StepFailed(f"token file {self.token_path}: {len(tok)} characters, mode {mode}")
        return f"{len(tok)}-character token, mode {mode[2:]}"

    def write_yaml(self):
        committed = yaml.safe_load((REPO / "cluster.yaml").read_text())
        cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
        notes = []
        if not port_free(HEAD_PORT):
            self.head_port = free_port()
            notes.append(f"port {HEAD_PORT} is taken on this machine: the copy uses {self.head_port}")
        # Another Ray on this machine (a local ray.init or a test cluster) may hold Ray's fixed default ports:
        # then the copy's head start command gets free ones (two heads cannot share a port).
        moved = {flag: free_port() for port, flag in OTHER_PORTS.items() if not port_free(port)}
        if moved:
            notes.append("in use here, moved in the copy: " + ", ".join(
                f"{p} ({flag}={moved[flag]})" for p, flag in OTHER_PORTS.items() if flag in moved))
        cfg["provider"]["head_ip"] = "127.0.0.1"
        cfg["provider"]["worker_ips"] = []
        cfg["auth"] = {"ssh_user": USER, "ssh_private_key": str(self.key),
                       # Ray's launcher has no ssh-port setting: ssh reaches the private sshd through nc.
                       "ssh_proxy_command": f"nc 127.0.0.1 {self.ssh_port}"}
        if self.head_port != HEAD_PORT:
            for key in ("head_start_ray_commands", "worker_start_ray_commands"):
                cfg[key] = [c.replace(f"{HEAD_PORT}", f"{self.head_port}") for c in cfg[key]]
        if moved:
            (start,) = cfg["head_start_ray_commands"]
            assert "ray start --head " in start, start
            cfg["head_start_ray_commands"] = [start.replace("ray start --head ", "ray start --head " + " ".join(
                f"{flag}={port}" for flag, port in moved.items()) + " ")]
        changed = [k for k in committed if k not in ("provider", "auth") and cfg[k] != committed[k]]
        allowed = {"head_start_ray_commands"} if moved else set()
        if self.head_port != HEAD_PORT:
            allowed |= {"head_start_ray_commands", "worker_start_ray_commands"}
        if set(changed) != allowed:
            raise StepFailed(f"the copy differs from cluster.yaml in {changed}")
        self.yaml_path.write_text("# cluster.yaml with this machine's address, user and key (launcher_e2e.py)\n"
                                  + yaml.safe_dump(cfg, sort_keys=False, width=200))
        for n in notes:
            print(n, flush=True)
        return "; ".join(notes) or f"head 127.0.0.1:{self.head_port}, no workers, commands as committed"

    def ray_up(self):
        log = self.tmp / "ray_up.log"
        try:
            sh(["ray", "up", "-y", "--no-config-cache", str(self.yaml_path)], log=log, env=self.launcher_env(),
               cwd=REPO, timeout=self.args.up_timeout)
        except StepFailed:
            print(tail(log, 60), flush=True)
            raise
        status = sh(["ray", "exec", str(self.yaml_path), "ray status"], log=None, env=self.launcher_env(),
                    cwd=REPO, check=False, timeout=300)
        text = status.stdout + status.stderr
        with open(log, "a") as f:
            f.write("\n$ ray exec ... 'ray status'\n" + text)
        if "ureid_cluster_slot" not in text:
            raise StepFailed(f"`ray status` on the head shows no ureid_cluster_slot: {text[-1500:]}")
        cpus = next((ln.strip() for ln in text.splitlines() if "CPU" in ln and "/" in ln), "?")
        slots = next((ln.strip() for ln in text.splitlines() if "ureid_cluster_slot" in ln), "?")
        pids = ray_pids(self.uid)
        names = sorted({Path(c.split(" ")[0]).name for c in pids.values()})
        return f"head up ({cpus}; {slots}); {len(pids)} Ray processes of {USER}: {', '.join(names)[:120]}"

    def submit(self):
        log = self.tmp / "ray_submit.log"
        self.mlflow_db = self.tmp / "node" / "mlflow" / "mlflow.db"
        self.uri = f"sqlite:///{self.mlflow_db}"
        sets = [*SHORT, f"data.root={self.tmp / 'node' / 'data' / 'synthetic-tiny'}",
                f"output_dir={self.tmp / 'node' / 'runs'}", f"tracking.tracking_uri={self.uri}",
                "tracking.experiment=launcher-e2e", "tracking.run_name=launcher-e2e"]
        # The config path as the README writes it: `ray submit` runs the script in the node user's home,
        # where ureid falls back to the packaged configs.
        cmd = ["ray", "submit", str(self.yaml_path), "experiments/buc.py", "--config", "experiments/configs/buc_cpu.yaml",
               *[a for s in sets for a in ("--set", s)]]
        print(" ".join(cmd), flush=True)
        p = sh(cmd, log=log, env=self.launcher_env(), cwd=REPO, check=False, timeout=self.args.submit_timeout)
        if p.returncode != 0:
            print(tail(log, 60), flush=True)
            raise StepFailed(f"ray submit exited {p.returncode}: see {log}")
        return "exit 0"

    def check_mlflow(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name("launcher-e2e")
        if exp is None:
            raise StepFailed(f"no experiment launcher-e2e in {self.uri}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise StepFailed("no run in experiment launcher-e2e")
        run = runs[0]
        self.run_id = run.info.run_id
        missing = [m for m in STAGE_METRICS if [h.step for h in client.get_metric_history(self.run_id, m)] != [0]]
        if run.info.status != "FINISHED" or missing:
            raise StepFailed(f"run {self.run_id}: status {run.info.status}, stage metrics missing at step 0: {missing}")
        m = run.data.metrics
        shown = ", ".join(f"{k} {m[k]:.4g}" for k in STAGE_METRICS if k in m)
        return f"run {self.run_id} FINISHED, method {run.data.tags.get('method')}; stage 0: {shown}"

    def stop(self):
        notes = []
        if self.uid >= 0:
            pids = ray_pids(self.uid)
            heads = sorted(p for p, c in pids.items() if "gcs_server" in c or "raylet" in c)
            print(f"head processes (gcs_server, raylet): {heads}; all Ray processes of {USER}: {sorted(pids)}",
                  flush=True)
            # `ray stop`'s order and grace (16 s over three groups): the raylet, then the rest (dashboard,
            # agents, monitor, workers), the GCS last; each group SIGTERM, then SIGKILL what is left.
            raylet = [p for p in pids if "/raylet" in pids[p].split(" ")[0]]
            gcs = [p for p in pids if "gcs_server" in pids[p].split(" ")[0]]
            rest = [p for p in pids if p not in raylet + gcs]
            killed = [k for group in (raylet, rest, gcs) for k in kill_pids(group, timeout=16 / 3)]
            notes.append(f"{len(pids)} Ray processes of {USER} stopped by PID (gcs/raylet {heads})" + (
                f", SIGKILL after the grace for {', '.join(Path(pids[p].split(' ')[0]).name for p in killed)}"
                if killed else ""))
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
            notes.append(f"sshd {self.sshd.pid} stopped")
        if self.uid >= 0:
            rest = user_pids(self.uid)  # ssh sessions the sshd leaves behind (ControlMaster): ours too
            if rest:
                kill_pids(list(rest), timeout=10)
                notes.append(f"{len(rest)} leftover session processes of {USER} stopped")
            rest = user_pids(self.uid)
            if rest:
                raise StepFailed(f"processes of {USER} still running: {rest}")
        ours = user_pids(contains=str(self.tmp))  # the launcher's ssh ControlMaster processes use our key
        if ours:
            kill_pids(list(ours), timeout=10)
            notes.append(f"{len(ours)} launcher-side ssh processes stopped")
        # The launcher's ssh control folders (/tmp/ray_ssh_<user>/<cluster>) of this run, once their masters
        # have removed their sockets.
        for d in Path("/tmp").glob("ray_ssh_*/*"):
            deadline = time.time() + 10
            while d.is_dir() and any(d.iterdir()) and time.time() < deadline:
                time.sleep(0.2)
            if d.is_dir() and not any(d.iterdir()) and d.stat().st_mtime >= self.started:
                d.rmdir()
                if not any(d.parent.iterdir()):
                    d.parent.rmdir()
        return "; ".join(notes) or "nothing to stop"

    def remove_user(self):
        sh(["userdel", "--remove", USER], check=False)
        return f"user {USER} and its home removed"

    def run(self) -> int:
        ok = True
        try:
            for name, fn in (("packages", self.packages), ("sshd", self.ssh_setup), ("token", self.token),
                             ("cluster yaml", self.write_yaml), ("ray up", self.ray_up),
                             ("ray submit", self.submit), ("mlflow", self.check_mlflow)):
                self.step(name, fn)
        except BaseException:  # noqa: BLE001
            ok = False
        finally:
            try:
                self.step("stop (by PID)", self.stop)
            except BaseException:  # noqa: BLE001
                ok = False
            if self.args.remove_user:
                self.step("remove user", self.remove_user)
        print("\n| step | wall time | result |\n|---|---|---|")
        for name, t, result in self.rows:
            print(f"| {name} | {t:.1f} s | {result} |")
        print(f"\n{'PASSED' if ok else 'FAILED'}; logs in {self.tmp}" + ("" if self.args.keep_tmp or not ok else
                                                                          " (removed)"))
        if ok and not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (always kept on failure)")
    p.add_argument("--remove-user", action="store_true", help=f"delete {USER} and its home at the end")
    p.add_argument("--up-timeout", type=int, default=3600, help="seconds for `ray up` (default 3600)")
    p.add_argument("--submit-timeout", type=int, default=1800, help="seconds for `ray submit` (default 1800)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it installs packages, creates a user and starts an sshd")
    if not shutil.which("ray", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"):
        sys.exit("`ray` not found: run with the project's venv python")
    return E2E(args).run()


if __name__ == "__main__":
    sys.exit(main())
