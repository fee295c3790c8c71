#!/usr/bin/env python3
"""tests/deploy/test_deploy.py - deploy/docker and deploy/k8s agree with the code.

Usage: test_deploy.py [--mutations]
  MAILPUMP_SOURCE_DIR  repository root (default: two levels up from this file)
  MAILPUMP_BUILD_DIR   build tree holding mailpumpd and mailpump (default: ROOT/build)

Checks (each prints "ok" or "FAIL" with the reason; any FAIL exits 1):
  yaml          every YAML document under deploy/k8s parses and names apiVersion,
                kind, metadata.name; kustomization resources exist; files left out
                of it are named in it; `kubectl kustomize` renders (when kubectl exists)
  env_keys      every MAILPUMP_* name in deploy/k8s and deploy/docker is a real key:
                the list comes from the daemon itself (`mailpumpd --check-config`
                prints every key of core/config.c's table)
  check_config  the real daemon accepts the ConfigMap's mailpumpd.ini: the pod is
                simulated (ConfigMap and example Secrets written where the
                Deployment mounts them, env resolved from the Secrets) and
                `mailpumpd --config ... --check-config` must exit 0; every file
                the ini names must come from a volume mount; the image's own
                default ini must pass too
  probes        [metrics] listen is on all interfaces and its port is the one the
                liveness (/healthz) and readiness (/readyz) probes, the container
                port, the scrape annotations, the Service and EXPOSE use
  drain         terminationGracePeriodSeconds exceeds the effective
                [worker] shutdown_grace_ms by at least 5 s
  workers       [worker] count is explicit (0 = the node's CPUs, not the pod's
                limit) and not above the CPU limit
  scaling       the KEDA ScaledObject targets the Deployment, watches the queue
                mailpumpd consumes, and its broker URL (from the Secret) names the
                same host, port, vhost and credentials; the CPU HPA alternative
                targets the Deployment and is not applied together with KEDA
  selectors     Service, PodDisruptionBudget and spread selectors match the pods
  security      non-root (the Dockerfile's numeric USER = runAsUser), read-only
                root filesystem, no privilege escalation, capabilities dropped
  dockerfile    debian:12 build stage, debian:12-slim runtime stage, Release
                build, both binaries copied, the module folders CMakeLists.txt
                compiles are copied and not in .dockerignore
  runtime_libs  the runtime stage's packages provide every shared library `ldd`
                reports for the built mailpumpd and mailpump (dpkg -S maps each to
                its Debian package; a library the binaries link directly must
                come from a listed package, the others from the dependencies of
                the listed ones; libc6 is in the base image); no -dev packages
  rollout       the Deployment sets no replicas (KEDA owns them) and mounts nothing
                with subPath; its ConfigMap comes from kustomization.yaml's
                configMapGenerator with the hash suffix (a config change rolls the
                pods); PDB unhealthyPodEvictionPolicy AlwaysAllow; KEDA fallback
  memory        request = limit, and the worst case of the memory model
                (docs/operations.md, Memory) fits the limit: limit/4 in flight +
                one 3 x max_size overshoot per worker + limit/8 sessions + 64 MiB
                base; the auto in-flight budget is not below its floor
  netpol        the NetworkPolicy's egress ports are exactly DNS, SMTP 25/465/587
                and the ports mailpumpd.ini connects to (AMQP, management, Redis,
                IMAP); ingress allows the metrics port (and [api] listen's)
  monitoring    every metric a PrometheusRule names is in metrics/metrics.c or
                metrics/ops.c (tests/deploy/test_monitoring.py checks more);
                alerts have for: and severity; the ServiceMonitor selects the
                metrics Service and its port
  build_pkgs    the build stage installs the package of every pkg-config module
                CMakeLists.txt requires (cmocka only with the tests), plus cmake,
                pkg-config and a compiler, all of them in tests/run's BUILD_PKGS

--mutations copies the deploy files to a temporary tree, breaks one thing at a
time and asserts that the check responsible for it fails (and that the
unbroken copy passes): the test of the test.
"""
import base64
import configparser
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.environ.get("MAILPUMP_SOURCE_DIR") or os.path.join(HERE, "..", ".."))
BUILD = os.path.abspath(os.environ.get("MAILPUMP_BUILD_DIR") or os.path.join(SRC, "build"))
MAILPUMPD = os.path.join(BUILD, "mailpumpd")
MAILPUMP = os.path.join(BUILD, "mailpump")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DRAIN_MARGIN_S = 5
# YAML files deliberately left out of kustomization.yaml
UNLISTED_OK = {"secret-examples.yaml", "hpa-cpu.yaml"}
# kustomize components under deploy/k8s (optional, named in kustomization.yaml)
COMPONENT_DIRS = ["monitoring"]
# resident memory besides the budgets: code, TLS contexts, DNS caches, buffers
BASE_RSS = 64 << 20
# keys whose value is a file the pod must have
PATH_KEYS = [("imap", "accounts_file"), ("dkim", "keys_file"), ("smtp", "ca_file"),
             ("imap", "ca_file")]


class CheckFailed(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def env_name(section, key):
    return ("MAILPUMP_%s_%s" % (section, key)).upper()


# ---------------------------------------------------------------- host facts (cached)

@functools.lru_cache(maxsize=None)
def daemon_keys():
    """Every (section, key) of the config table, from the daemon's own dump."""
    r = run([MAILPUMPD, "--check-config"], env={"PATH": CLEAN_PATH})
    if r.returncode != 0:
        raise CheckFailed("mailpumpd --check-config with defaults failed: %s" % r.stderr.strip())
    keys, section = set(), None
    for line in r.stdout.splitlines():
        m = re.match(r"^\[(\w+)\]$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^(\w+) = ", line)
        if m and section:
            keys.add((section, m.group(1)))
    if len(keys) < 20:
        raise CheckFailed("could not read the key list from mailpumpd --check-config")
    return frozenset(keys)


_OWNERS = {}


def path_spellings(path):
    """The spellings dpkg may have recorded for a file on a /usr-merged system."""
    cands = [path, os.path.realpath(path)]
    for p in list(cands):
        cands.append(p[4:] if p.startswith("/usr/") else "/usr" + p)
    return cands


def dpkg_owners(paths):
    """Look many files up in one dpkg -S call (each call reads the whole database)."""
    todo = sorted({c for p in paths for c in path_spellings(p)} - set(_OWNERS))
    if not todo:
        return
    r = run(["dpkg", "-S"] + todo)
    for line in r.stdout.splitlines():
        m = re.match(r"^([^\s,:]+)(?::[\w-]+)?(?:, [^:]+)*: (/\S+)$", line)
        if m:
            _OWNERS[m.group(2)] = m.group(1)
    for c in todo:
        _OWNERS.setdefault(c, None)


def dpkg_owner(path):
    """Debian package owning a file, or None."""
    dpkg_owners([path])
    for c in path_spellings(path):
        if _OWNERS.get(c):
            return _OWNERS[c]
    return None


@functools.lru_cache(maxsize=None)
def pkg_depends(pkg):
    r = run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", pkg])
    if r.returncode != 0:
        return ()
    out = []
    for alt in r.stdout.split(","):
        for name in alt.split("|"):
            n = name.strip().split(" ")[0].split(":")[0]
            if n:
                out.append(n)
    return tuple(out)


def depends_closure(pkgs):
    seen, stack = set(), list(pkgs)
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(pkg_depends(p))
    return seen


@functools.lru_cache(maxsize=None)
def ldd(binary):
    r = run(["ldd", binary])
    if r.returncode != 0:
        raise CheckFailed("ldd %s: %s" % (binary, r.stderr.strip()))
    libs = {}
    for line in r.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise CheckFailed("ldd %s: %s" % (binary, line))
        m = re.match(r"^(\S+) => (/\S+)", line)
        if m:
            libs[m.group(1)] = m.group(2)
        elif line.startswith("/"):
            libs[os.path.basename(line.split()[0])] = line.split()[0]
    return libs


@functools.lru_cache(maxsize=None)
def needed(binary):
    r = run(["readelf", "-d", binary])
    if r.returncode != 0:
        raise CheckFailed("readelf -d %s: %s" % (binary, r.stderr.strip()))
    return frozenset(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout))


_KEYDIR = tempfile.mkdtemp(prefix="mp-deploy-keys-")


@functools.lru_cache(maxsize=None)
def generated_key(alg):
    """A throwaway private key for a DKIM placeholder (the example ships none)."""
    path = os.path.join(_KEYDIR, alg + ".pem")
    if alg.startswith("rsa"):
        argv = ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    else:
        argv = ["openssl", "genpkey", "-algorithm", "ED25519"]
    r = run(argv + ["-out", path])
    if r.returncode != 0:
        raise CheckFailed("openssl genpkey: %s" % r.stderr.strip())
    with open(path) as f:
        return f.read()


# ---------------------------------------------------------------- the tree under test

def parse_dockerfile(text):
    """Stages of a Dockerfile: [{'from', 'name', 'instr': [(INSTR, args)]}]."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    if cur.strip():
        lines.append(cur.strip())
    stages = []
    for ln in lines:
        instr, _, args = ln.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            stages.append({"from": parts[0], "name": name, "instr": []})
        elif stages:
            stages[-1]["instr"].append((instr, args.strip()))
    return stages


def apt_packages(stage):
    pkgs = []
    for instr, args in stage["instr"]:
        if instr != "RUN":
            continue
        for m in re.finditer(r"apt-get\s+install\s+(.*?)(?:&&|;|\|\||$)", args):
            pkgs += [t for t in m.group(1).split() if not t.startswith("-")]
    return pkgs


class Tree:
    """The deploy files of one source tree, loaded once."""

    def __init__(self, root):
        self.root = root
        self.k8s = os.path.join(root, "deploy", "k8s")
        self.docker = os.path.join(root, "deploy", "docker")
        self.docs = []          # (file relative to deploy/k8s, doc)
        self.load_errors = []
        names = sorted(os.listdir(self.k8s))
        for sub in COMPONENT_DIRS:
            if os.path.isdir(os.path.join(self.k8s, sub)):
                names += [sub + "/" + n for n in sorted(os.listdir(os.path.join(self.k8s, sub)))]
        for name in names:
            if not name.endswith((".yaml", ".yml")):
                continue
            try:
                with open(os.path.join(self.k8s, name)) as f:
                    for doc in yaml.safe_load_all(f):
                        if doc is not None:
                            self.docs.append((name, doc))
            except yaml.YAMLError as e:
                self.load_errors.append("%s: %s" % (name, str(e).replace("\n", " ")))
        self.generated = self.generated_configmaps()
        with open(os.path.join(self.docker, "Dockerfile")) as f:
            self.stages = parse_dockerfile(f.read())
        self.effective = None   # filled by check_config

    def kustomization(self):
        with open(os.path.join(self.k8s, "kustomization.yaml")) as f:
            return yaml.safe_load(f) or {}

    def generated_configmaps(self):
        """The ConfigMaps kustomization.yaml's configMapGenerator makes, as documents."""
        try:
            gens = self.kustomization().get("configMapGenerator") or []
        except (OSError, yaml.YAMLError):
            return []
        out = []
        for g in gens:
            data = {}
            for spec in g.get("files") or []:
                key, _, path = spec.rpartition("=")
                with open(os.path.join(self.k8s, path)) as f:
                    data[key or os.path.basename(path)] = f.read()
            for lit in g.get("literals") or []:
                k, _, v = lit.partition("=")
                data[k] = v
            out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]},
                        "data": data, "generated": True})
        return out

    def kind(self, kind, name=None, files=None):
        out = [d for f, d in self.docs if isinstance(d, dict) and d.get("kind") == kind
               and (name is None or d.get("metadata", {}).get("name") == name)
               and (files is None or f in files)]
        if files is None:
            out += [d for d in self.generated if d["kind"] == kind
                    and (name is None or d["metadata"]["name"] == name)]
        return out

    def listed(self):
        return set(self.kustomization().get("resources", []))

    def deployment(self):
        deps = self.kind("Deployment")
        need(len(deps) == 1, "expected one Deployment, found %d" % len(deps))
        return deps[0]

    def pod(self):
        return self.deployment()["spec"]["template"]["spec"]

    def container(self):
        cs = [c for c in self.pod()["containers"] if "mailpumpd" in c.get("name", "")]
        need(len(cs) == 1, "expected one container named mailpumpd")
        return cs[0]

    def secret_value(self, name, key):
        for s in self.kind("Secret", name):
            if key in (s.get("stringData") or {}):
                return str(s["stringData"][key])
            if key in (s.get("data") or {}):
                return base64.b64decode(s["data"][key]).decode()
        return None

    def volume_files(self, vol):
        """key -> content of a ConfigMap/Secret volume; {} for emptyDir; None if unknown."""
        if "configMap" in vol:
            cms = self.kind("ConfigMap", vol["configMap"]["name"])
            need(cms, "volume %s: ConfigMap %s not in the manifests" %
                 (vol["name"], vol["configMap"]["name"]))
            files = dict(cms[0].get("data") or {})
            items = vol["configMap"].get("items")
        elif "secret" in vol:
            ss = self.kind("Secret", vol["secret"]["secretName"])
            need(ss, "volume %s: Secret %s has no example in secret-examples.yaml" %
                 (vol["name"], vol["secret"]["secretName"]))
            files = {k: str(v) for k, v in (ss[0].get("stringData") or {}).items()}
            for k, v in (ss[0].get("data") or {}).items():
                files[k] = base64.b64decode(v).decode()
            items = vol["secret"].get("items")
        elif "emptyDir" in vol:
            return {}
        else:
            return None
        if items:
            files = {it["path"]: files[it["key"]] for it in items if it["key"] in files}
        return files

    def dockerfile_stage(self, which):
        need(len(self.stages) >= 2, "Dockerfile: expected a build and a runtime stage")
        return self.stages[0] if which == "build" else self.stages[-1]

    def entrypoint_argv(self):
        rt = self.dockerfile_stage("runtime")
        ep = [a for i, a in rt["instr"] if i == "ENTRYPOINT"]
        need(ep, "Dockerfile: runtime stage has no ENTRYPOINT")
        argv = yaml.safe_load(ep[-1])   # exec form is a JSON array
        need(isinstance(argv, list), "Dockerfile: ENTRYPOINT must be the exec (JSON) form")
        c = self.container()
        if c.get("command"):
            argv = list(c["command"])
        return argv + list(c.get("args") or [])


def cpu_quantity(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def metrics_port(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    listen = tree.effective["metrics"]["listen"]
    host, _, port = listen.rpartition(":")
    need(host and port.isdigit(), "[metrics] listen = %r is not host:port" % listen)
    return host.strip("[]"), int(port)


def container_port(tree, port):
    """A probe/Service port (number or name) as the container port number."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in tree.container().get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise CheckFailed("port name %r is not a port of the container" % port)


# ---------------------------------------------------------------- checks

def check_yaml(tree):
    need(not tree.load_errors, "; ".join(tree.load_errors))
    for f, d in tree.docs:
        need(isinstance(d, dict), "%s: a document is not a mapping" % f)
        if os.path.basename(f) == "kustomization.yaml":
            continue
        for k in ("apiVersion", "kind"):
            need(d.get(k), "%s: document without %s" % (f, k))
        need((d.get("metadata") or {}).get("name"), "%s: %s without metadata.name" % (f, d["kind"]))
    listed = tree.listed()
    with open(os.path.join(tree.k8s, "kustomization.yaml")) as f:
        ktext = f.read()
    for r in listed:
        need(os.path.exists(os.path.join(tree.k8s, r)), "kustomization resource %s missing" % r)
    for name in os.listdir(tree.k8s):
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml" and name not in listed:
            need(name in UNLISTED_OK and name in ktext,
                 "%s is neither in kustomization.yaml's resources nor named there as left out" % name)
    for sub in COMPONENT_DIRS:
        kpath = os.path.join(tree.k8s, sub, "kustomization.yaml")
        need(os.path.exists(kpath), "component %s/ has no kustomization.yaml" % sub)
        with open(kpath) as f:
            comp = yaml.safe_load(f)
        need(comp.get("kind") == "Component", "%s/kustomization.yaml is not a kustomize Component" % sub)
        for r in comp.get("resources", []):
            need(os.path.exists(os.path.join(tree.k8s, sub, r)), "component %s: resource %s missing" %
                 (sub, r))
        for name in os.listdir(os.path.join(tree.k8s, sub)):
            need(name == "kustomization.yaml" or name in comp.get("resources", []),
                 "%s/%s is not in the component's resources" % (sub, name))
        need(re.search(r"^#?\s*-\s*%s\s*$" % re.escape(sub), ktext, re.M),
             "component %s/ is not named in kustomization.yaml's components" % sub)
    note = "%d documents" % len(tree.docs)
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = run([kubectl, "kustomize", tree.k8s])
        need(r.returncode == 0, "kubectl kustomize: %s" % r.stderr.strip())
        rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
        kinds = [d["kind"] for d in rendered]
        need("Deployment" in kinds, "kubectl kustomize rendered no Deployment")
        note += ", kubectl kustomize renders %d" % len(kinds)
        # the generated ConfigMap's hashed name must be what the pods mount
        cms = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
        for d in rendered:
            if d["kind"] == "Deployment":
                for v in d["spec"]["template"]["spec"].get("volumes", []):
                    if "configMap" in v:
                        need(v["configMap"]["name"] in cms, "rendered Deployment mounts ConfigMap %s, "
                             "which is not rendered" % v["configMap"]["name"])
    else:
        note += " (kubectl not installed: kustomize rendering not checked)"
    return note


def check_env_keys(tree):
    valid = {env_name(s, k) for s, k in daemon_keys()}
    seen = set()
    for d in (tree.k8s, tree.docker):
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            for m in re.finditer(r"MAILPUMP_[A-Z0-9_]*[A-Z0-9](_?\*)?", text):
                tok = m.group(0)
                if text[max(0, m.start() - 2):m.start()] == "-D":
                    continue    # a CMake option (-DMAILPUMP_TESTS=OFF), not a config key
                if tok.endswith("*"):
                    prefix = tok.rstrip("*")
                    need(any(v.startswith(prefix) for v in valid),
                         "%s: %s matches no configuration key" % (name, tok))
                else:
                    need(tok in valid, "%s: %s is not a configuration key (MAILPUMP_<SECTION>_<KEY>"
                         " of core/config.c)" % (name, tok))
                seen.add(tok)
    for e in tree.container().get("env", []):
        if e["name"].startswith("MAILPUMP_"):
            need(e["name"] in valid, "container env %s is not a configuration key" % e["name"])
    return "%d keys known to the daemon; %d MAILPUMP_* names used" % (len(valid), len(seen))


def resolve_env(tree):
    env = {}
    c = tree.container()
    for src in c.get("envFrom", []):
        if "secretRef" in src:
            ss = tree.kind("Secret", src["secretRef"]["name"])
            need(ss or src["secretRef"].get("optional"), "envFrom Secret %s has no example" %
                 src["secretRef"]["name"])
            for s in ss:
                env.update({k: str(v) for k, v in (s.get("stringData") or {}).items()})
        if "configMapRef" in src:
            for cm in tree.kind("ConfigMap", src["configMapRef"]["name"]):
                env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        vf = e.get("valueFrom", {})
        ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
        if ref is None:
            continue
        if "secretKeyRef" in vf:
            v = tree.secret_value(ref["name"], ref["key"])
        else:
            cms = tree.kind("ConfigMap", ref["name"])
            v = (cms[0].get("data") or {}).get(ref["key"]) if cms else None
        need(v is not None or ref.get("optional"),
             "env %s: %s/%s has no example value" % (e["name"], ref["name"], ref["key"]))
        if v is not None:
            env[e["name"]] = v
    return env


def simulate_mounts(tree, root):
    c, vols = tree.container(), {v["name"]: v for v in tree.pod().get("volumes", [])}
    for vm in c.get("volumeMounts", []):
        need(vm["name"] in vols, "volumeMount %s: no such volume" % vm["name"])
        files = tree.volume_files(vols[vm["name"]])
        if files is None:
            continue
        dest = root + vm["mountPath"]
        if vm.get("subPath"):
            need(vm["subPath"] in files, "volumeMount %s: subPath %s is not a key of the volume" %
                 (vm["name"], vm["subPath"]))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w") as f:
                f.write(files[vm["subPath"]])
            continue
        os.makedirs(dest, exist_ok=True)
        for k, v in files.items():
            os.makedirs(os.path.dirname(os.path.join(dest, k)), exist_ok=True)
            with open(os.path.join(dest, k), "w") as f:
                f.write(v)


def read_ini(path):
    cp = configparser.ConfigParser(interpolation=None, strict=False,
                                   comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    with open(path) as f:
        cp.read_string(f.read())
    return cp


def prepare_dkim(root, keys_path, notes):
    """Replace the example's placeholder keys with generated ones; map absolute
    key paths into the simulated root."""
    lines = []
    with open(keys_path) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if len(fields) == 4:
                kp = fields[3]
                sim = root + kp if kp.startswith("/") else os.path.join(os.path.dirname(keys_path), kp)
                if os.path.exists(sim):
                    with open(sim) as kf:
                        if "-----BEGIN" not in kf.read():
                            with open(sim, "w") as out:
                                out.write(generated_key(fields[2].lower()))
                            notes.append("placeholder %s replaced by a generated key" % kp)
                if kp.startswith("/"):
                    line = line.replace(kp, sim, 1)
            lines.append(line)
    with open(keys_path, "w") as f:
        f.writelines(lines)


def check_config(tree):
    notes = []
    # the image's own default file
    r = run([MAILPUMPD, "--config", os.path.join(tree.docker, "mailpumpd.ini"), "--check-config"],
            env={"PATH": CLEAN_PATH})
    need(r.returncode == 0, "deploy/docker/mailpumpd.ini rejected: %s" % r.stderr.strip())
    argv = tree.entrypoint_argv()
    need(argv and os.path.basename(argv[0]) == "mailpumpd", "the container does not run mailpumpd")
    need("--config" in argv or "-c" in argv, "the container's command has no --config")
    i = argv.index("--config") if "--config" in argv else argv.index("-c")
    cfg_path = argv[i + 1]
    need(cfg_path.startswith("/etc/mailpump/"), "config path %s is not under /etc/mailpump" % cfg_path)
    with tempfile.TemporaryDirectory(prefix="mp-deploy-pod-") as root:
        simulate_mounts(tree, root)
        sim_cfg = root + cfg_path
        need(os.path.isfile(sim_cfg), "the Deployment mounts nothing at %s (the ENTRYPOINT's "
             "--config): the pod would run on the image's defaults" % cfg_path)
        env = resolve_env(tree)
        ini = read_ini(sim_cfg)
        for sec, key in PATH_KEYS:
            name = env_name(sec, key)
            val = env.get(name, ini.get(sec, key, fallback=""))
            if not val:
                continue
            need(val.startswith("/"), "[%s] %s = %s: use an absolute path" % (sec, key, val))
            need(os.path.exists(root + val), "[%s] %s = %s is not provided by any volume mount of the "
                 "Deployment (or the mounted Secret lacks that key)" % (sec, key, val))
            env[name] = root + val
            if (sec, key) == ("dkim", "keys_file"):
                prepare_dkim(root, root + val, notes)
        imap_host = env.get("MAILPUMP_IMAP_HOST", ini.get("imap", "host", fallback=""))
        if imap_host:
            # resolved at start-up; cluster and example names do not resolve here
            env["MAILPUMP_IMAP_HOST"] = "127.0.0.1"
            notes.append("[imap] host %s checked as 127.0.0.1" % imap_host)
        full_env = {"PATH": CLEAN_PATH}
        full_env.update(env)
        r = run([MAILPUMPD, "--config", sim_cfg, "--check-config"], env=full_env)
        need(r.returncode == 0, "mailpumpd --check-config rejects the ConfigMap (exit %d): %s" %
             (r.returncode, r.stderr.strip()))
        eff = configparser.ConfigParser(interpolation=None, strict=False)
        eff.read_string("\n".join(l for l in r.stdout.splitlines() if not l.startswith("#")))
        tree.effective = eff
    m = re.search(r"\((\d+) IMAP accounts\)", r.stdout)
    notes.insert(0, "mailpumpd --check-config exit 0, %s IMAP accounts" % (m.group(1) if m else "?"))
    return "; ".join(notes)


def check_probes(tree):
    host, port = metrics_port(tree)
    need(host in ("0.0.0.0", "::"), "[metrics] listen host %s: kubelet probes and Prometheus "
         "connect to the pod IP, listen on 0.0.0.0" % host)
    c = tree.container()
    need(any(int(p["containerPort"]) == port for p in c.get("ports", [])),
         "no containerPort %d ([metrics] listen)" % port)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet")
        need(hg, "%s is not an httpGet probe" % probe)
        need(hg.get("path") == path, "%s path %s, expected %s" % (probe, hg.get("path"), path))
        need(container_port(tree, hg["port"]) == port, "%s port %s is not the metrics port %d" %
             (probe, hg["port"], port))
    ann = tree.deployment()["spec"]["template"]["metadata"].get("annotations", {})
    need(ann.get("prometheus.io/scrape") == "true", "pod annotation prometheus.io/scrape missing")
    need(str(ann.get("prometheus.io/port")) == str(port), "prometheus.io/port %s != %d" %
         (ann.get("prometheus.io/port"), port))
    need(ann.get("prometheus.io/path", "/metrics") == "/metrics", "prometheus.io/path is not /metrics")
    svcs = tree.kind("Service")
    need(svcs, "no metrics Service")
    for s in svcs:
        for p in s["spec"]["ports"]:
            need(container_port(tree, p.get("targetPort", p["port"])) == port,
                 "Service %s targetPort %s is not the metrics port" % (s["metadata"]["name"], p.get("targetPort")))
    exposed = [a for i, a in tree.dockerfile_stage("runtime")["instr"] if i == "EXPOSE"]
    need(any(str(port) in a.split() or "%d/tcp" % port in a.split() for a in exposed),
         "Dockerfile EXPOSE %s does not include %d" % (exposed, port))
    dini = read_ini(os.path.join(tree.docker, "mailpumpd.ini"))
    need(dini.get("metrics", "listen", fallback="").endswith(":%d" % port),
         "deploy/docker/mailpumpd.ini [metrics] listen is not on port %d" % port)
    return "metrics on %s:%d; probes, annotations, Service and EXPOSE agree" % (host, port)


def check_drain(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    grace_ms = int(tree.effective["worker"]["shutdown_grace_ms"])
    tgps = int(tree.pod().get("terminationGracePeriodSeconds", 30))
    need(tgps * 1000 >= grace_ms + DRAIN_MARGIN_S * 1000,
         "terminationGracePeriodSeconds %d s does not exceed [worker] shutdown_grace_ms %d ms by "
         "%d s: Kubernetes would SIGKILL a draining worker" % (tgps, grace_ms, DRAIN_MARGIN_S))
    return "terminationGracePeriodSeconds %d s > shutdown_grace_ms %d ms + %d s" % (
        tgps, grace_ms, DRAIN_MARGIN_S)


def check_workers(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    count = int(tree.effective["worker"]["count"])
    need(count >= 1, "[worker] count = 0 means the node's CPU count, not the pod's CPU limit")
    lim = ((tree.container().get("resources") or {}).get("limits") or {}).get("cpu")
    if lim is not None:
        need(count <= math.ceil(cpu_quantity(lim)), "[worker] count %d exceeds the CPU limit %s" %
             (count, lim))
    return "%d workers per pod, CPU limit %s" % (count, lim)


def check_scaling(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    eff = tree.effective
    dep = tree.deployment()["metadata"]["name"]
    listed = tree.listed()
    sos = tree.kind("ScaledObject")
    need(len(sos) == 1, "expected one KEDA ScaledObject, found %d" % len(sos))
    so = sos[0]
    tgt = so["spec"]["scaleTargetRef"]
    need(tgt.get("kind", "Deployment") == "Deployment" and tgt["name"] == dep,
         "ScaledObject targets %s, not Deployment %s" % (tgt, dep))
    need(so["spec"].get("minReplicaCount", 0) >= 1, "minReplicaCount < 1")
    trig = [t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq"]
    need(trig, "no rabbitmq trigger")
    md = trig[0]["metadata"]
    need(md.get("queueName") == eff["amqp"]["queue"], "ScaledObject watches queue %r, mailpumpd "
         "consumes %r" % (md.get("queueName"), eff["amqp"]["queue"]))
    need(md.get("mode", "QueueLength") == "QueueLength", "trigger mode is not QueueLength")
    need(float(md.get("value", 0)) > 0, "trigger value must be > 0")
    auth = trig[0].get("authenticationRef", {}).get("name")
    tas = tree.kind("TriggerAuthentication", auth)
    need(tas, "authenticationRef %s: no such TriggerAuthentication" % auth)
    host = [s for s in tas[0]["spec"].get("secretTargetRef", []) if s["parameter"] == "host"]
    need(host, "TriggerAuthentication gives no host parameter")
    url = tree.secret_value(host[0]["name"], host[0]["key"])
    need(url, "Secret %s/%s has no example value" % (host[0]["name"], host[0]["key"]))
    u = urllib.parse.urlsplit(url)
    need(u.scheme in ("amqp", "amqps"), "broker URL scheme %s (protocol amqp expected)" % u.scheme)
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    pairs = [("host", u.hostname, eff["amqp"]["host"]),
             ("port", str(u.port or 5672), eff["amqp"]["port"]),
             ("vhost", vhost, eff["amqp"]["vhost"]),
             ("user", urllib.parse.unquote(u.username or ""), eff["amqp"]["user"])]
    for what, a, b in pairs:
        need(a == b, "KEDA's broker URL %s %r != mailpumpd's [amqp] %s %r" % (what, a, what, b))
    pw = resolve_env(tree).get("MAILPUMP_AMQP_PASSWORD")
    if pw is not None:
        need(urllib.parse.unquote(u.password or "") == pw,
             "KEDA's broker URL password differs from MAILPUMP_AMQP_PASSWORD")
    for h in tree.kind("HorizontalPodAutoscaler"):
        need(h["spec"]["scaleTargetRef"]["name"] == dep, "HPA targets %s" % h["spec"]["scaleTargetRef"])
    files = {f for f, d in tree.docs if isinstance(d, dict)
             and d.get("kind") in ("ScaledObject", "HorizontalPodAutoscaler")}
    need(len(files & listed) <= 1, "kustomization.yaml applies both KEDA and a plain HPA: %s" %
         sorted(files & listed))
    return "KEDA on %s (target %s ready msgs/pod, %s..%s pods) via %s://%s:%s" % (
        md["queueName"], md.get("value"), so["spec"].get("minReplicaCount"),
        so["spec"].get("maxReplicaCount"), u.scheme, u.hostname, u.port)


def check_selectors(tree):
    d = tree.deployment()
    labels = d["spec"]["template"]["metadata"]["labels"]

    def matches(sel, what):
        need(sel, "%s has an empty selector" % what)
        for k, v in sel.items():
            need(labels.get(k) == v, "%s selects %s=%s, the pods have %s" % (what, k, v, labels.get(k)))

    matches(d["spec"]["selector"]["matchLabels"], "Deployment")
    for s in tree.kind("Service"):
        matches(s["spec"].get("selector"), "Service %s" % s["metadata"]["name"])
    pdbs = tree.kind("PodDisruptionBudget")
    need(pdbs, "no PodDisruptionBudget")
    for p in pdbs:
        matches(p["spec"]["selector"].get("matchLabels"), "PodDisruptionBudget")
    for t in tree.pod().get("topologySpreadConstraints", []):
        matches(t["labelSelector"].get("matchLabels"), "topologySpreadConstraint")
    return "pods %s" % ",".join("%s=%s" % kv for kv in sorted(labels.items()))


def check_security(tree):
    users = [a for i, a in tree.dockerfile_stage("runtime")["instr"] if i == "USER"]
    need(users, "Dockerfile runtime stage has no USER")
    uid = users[-1].split(":")[0]
    need(uid.isdigit() and int(uid) != 0, "Dockerfile USER %s: use a numeric non-root uid "
         "(runAsNonRoot cannot check a name)" % users[-1])
    psc, csc = tree.pod().get("securityContext", {}), tree.container().get("securityContext", {})
    need(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "runAsNonRoot is not set")
    ru = csc.get("runAsUser", psc.get("runAsUser"))
    need(ru is None or int(ru) == int(uid), "runAsUser %s != the image's USER %s" % (ru, uid))
    need(ru is None or int(ru) != 0, "runAsUser 0")
    need(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    need(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    need("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), "capabilities are not dropped")
    return "uid %s, read-only root, no escalation, capabilities dropped" % uid


def cmake_dirs(root):
    """Top-level source folders CMakeLists.txt compiles (tests excluded)."""
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        text = f.read()
    dirs = set(re.findall(r"CONFIGURE_DEPENDS\s+([a-z_]+)/\*\.c", text))
    dirs |= set(re.findall(r"add_executable\(\s*\w+\s+([a-z_]+)/\w+\.c", text))
    return dirs


def check_dockerfile(tree):
    b, rt = tree.dockerfile_stage("build"), tree.dockerfile_stage("runtime")
    need(b["from"] == "debian:12", "build stage FROM %s, expected debian:12" % b["from"])
    need(rt["from"] == "debian:12-slim", "runtime stage FROM %s, expected debian:12-slim" % rt["from"])
    with open("/etc/debian_version") as f:
        need(f.read().startswith("12"), "this host is not Debian 12: the package checks would not "
             "describe the image")
    runs = " ".join(a for i, a in b["instr"] if i == "RUN")
    need(re.search(r"-DCMAKE_BUILD_TYPE=Release\b", runs), "build stage does not build Release")
    copies = [a for i, a in b["instr"] if i == "COPY"]
    srcs = set()
    for a in copies:
        parts = [p for p in a.split() if not p.startswith("--")]
        srcs |= {p.rstrip("/") for p in parts[:-1]}
    need("CMakeLists.txt" in srcs or "." in srcs, "build stage does not copy CMakeLists.txt")
    with open(os.path.join(tree.root, ".dockerignore")) as f:
        ignored = {l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")}
    for d in sorted(cmake_dirs(tree.root)):
        need(d in srcs or "." in srcs, "build stage does not COPY %s/ (CMakeLists.txt compiles it)" % d)
        need(d not in ignored, ".dockerignore excludes %s/, which the build needs" % d)
    rcopies = " ".join(a for i, a in rt["instr"] if i == "COPY" and "--from=" in a)
    for binary in ("mailpumpd", "mailpump"):
        need(re.search(r"/%s(\s|$)" % binary, rcopies), "runtime stage does not copy %s" % binary)
    return "build debian:12 (Release), runtime debian:12-slim; copies %s" % ", ".join(sorted(srcs))


def check_runtime_libs(tree):
    pkgs = apt_packages(tree.dockerfile_stage("runtime"))
    need(pkgs, "runtime stage installs no packages")
    bad = [p for p in pkgs if p.endswith("-dev") or p in ("build-essential", "gcc", "cmake")]
    need(not bad, "runtime stage installs build packages: %s" % bad)
    need("ca-certificates" in pkgs, "runtime stage lacks ca-certificates (IMAP always verifies)")
    closure = depends_closure(pkgs)
    problems, mapped, sanitizer = [], {}, set()
    dpkg_owners([p for b in (MAILPUMPD, MAILPUMP) for p in ldd(b).values()])
    for binary in (MAILPUMPD, MAILPUMP):
        direct = needed(binary)
        libs = ldd(binary)
        # A -DSANITIZE build tree (tests/run's second pass): the sanitizer
        # runtimes and what only they pull in (libstdc++, ...) are not in the
        # image, which builds without them.
        san = {so for so in libs if re.match(r"lib(asan|ubsan|tsan|lsan)\.so", so)}
        san_deps = {d for so in san for d in ldd(libs[so])} - direct
        for soname, path in sorted(libs.items()):
            if soname.startswith("linux-vdso"):
                continue
            if soname in san or soname in san_deps:
                sanitizer.add(soname)
                continue
            pkg = dpkg_owner(path)
            if pkg is None:
                problems.append("%s: no Debian package owns %s" % (soname, path))
                continue
            if pkg == "libc6":
                continue    # libc, libm, ld-linux: in every Debian base image
            mapped[soname] = pkg
            if soname in direct and pkg not in pkgs:
                problems.append("%s links %s (package %s), not installed by the runtime stage" %
                                (os.path.basename(binary), soname, pkg))
            elif pkg not in closure:
                problems.append("%s needs %s (package %s), not pulled in by the runtime packages" %
                                (os.path.basename(binary), soname, pkg))
    need(not problems, "; ".join(problems))
    return "%d libraries -> %s%s" % (len(mapped), " ".join(sorted(set(mapped.values()))),
                                     " (ignored: %s)" % " ".join(sorted(sanitizer)) if sanitizer else "")


def tests_run_pkgs(root):
    with open(os.path.join(root, "tests", "run")) as f:
        m = re.search(r"BUILD_PKGS=\(([^)]*)\)", f.read())
    need(m, "tests/run: no BUILD_PKGS=( ... )")
    return set(m.group(1).split())


def cmake_pkg_modules(root):
    """[(module, conditions)] of every pkg_check_modules(... REQUIRED ...)."""
    out, conds = [], []
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        for line in f:
            s = line.split("#", 1)[0].strip()
            m = re.match(r"(if|elseif|else|endif)\s*\((.*)\)\s*$", s, re.I)
            if m:
                kw = m.group(1).lower()
                if kw == "if":
                    conds.append(m.group(2).strip())
                elif kw == "endif":
                    conds.pop()
                else:
                    conds[-1] = "NOT (%s)" % conds[-1]
                continue
            m = re.match(r"pkg_check_modules\s*\((.*)\)", s, re.I)
            if m:
                args = m.group(1).split()[1:]
                if "REQUIRED" not in args:
                    continue
                for a in args:
                    if a in ("REQUIRED", "QUIET", "IMPORTED_TARGET", "GLOBAL", "NO_CMAKE_PATH",
                             "NO_CMAKE_ENVIRONMENT_PATH"):
                        continue
                    out.append((re.split(r"[<>=]", a)[0], tuple(conds)))
    return out


def check_build_pkgs(tree):
    b = tree.dockerfile_stage("build")
    pkgs = set(apt_packages(b))
    runs = " ".join(a for i, a in b["instr"] if i == "RUN")
    tests_off = re.search(r"-DMAILPUMP_TESTS=(OFF|0|NO|FALSE)\b", runs, re.I) is not None
    with open(os.path.join(tree.root, "CMakeLists.txt")) as f:
        ctext = f.read()
    problems, mods, pcs = [], [], {}
    for mod, conds in cmake_pkg_modules(tree.root):
        if tests_off and any("MAILPUMP_TESTS" in c and not c.startswith("NOT") for c in conds):
            continue
        r = run(["pkg-config", "--variable=pcfiledir", mod])
        if r.returncode != 0 or not r.stdout.strip():
            problems.append("pkg-config module %s is not installed on this host" % mod)
            continue
        pcs[mod] = os.path.join(r.stdout.strip(), mod + ".pc")
    dpkg_owners(pcs.values())
    for mod, pc in pcs.items():
        pkg = dpkg_owner(pc)
        mods.append("%s:%s" % (mod, pkg))
        if pkg not in pkgs:
            problems.append("CMakeLists.txt requires pkg-config module %s (package %s), not "
                            "installed by the build stage" % (mod, pkg))
    if re.search(r"find_package\(\s*PkgConfig", ctext):
        if "pkg-config" not in pkgs and "pkgconf" not in pkgs:
            problems.append("build stage lacks pkg-config")
    if "cmake" not in pkgs:
        problems.append("build stage lacks cmake")
    if not pkgs & {"build-essential", "gcc"}:
        problems.append("build stage lacks a C compiler (build-essential)")
    extra = pkgs - tests_run_pkgs(tree.root)
    if extra:
        problems.append("build stage installs %s, not in tests/run's BUILD_PKGS" % sorted(extra))
    need(not problems, "; ".join(problems))
    return " ".join(mods)


def size_quantity(q):
    """A Kubernetes memory quantity in bytes."""
    m = re.match(r"^(\d+(?:\.\d+)?)([KMGTE]i?)?$", str(q))
    need(m, "memory quantity %r not understood" % q)
    mult = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def check_rollout(tree):
    d = tree.deployment()
    need("replicas" not in d["spec"], "the Deployment sets replicas: %s (KEDA owns the count; "
         "every apply would reset it)" % d["spec"].get("replicas"))
    c = tree.container()
    for vm in c.get("volumeMounts", []):
        need(not vm.get("subPath"), "volumeMount %s uses subPath %s: a subPath mount never sees "
             "an update of its ConfigMap or Secret" % (vm["name"], vm.get("subPath")))
    static = [x["metadata"]["name"] for x in tree.kind("ConfigMap", files=tree.listed())]
    need(not static, "static ConfigMap %s in kustomization.yaml's resources: a change would not "
         "roll the pods (use configMapGenerator)" % static)
    gen = {g["metadata"]["name"] for g in tree.generated}
    opts = tree.kustomization().get("generatorOptions") or {}
    need(not opts.get("disableNameSuffixHash"), "generatorOptions disables the name hash: a "
         "config change would not roll the pods")
    cfg_vols = [v for v in tree.pod().get("volumes", []) if "configMap" in v]
    need(cfg_vols, "the pods mount no ConfigMap")
    for v in cfg_vols:
        need(v["configMap"]["name"] in gen, "volume %s mounts ConfigMap %s, which configMapGenerator "
             "does not make" % (v["name"], v["configMap"]["name"]))
    pdbs = tree.kind("PodDisruptionBudget")
    need(pdbs, "no PodDisruptionBudget")
    for pdb in pdbs:
        pol = pdb["spec"].get("unhealthyPodEvictionPolicy")
        need(pol == "AlwaysAllow", "PodDisruptionBudget unhealthyPodEvictionPolicy %s: an unready "
             "pod would block node drains (AlwaysAllow)" % pol)
    for so in tree.kind("ScaledObject"):
        fb = so["spec"].get("fallback") or {}
        need(int(fb.get("failureThreshold", 0)) >= 1 and
             int(fb.get("replicas", 0)) >= int(so["spec"].get("minReplicaCount", 1)),
             "ScaledObject fallback %s: needs failureThreshold >= 1 and replicas >= "
             "minReplicaCount" % fb)
    return "no replicas, no subPath, ConfigMap %s generated, PDB AlwaysAllow, KEDA fallback" % (
        ",".join(sorted(gen)))


def check_memory(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    eff = tree.effective
    res = tree.container().get("resources") or {}
    lim = (res.get("limits") or {}).get("memory")
    req = (res.get("requests") or {}).get("memory")
    need(lim, "no memory limit: the auto budgets would be sized from the node's RAM")
    L = size_quantity(lim)
    need(req is not None and size_quantity(req) == L, "memory request %s != limit %s: mailpumpd "
         "sizes its budgets from the limit, so it uses a fixed share of it" % (req, lim))
    workers = int(eff["worker"]["count"])
    need(workers >= 1, "[worker] count = 0: the budgets would be split among the node's CPUs")
    max_size = int(eff["message"]["max_size"])
    floor = 2 * max_size + (64 << 10)
    im = eff["message"]["inflight_memory"].strip()
    if im in ("auto", "0"):
        per_worker = L // 4 // workers
        need(per_worker >= floor, "inflight_memory auto = %d MiB per worker (limit/4/workers) is "
             "below its floor 2 x max_size + 64 KiB = %d MiB: raise the limit" %
             (per_worker >> 20, floor >> 20))
    else:
        per_worker = size_quantity(im.replace("B", ""))
    sessions = eff["smtp"]["pool_max_total"].strip()
    sess_bytes = L // 8 if sessions in ("0", "auto") else int(sessions) * workers * (64 << 10)
    # each worker may take one largest message (3 x max_size) over its budget
    peak = per_worker * workers + workers * 3 * max_size + sess_bytes + BASE_RSS
    need(peak <= L, "worst case %d MiB (inflight %d x %d MiB + overshoot %d x 3 x %d MiB + sessions "
         "%d MiB + base %d MiB) exceeds the memory limit %s" % (
             peak >> 20, workers, per_worker >> 20, workers, max_size >> 20, sess_bytes >> 20,
             BASE_RSS >> 20, lim))
    return "limit %s: worst case %d MiB (inflight %d MiB/worker, sessions %d MiB)" % (
        lim, peak >> 20, per_worker >> 20, sess_bytes >> 20)


def url_port(url, default):
    u = urllib.parse.urlsplit(url)
    return u.port or {"http": 80, "https": 443}.get(u.scheme, default)


def check_netpol(tree):
    need(tree.effective is not None, "no effective configuration (check_config failed)")
    eff = tree.effective
    pols = tree.kind("NetworkPolicy", files=tree.listed())
    need(len(pols) == 1, "expected one NetworkPolicy in kustomization.yaml's resources, found %d" %
         len(pols))
    np = pols[0]["spec"]
    labels = tree.deployment()["spec"]["template"]["metadata"]["labels"]
    for k, v in (np.get("podSelector", {}).get("matchLabels") or {}).items():
        need(labels.get(k) == v, "NetworkPolicy selects %s=%s, the pods have %s" % (k, v, labels.get(k)))
    need(np.get("podSelector", {}).get("matchLabels"), "NetworkPolicy selects every pod")
    need(set(np.get("policyTypes", [])) == {"Ingress", "Egress"}, "policyTypes %s: expected both "
         "Ingress and Egress" % np.get("policyTypes"))

    def ports(rules, what):
        out = set()
        for r in rules or []:
            need(r.get("ports"), "%s rule without ports allows every port" % what)
            for p in r["ports"]:
                out.add((int(p["port"]), p.get("protocol", "TCP")))
        return out

    egress = ports(np.get("egress"), "egress")
    want = {(53, "UDP"), (53, "TCP"), (25, "TCP"), (465, "TCP"), (587, "TCP"),
            (int(eff["amqp"]["port"]), "TCP"), (int(eff["redis"]["port"]), "TCP")}
    if eff["imap"]["host"].strip():
        want.add((int(eff["imap"]["port"]), "TCP"))
    if eff["amqp"]["management_url"].strip():
        want.add((url_port(eff["amqp"]["management_url"], 15672), "TCP"))
    missing = sorted(want - egress)
    need(not missing, "egress lacks %s (the ports mailpumpd.ini connects to)" % missing)
    # the other IMAP port (993/143) is allowed for a switch of [imap] tls
    extra = sorted(egress - want - {(993, "TCP"), (143, "TCP"), (15672, "TCP")})
    need(not extra, "egress allows %s, which mailpumpd does not use" % extra)
    ingress = ports(np.get("ingress"), "ingress")
    _, mport = metrics_port(tree)
    need((mport, "TCP") in ingress, "ingress does not allow the metrics port %d (probes, "
         "Prometheus)" % mport)
    api = eff["api"]["listen"].strip() if eff.has_option("api", "listen") else ""
    if api:
        aport = int(api.rpartition(":")[2])
        need((aport, "TCP") in ingress, "ingress does not allow [api] listen port %d" % aport)
    return "egress %s; ingress %s" % (
        " ".join("%d/%s" % p for p in sorted(egress)), " ".join("%d/%s" % p for p in sorted(ingress)))


def metric_names(root):
    """Metric names metrics/metrics.c and metrics/ops.c expose (histograms with
    their series suffixes)."""
    names = set()
    for src in ("metrics.c", "ops.c"):
        with open(os.path.join(root, "metrics", src)) as f:
            names |= set(re.findall(r'"(mailpump_[a-z0-9_]+)', f.read()))
    need(len(names) >= 20, "could not read the metric table from metrics/metrics.c")
    out = set(names)
    for n in names:
        out |= {n + s for s in ("_bucket", "_sum", "_count")}
    return frozenset(out)


def check_monitoring(tree):
    known = metric_names(tree.root)
    rules = tree.kind("PrometheusRule")
    need(rules, "no PrometheusRule")
    alerts, used = [], set()
    # recording rules' names (mailpump:...) and up{} stand for mailpump metrics too
    recorded = {r["record"] for pr in rules for g in pr["spec"]["groups"]
                for r in g["rules"] if "record" in r}
    for pr in rules:
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                expr = str(r["expr"])
                names = set(re.findall(r"\bmailpump_[a-z0-9_]+", expr))
                need(names or re.search(r"\bup\{", expr)
                     or any(n in expr for n in recorded),
                     "rule %s names no mailpump metric" % r.get("alert", r.get("record")))
                unknown = sorted(names - known)
                need(not unknown, "rule %s uses %s, not in metrics/metrics.c" %
                     (r.get("alert", r.get("record")), unknown))
                used |= names
                if "alert" in r:
                    need(r.get("for") and (r.get("labels") or {}).get("severity"),
                         "alert %s lacks for: or a severity label" % r["alert"])
                    alerts.append(r["alert"])
    sms = tree.kind("ServiceMonitor")
    need(sms, "no ServiceMonitor")
    svc_ports = {p.get("name") for s in tree.kind("Service") for p in s["spec"]["ports"]}
    svc_labels = [s["metadata"].get("labels") or {} for s in tree.kind("Service")]
    for sm in sms:
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        need(sel and any(all(l.get(k) == v for k, v in sel.items()) for l in svc_labels),
             "ServiceMonitor selects %s, which no Service carries" % sel)
        for ep in sm["spec"]["endpoints"]:
            need(ep.get("port") in svc_ports, "ServiceMonitor port %s is not a Service port" %
                 ep.get("port"))
            need(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor path is not /metrics")
    return "%d alerts on %d metrics, all in metrics/metrics.c; ServiceMonitor on port %s" % (
        len(alerts), len(used), ",".join(sorted({e.get("port") for sm in sms
                                                  for e in sm["spec"]["endpoints"]})))


CHECKS = [("yaml", check_yaml), ("env_keys", check_env_keys), ("check_config", check_config),
          ("probes", check_probes), ("drain", check_drain), ("workers", check_workers),
          ("scaling", check_scaling), ("selectors", check_selectors), ("security", check_security),
          ("dockerfile", check_dockerfile), ("runtime_libs", check_runtime_libs),
          ("build_pkgs", check_build_pkgs), ("rollout", check_rollout), ("memory", check_memory),
          ("netpol", check_netpol), ("monitoring", check_monitoring)]


def run_checks(root, quiet=False):
    """{check name: None if passed, else the reason}."""
    try:
        tree = Tree(root)
    except Exception as e:  # an unreadable tree fails every check
        return {name: "cannot load the tree: %s" % e for name, _ in CHECKS}
    results = {}
    for name, fn in CHECKS:
        try:
            note = fn(tree)
            results[name] = None
            if not quiet:
                print("ok   %-13s %s" % (name, note))
        except (CheckFailed, KeyError, TypeError, ValueError, AttributeError, IndexError,
                OSError, yaml.YAMLError) as e:
            reason = str(e) if isinstance(e, CheckFailed) else "%s: %s" % (type(e).__name__, e)
            results[name] = reason
            if not quiet:
                print("FAIL %-13s %s" % (name, reason))
    return results


# ---------------------------------------------------------------- mutations

# (check expected to fail, file, text, replacement)
MUTATIONS = [
    ("yaml", "deploy/k8s/pdb.yaml", "  maxUnavailable: 1", "  maxUnavailable: [1"),
    ("env_keys", "deploy/k8s/deployment.yaml", "name: MAILPUMP_AMQP_PASSWORD",
     "name: MAILPUMP_AMQP_PASSWD"),
    ("env_keys", "deploy/k8s/README.md", "MAILPUMP_LOG_LEVEL", "MAILPUMP_LOGLEVEL"),
    ("check_config", "deploy/k8s/mailpumpd.ini", "prefetch = 0", "prefetch = 70000"),
    ("check_config", "deploy/k8s/mailpumpd.ini", "pool_max_per_dest = 20",
     "pool_max_per_destination = 5"),
    ("check_config", "deploy/k8s/mailpumpd.ini", "shutdown_grace_ms = 45000",
     "shutdown_grace_ms = 45s"),
    ("check_config", "deploy/k8s/deployment.yaml", "mountPath: /etc/mailpump/dkim",
     "mountPath: /etc/mailpump/dkim-keys"),
    ("check_config", "deploy/k8s/deployment.yaml", '"/etc/mailpump/config/mailpumpd.ini"',
     '"/etc/mailpump/mailpumpd.ini"'),
    ("check_config", "deploy/k8s/secret-examples.yaml", "billing@example.com         billing",
     "billing@example.com"),
    ("probes", "deploy/k8s/deployment.yaml", "path: /readyz", "path: /ready"),
    ("probes", "deploy/k8s/mailpumpd.ini", "listen = 0.0.0.0:9464", "listen = 0.0.0.0:9465"),
    ("probes", "deploy/k8s/mailpumpd.ini", "listen = 0.0.0.0:9464", "listen = 127.0.0.1:9464"),
    ("probes", "deploy/docker/Dockerfile", "EXPOSE 9464", "EXPOSE 9090"),
    ("drain", "deploy/k8s/deployment.yaml", "terminationGracePeriodSeconds: 60",
     "terminationGracePeriodSeconds: 45"),
    ("drain", "deploy/k8s/mailpumpd.ini", "shutdown_grace_ms = 45000", "shutdown_grace_ms = 90000"),
    ("workers", "deploy/k8s/mailpumpd.ini", "count = 2", "count = 0"),
    ("scaling", "deploy/k8s/keda-scaledobject.yaml", "queueName: mail.outbound",
     "queueName: mail.outbund"),
    ("scaling", "deploy/k8s/secret-examples.yaml", "CHANGE-ME-amqp-password@rabbitmq:5672/",
     "CHANGE-ME-amqp-password@rabbitmq:5673/"),
    ("scaling", "deploy/k8s/secret-examples.yaml", "url: amqp://mailpump:CHANGE-ME-amqp-password",
     "url: amqp://mailpump:CHANGE-ME-amqp-passwort"),
    ("scaling", "deploy/k8s/kustomization.yaml", "  - keda-scaledobject.yaml",
     "  - keda-scaledobject.yaml\n  - hpa-cpu.yaml"),
    ("selectors", "deploy/k8s/pdb.yaml", "      app.kubernetes.io/component: worker",
     "      app.kubernetes.io/component: workers"),
    ("security", "deploy/k8s/deployment.yaml", "readOnlyRootFilesystem: true",
     "readOnlyRootFilesystem: false"),
    ("security", "deploy/docker/Dockerfile", "USER 10001:10001", "USER mailpump"),
    ("dockerfile", "deploy/docker/Dockerfile", "COPY dns/ dns/\n", ""),
    ("dockerfile", ".dockerignore", "deploy/k8s\n", "deploy/k8s\nimap\n"),
    ("runtime_libs", "deploy/docker/Dockerfile", "libjansson4 libmicrohttpd12", "libjansson4"),
    ("runtime_libs", "deploy/docker/Dockerfile", "libmicrohttpd12 libidn2-0", "libmicrohttpd12"),
    ("runtime_libs", "deploy/docker/Dockerfile", "      ca-certificates \\\n", "      libssl-dev \\\n"),
    ("build_pkgs", "deploy/docker/Dockerfile", "libmicrohttpd-dev libidn2-dev", "libmicrohttpd-dev"),
    ("build_pkgs", "deploy/docker/Dockerfile", "build-essential cmake pkg-config",
     "build-essential cmake"),
    ("build_pkgs", "tests/run", "libidn2-dev ", ""),
    ("rollout", "deploy/k8s/deployment.yaml", "  revisionHistoryLimit: 5",
     "  replicas: 2\n  revisionHistoryLimit: 5"),
    ("rollout", "deploy/k8s/deployment.yaml", "              mountPath: /etc/mailpump/config\n",
     "              mountPath: /etc/mailpump/config/mailpumpd.ini\n              subPath: mailpumpd.ini\n"),
    ("rollout", "deploy/k8s/kustomization.yaml", "configMapGenerator:",
     "generatorOptions:\n  disableNameSuffixHash: true\nconfigMapGenerator:"),
    ("rollout", "deploy/k8s/pdb.yaml", "unhealthyPodEvictionPolicy: AlwaysAllow",
     "unhealthyPodEvictionPolicy: IfHealthyBudget"),
    ("rollout", "deploy/k8s/keda-scaledobject.yaml", "    replicas: 4\n", ""),
    ("memory", "deploy/k8s/deployment.yaml", "              memory: 1Gi\n            limits:",
     "              memory: 256Mi\n            limits:"),
    ("memory", "deploy/k8s/deployment.yaml", "              cpu: \"2\"\n              memory: 1Gi",
     "              cpu: \"2\"\n              memory: 200Mi"),
    ("memory", "deploy/k8s/mailpumpd.ini", "max_size = 26214400", "max_size = 104857600"),
    ("netpol", "deploy/k8s/networkpolicy.yaml", "        - port: 6379", "        - port: 6380"),
    ("netpol", "deploy/k8s/mailpumpd.ini", "port = 5672", "port = 5671"),
    ("netpol", "deploy/k8s/networkpolicy.yaml", "        - port: 53\n          protocol: UDP\n", ""),
    ("netpol", "deploy/k8s/networkpolicy.yaml", "        - port: 9464", "        - port: 9090"),
    ("netpol", "deploy/k8s/networkpolicy.yaml", "        - port: 587\n",
     "        - port: 587\n          protocol: TCP\n        - port: 22\n"),
    ("monitoring", "deploy/k8s/monitoring/prometheusrule.yaml", "mailpump_ledger_unavailable_total",
     "mailpump_ledger_unavailable"),
    ("monitoring", "metrics/metrics.c", '"mailpump_smtp_tls_fallbacks_total"',
     '"mailpump_smtp_tls_fallback_total"'),
    ("monitoring", "deploy/k8s/monitoring/servicemonitor.yaml", "    - port: metrics", "    - port: http"),
    ("yaml", "deploy/k8s/kustomization.yaml", "#   - monitoring", "#   - monitor"),
]
COPIED = ["deploy/docker", "deploy/k8s", "CMakeLists.txt", "tests/run", ".dockerignore",
          "metrics/metrics.c", "metrics/ops.c"]


def run_mutations():
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mp-deploy-mut-") as tmp:
        def fresh():
            root = os.path.join(tmp, "tree")
            shutil.rmtree(root, ignore_errors=True)
            for rel in COPIED:
                src, dst = os.path.join(SRC, rel), os.path.join(root, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
            return root

        base = run_checks(fresh(), quiet=True)
        broken = sorted(k for k, v in base.items() if v)
        if broken:
            print("FAIL baseline: the unmodified copy fails %s" % broken)
            return 1
        print("ok   baseline: the unmodified copy passes all %d checks" % len(base))
        for check, rel, old, new in MUTATIONS:
            root = fresh()
            path = os.path.join(root, rel)
            with open(path) as f:
                text = f.read()
            what = "%s: %r -> %r" % (rel, old.strip(), new.strip())
            if old not in text:
                print("FAIL mutation %s: text not found (update MUTATIONS)" % what)
                failures += 1
                continue
            with open(path, "w") as f:
                f.write(text.replace(old, new, 1))
            res = run_checks(root, quiet=True)
            if res[check] is None:
                print("FAIL mutation %s: check %s still passes" % (what, check))
                failures += 1
            else:
                others = sorted(k for k, v in res.items() if v and k != check)
                print("ok   %-13s fails on %s\n       -> %s%s" % (
                    check, what, res[check][:200], "  (also: %s)" % ",".join(others) if others else ""))
    print("%d mutations, %d not caught" % (len(MUTATIONS), failures))
    return 1 if failures else 0


def main():
    for b in (MAILPUMPD, MAILPUMP):
        if not os.access(b, os.X_OK):
            print("FAIL %s not built (set MAILPUMP_BUILD_DIR)" % b)
            return 1
    try:
        if "--mutations" in sys.argv[1:]:
            return run_mutations()
        res = run_checks(SRC)
        failed = sorted(k for k, v in res.items() if v)
        print("%d checks, %d failed%s" % (len(res), len(failed), ": " + " ".join(failed) if failed else ""))
        return 1 if failed else 0
    finally:
        shutil.rmtree(_KEYDIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
