#!/bin/sh
# fake-install.sh: stands in for the K3s install.sh (https://get.k3s.io) in tests.
#
# It reads the same variables as the real script (see docs k3s.md section 1 and install.sh's
# setup_env) and writes the same files, but downloads nothing and starts nothing it should
# not:
#   INSTALL_K3S_EXEC          first word server|agent is the command (as install.sh: a first
#                             word that is empty or starts with '-' means server, or agent
#                             when K3S_URL is set); the rest becomes ExecStart arguments
#   INSTALL_K3S_VERSION       exact release; else INSTALL_K3S_CHANNEL (default stable)
#   INSTALL_K3S_BIN_DIR       default /usr/local/bin
#   INSTALL_K3S_SYSTEMD_DIR   default /etc/systemd/system
#   INSTALL_K3S_NAME          unit k3s-<name>
#   INSTALL_K3S_TYPE          systemd Type= (default notify)
#   INSTALL_K3S_SKIP_ENABLE   true: return before enabling and starting
#   INSTALL_K3S_SKIP_START    true: enable and daemon-reload, then return without starting
#   K3S_*, CONTAINERD_*, proxies: copied into <unit>.service.env (0600), as the real script
#                             does; the agent must pass none
# Writes ${BIN_DIR}/k3s (the fake k3s below), kubectl/crictl/ctr links, k3s-killall.sh,
# k3s-uninstall.sh or k3s-agent-uninstall.sh (below), ${SYSTEMD_DIR}/<unit>.service and
# <unit>.service.env, then runs `systemctl enable <unit file>` and `systemctl daemon-reload`
# through PATH, like the real script.
#
# Every invocation is appended to fake-install.log next to this script: its arguments and
# its whole environment, so a test can prove that no token reached it.
#
# The uninstall script, like the real one (k3s.md section 1.3), runs k3s-killall.sh, stops and
# disables the unit through systemctl in PATH, removes the unit, its env file, the binary and
# its links, the killall script and itself, and, unless another k3s*.service remains,
# <root>/etc/rancher/k3s, <root>/var/lib/rancher/k3s and <root>/var/lib/kubelet. It leaves
# <root>/etc/rancher/node. It appends "uninstall <unit>" and its environment (lines
# "uninstall-env NAME=VALUE") to fake-install.log, and refuses to run without a <root>.
#
# The fake k3s (POSIX sh) stands in for a server's k3s binary and its API server:
#   k3s --version                      prints the installed version
#   k3s kubectl get --raw=/readyz      prints `ok` (exit 0) while the k3s unit is active, as
#                                      `systemctl is-active k3s` through PATH says (the fake
#                                      systemctl in tests); else fails like a refused connection
#   k3s kubectl get nodes -o json      prints a List of Nodes built from <cluster>/nodes/*
#                                      (see fake-systemctl), under the same condition
#   k3s kubectl drain NODE [--ignore-daemonsets] [--delete-emptydir-data] [--timeout=Ns]
#                                      cordons NODE (<cluster>/cordoned/NODE; get nodes then
#                                      shows spec.unschedulable) and prints what kubectl prints;
#                                      exit 1 with NotFound when <cluster>/nodes/NODE is absent
#   k3s kubectl delete node NODE [--ignore-not-found]
#                                      removes <cluster>/nodes/NODE (and its cordon); an
#                                      unknown NODE is NotFound (exit 1) unless --ignore-not-found
#   kubectl ...                        the same, through the kubectl link
# Every kubectl call needs KUBECONFIG to name an existing file (the agent maps
# /etc/rancher/k3s/k3s.yaml under its root; the fake systemctl writes it), as the real
# k3s kubectl would fail without its admin kubeconfig.
# The fake cluster is shared by every root that names it:
#   <root>  = INSTALL_K3S_SYSTEMD_DIR without its /etc/systemd/system suffix ("" when the
#             suffix is absent), recorded in the fake k3s at install time
#   <cluster> = the first line of <root>/etc/fake-k3s/cluster-dir if that file exists (tests
#             write it so several roots share one cluster), else <root>/var/lib/fake-k3s/cluster
set -eu

here=$(cd "$(dirname "$0")" && pwd)
log="$here/fake-install.log"

info() { echo "[INFO]  $*"; }
fatal() { echo "[ERROR] $*" >&2; exit 1; }

# --- record the invocation ---------------------------------------------------------------
{
    echo "invocation"
    echo "argv $*"
    env | sort | sed 's/^/env /'
} >>"$log"

# --- setup_env ---------------------------------------------------------------------------
# shellcheck disable=SC2086 # word splitting of INSTALL_K3S_EXEC is what install.sh does
set -- ${INSTALL_K3S_EXEC:-} "$@"
case "${1:-}" in
    -* | "")
        if [ -z "${K3S_URL:-}" ]; then
            CMD_K3S=server
        else
            if [ -z "${K3S_TOKEN:-}" ] && [ -z "${K3S_TOKEN_FILE:-}" ]; then
                fatal "Defaulted k3s exec command to 'agent' because K3S_URL is defined, but K3S_TOKEN or K3S_TOKEN_FILE is not defined."
            fi
            CMD_K3S=agent
        fi
        ;;
    *)
        CMD_K3S=$1
        shift
        ;;
esac
case "$CMD_K3S" in
    server | agent) ;;
    *) fatal "fake-install.sh: unknown command ${CMD_K3S}" ;;
esac
CMD_K3S_EXEC="$CMD_K3S${*:+ $*}"

if [ -n "${INSTALL_K3S_NAME:-}" ]; then
    SYSTEM_NAME=k3s-${INSTALL_K3S_NAME}
elif [ "$CMD_K3S" = server ]; then
    SYSTEM_NAME=k3s
else
    SYSTEM_NAME=k3s-${CMD_K3S}
fi
SYSTEMD_TYPE=${INSTALL_K3S_TYPE:-notify}
BIN_DIR=${INSTALL_K3S_BIN_DIR:-/usr/local/bin}
SYSTEMD_DIR=${INSTALL_K3S_SYSTEMD_DIR:-/etc/systemd/system}
SERVICE_K3S=${SYSTEM_NAME}.service
UNINSTALL_K3S_SH=${BIN_DIR}/${SYSTEM_NAME}-uninstall.sh
KILLALL_K3S_SH=${BIN_DIR}/k3s-killall.sh
FILE_K3S_SERVICE=${SYSTEMD_DIR}/${SERVICE_K3S}
FILE_K3S_ENV=${SYSTEMD_DIR}/${SERVICE_K3S}.env

if [ -n "${INSTALL_K3S_VERSION:-}" ]; then
    VERSION_K3S=$INSTALL_K3S_VERSION
else
    VERSION_K3S="v0.0.0+fake-${INSTALL_K3S_CHANNEL:-stable}"
fi
info "Using ${VERSION_K3S} as release"

# --- download_and_verify, create_symlinks --------------------------------------------------
mkdir -p "$BIN_DIR" "$SYSTEMD_DIR"
case "$SYSTEMD_DIR" in
    */etc/systemd/system) FAKE_ROOT=${SYSTEMD_DIR%/etc/systemd/system} ;;
    *) FAKE_ROOT="" ;;
esac
{
    echo '#!/bin/sh'
    echo '# fake k3s written by fake-install.sh; its header documents the interface'
    echo "FAKE_K3S_VERSION='${VERSION_K3S}'"
    echo "FAKE_K3S_ROOT='${FAKE_ROOT}'"
    cat <<'STUB'
set -u

cluster_dir() {
    if [ -f "$FAKE_K3S_ROOT/etc/fake-k3s/cluster-dir" ]; then
        head -n 1 "$FAKE_K3S_ROOT/etc/fake-k3s/cluster-dir"
    else
        echo "$FAKE_K3S_ROOT/var/lib/fake-k3s/cluster"
    fi
}

# The API server answers only with the admin kubeconfig and while the k3s unit is active.
api_up() {
    kubeconfig=${KUBECONFIG:-/etc/rancher/k3s/k3s.yaml}
    if [ ! -f "$kubeconfig" ]; then
        echo "error: stat $kubeconfig: no such file or directory" >&2
        exit 1
    fi
    if ! systemctl is-active --quiet k3s >/dev/null 2>&1; then
        echo "The connection to the server 127.0.0.1:6443 was refused - did you specify the right host or port?" >&2
        exit 1
    fi
}

# A List of Nodes; each file <cluster>/nodes/NAME holds "STATUS REASON" of its Ready condition.
node_list() {
    printf '{"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":""},"items":['
    sep=""
    for file in "$(cluster_dir)"/nodes/*; do
        [ -f "$file" ] || continue
        name=$(basename "$file")
        read -r status reason <"$file" || true
        printf '%s{"apiVersion":"v1","kind":"Node","metadata":{"name":"%s","labels":{"kubernetes.io/hostname":"%s"}},' \
            "$sep" "$name" "$name"
        if [ -e "$(cluster_dir)/cordoned/$name" ]; then
            printf '"spec":{"unschedulable":true},'
        fi
        printf '"status":{"conditions":[{"type":"Ready","status":"%s","reason":"%s"}]}}' \
            "${status:-Unknown}" "${reason:-}"
        sep=","
    done
    printf ']}\n'
}

not_found() {
    echo "Error from server (NotFound): nodes \"$1\" not found" >&2
    exit 1
}

drain() {
    name=${1:-}
    [ -n "$name" ] || { echo "error: USAGE: drain NODE [options]" >&2; exit 1; }
    shift
    for arg in "$@"; do
        case "$arg" in
            --ignore-daemonsets | --delete-emptydir-data | --force | --timeout=*) ;;
            *) echo "error: unknown flag: $arg" >&2; exit 1 ;;
        esac
    done
    api_up
    [ -f "$(cluster_dir)/nodes/$name" ] || not_found "$name"
    mkdir -p "$(cluster_dir)/cordoned"
    : >"$(cluster_dir)/cordoned/$name"
    echo "node/$name cordoned"
    echo "node/$name drained"
}

delete_node() {
    name=${1:-}
    [ -n "$name" ] || { echo "error: resource(s) were provided, but no name was specified" >&2; exit 1; }
    shift
    ignore=false
    for arg in "$@"; do
        case "$arg" in
            --ignore-not-found | --ignore-not-found=true) ignore=true ;;
            *) echo "error: unknown flag: $arg" >&2; exit 1 ;;
        esac
    done
    api_up
    if [ -f "$(cluster_dir)/nodes/$name" ]; then
        rm -f "$(cluster_dir)/nodes/$name" "$(cluster_dir)/cordoned/$name"
        echo "node \"$name\" deleted"
    elif [ "$ignore" != true ]; then
        not_found "$name"
    fi
}

kubectl() {
    case "$*" in
        "get --raw=/readyz" | "get --raw /readyz")
            api_up
            echo ok
            ;;
        "get nodes -o json" | "get nodes -ojson" | "get nodes --output=json" | "get nodes --output json")
            api_up
            node_list
            ;;
        "drain "*)
            shift
            drain "$@"
            ;;
        "delete node "*)
            shift 2
            delete_node "$@"
            ;;
        *)
            echo "fake kubectl: unsupported arguments: $*" >&2
            exit 1
            ;;
    esac
}

case "$(basename "$0")" in
    kubectl) kubectl "$@"; exit ;;
esac
# `k3s server` and `k3s agent`, as a real systemd starts them from the unit (the fake
# systemctl of the sandbox tests never runs ExecStart). Only on a real host: FAKE_K3S_ROOT
# must be empty. The process becomes a small python3 program (python3 is on every
# cloud-init image), so READY=1 comes from the unit's main PID, as Type=notify requires.
run() {
    [ -z "$FAKE_K3S_ROOT" ] || { echo "fake k3s runs only on a real host, not under $FAKE_K3S_ROOT" >&2; exit 1; }
    command -v python3 >/dev/null || { echo "fake k3s needs python3" >&2; exit 1; }
    exec python3 -c "$FAKE_K3S_RUN" "$@"
}

# The program behind `run`. A server writes its CA, admin kubeconfig and node password once,
# registers its own Node, and answers on :6443 (plain HTTP, a stand-in for the API server):
#   GET  /cacerts            the CA bundle, whose SHA-256 is the <hash> of K10<hash>:: tokens
#   POST /v1-fake/register   body {"name":…, "token":…}: the token's secret part must equal
#                            the server's agent token; registers the Node (Ready unless
#                            flannel-backend is none: no CNI yet)
# An agent reads `server` and `token-file` from config.yaml, fetches /cacerts, refuses a CA
# whose hash differs from its K10 token's, registers, and retries every second until the
# server answers, as a real agent keeps retrying its join. Both then send READY=1 and run
# until stopped.
FAKE_K3S_RUN='
import hashlib, json, os, socket, sys, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONFIG = "/etc/rancher/k3s/config.yaml"
CLUSTER = "/var/lib/fake-k3s/cluster"
CA = "/var/lib/rancher/k3s/server/tls/server-ca.crt"
KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"
FAKE_CA = """-----BEGIN CERTIFICATE-----
MIIBnDCCAUGgAwIBAgIUBZsJ6jkzdhnI19KN3M/fxoOJDlYwCgYIKoZIzj0EAwIw
IzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAxNzAwMDAwMDAwMB4XDTI2MTIwNDIz
MjQ0N1oXDTM2MTIwMTIzMjQ0N1owIzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAx
NzAwMDAwMDAwMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqHGq4b1oDojAvJy1
/4mueGOuJHXjLXxbcEwh7lWrZSd+pqsbKWVO10WJeervfcxzlk7DhdwrgxkCra3h
K74tpaNTMFEwHQYDVR0OBBYEFGw3IB+gW66/hWtubCQpiO8/5B0GMB8GA1UdIwQY
MBaAFGw3IB+gW66/hWtubCQpiO8/5B0GMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI
zj0EAwIDSQAwRgIhALmDLodXxbBYX3k3E6P1QoqYAreaHR/l28uasHCReeiBAiEA
x4ImELx/ohQeTrF6VNPV8POs003kaOWKvqDY2uXU/Kc=
-----END CERTIFICATE-----
"""

def write_once(path, text, mode):
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

def secret(path):
    with open(path) as f:
        return f.read().strip().rsplit(":", 1)[-1]

def register(name, ready):
    os.makedirs(CLUSTER + "/nodes", exist_ok=True)
    with open(CLUSTER + "/nodes/." + name + ".tmp", "w") as f:
        f.write("True KubeletReady\n" if ready else "False KubeletNotReady\n")
    os.rename(CLUSTER + "/nodes/." + name + ".tmp", CLUSTER + "/nodes/" + name)

def notify_ready():
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(addr)
    s.sendall(b"READY=1")
    s.close()

def log(text):
    print(text, flush=True)

command = sys.argv[1] if len(sys.argv) > 1 else ""
with open(CONFIG) as f:
    # JSON after comment lines, as the homelab agent writes it (JSON is YAML).
    config = json.loads("".join(l for l in f if not l.lstrip().startswith("#")))
name = config.get("node-name") or socket.gethostname()
ready = config.get("flannel-backend") != "none"

if command == "server":
    write_once(CA, FAKE_CA, 0o644)
    write_once(KUBECONFIG, "apiVersion: v1\nkind: Config\n# fake admin kubeconfig\nclusters:\n- cluster:\n    server: https://127.0.0.1:6443\n  name: default\ncurrent-context: default\n", 0o600)
    write_once("/etc/rancher/node/password", "fake-node-password\n", 0o600)
    register(name, ready)
    agent_secret = secret(config.get("agent-token-file") or config["token-file"])

    class Api(BaseHTTPRequestHandler):
        def reply(self, code, body):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            if self.path == "/cacerts":
                with open(CA, "rb") as f:
                    self.reply(200, f.read())
            else:
                self.reply(404, b"not found\n")
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                join = json.loads(body)
                given = join["token"].rsplit(":", 1)[-1]
                joiner = join["name"]
            except (ValueError, KeyError, AttributeError):
                return self.reply(400, b"bad request\n")
            if self.path != "/v1-fake/register":
                return self.reply(404, b"not found\n")
            if given != agent_secret or "/" in joiner or joiner.startswith("."):
                log("refused a join as " + repr(joiner))
                return self.reply(401, b"unauthorized\n")
            register(joiner, ready)
            log("node " + joiner + " joined")
            self.reply(200, b"joined\n")
        def log_message(self, *args):
            pass

    api = ThreadingHTTPServer(("0.0.0.0", 6443), Api)
    notify_ready()
    log("fake k3s server " + name + " serving on :6443")
    api.serve_forever()
elif command == "agent":
    server = config["server"].split("://", 1)[-1].rstrip("/")
    with open(config["token-file"]) as f:
        token = f.read().strip()
    want = token[3:].split("::", 1)[0] if token.startswith("K10") else None
    while True:
        try:
            with urllib.request.urlopen("http://" + server + "/cacerts", timeout=5) as r:
                ca = r.read()
            if want is not None and hashlib.sha256(ca).hexdigest() != want:
                log("the server CA does not match the token hash; refusing to join")
            else:
                req = urllib.request.Request("http://" + server + "/v1-fake/register", method="POST",
                    data=json.dumps({"name": name, "token": token}).encode())
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                break
        except OSError as e:
            log("waiting for the server at " + server + ": " + str(e))
        time.sleep(1)
    notify_ready()
    log("fake k3s agent " + name + " joined " + server)
    while True:
        time.sleep(3600)
else:
    sys.exit("fake k3s: unknown command " + repr(command))
'

case "${1:-}" in
    --version | -v) echo "k3s version $FAKE_K3S_VERSION (fake)" ;;
    kubectl) shift; kubectl "$@" ;;
    server | agent) run "$@" ;;
    *) echo "fake k3s: unsupported arguments: $*" >&2; exit 1 ;;
esac
STUB
} >"$BIN_DIR/k3s"
chmod 755 "$BIN_DIR/k3s"
info "Installing k3s to $BIN_DIR/k3s"
for cmd in kubectl crictl ctr; do
    ln -sf k3s "$BIN_DIR/$cmd"
done

# --- create_killall, create_uninstall -------------------------------------------------------
cat >"$KILLALL_K3S_SH" <<'KILLALL'
#!/bin/sh
# fake k3s-killall.sh: the real one stops k3s*.service and cleans up mounts and iptables
echo "fake k3s-killall.sh"
KILLALL
chmod 755 "$KILLALL_K3S_SH"
cat >"$UNINSTALL_K3S_SH" <<UNINSTALL
#!/bin/sh
# fake ${SYSTEM_NAME}-uninstall.sh written by fake-install.sh; its header documents it
set -eu
FAKE_ROOT='${FAKE_ROOT}'
if [ -z "\$FAKE_ROOT" ]; then
    echo "fake ${SYSTEM_NAME}-uninstall.sh: no fake root; refusing to touch /" >&2
    exit 1
fi
{
    echo "uninstall ${SYSTEM_NAME}"
    env | sort | sed 's/^/uninstall-env /'
} >>'${log}'
'${KILLALL_K3S_SH}'
systemctl stop '${SYSTEM_NAME}'
systemctl disable '${SYSTEM_NAME}'
rm -f '${FILE_K3S_SERVICE}' '${FILE_K3S_ENV}'
if ! ls '${SYSTEMD_DIR}'/k3s*.service >/dev/null 2>&1; then
    rm -rf "\$FAKE_ROOT/etc/rancher/k3s" "\$FAKE_ROOT/var/lib/rancher/k3s" "\$FAKE_ROOT/var/lib/kubelet"
    rm -f '${BIN_DIR}/k3s' '${BIN_DIR}/kubectl' '${BIN_DIR}/crictl' '${BIN_DIR}/ctr' '${KILLALL_K3S_SH}'
fi
rm -f '${UNINSTALL_K3S_SH}'
echo "fake ${SYSTEM_NAME}-uninstall.sh: done"
UNINSTALL
chmod 755 "$UNINSTALL_K3S_SH"

# --- create_env_file: the variables the real script copies, nothing else --------------------
umask 077
: >"$FILE_K3S_ENV"
chmod 0600 "$FILE_K3S_ENV"
env | grep -E '^(K3S|CONTAINERD)_' >>"$FILE_K3S_ENV" || true
env | grep -Ei '^(NO|HTTP|HTTPS)_PROXY' >>"$FILE_K3S_ENV" || true
umask 022
info "env: Creating environment file ${FILE_K3S_ENV}"

# --- create_systemd_service_file -------------------------------------------------------------
info "systemd: Creating service file ${FILE_K3S_SERVICE}"
cat >"$FILE_K3S_SERVICE" <<SERVICE
[Unit]
Description=Lightweight Kubernetes
Documentation=https://k3s.io
Wants=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target

[Service]
Type=${SYSTEMD_TYPE}
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-${FILE_K3S_ENV}
KillMode=process
Delegate=yes
User=root
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStartPre=-/sbin/modprobe overlay
ExecStart=${BIN_DIR}/k3s \\
    ${CMD_K3S_EXEC}
SERVICE
chmod 644 "$FILE_K3S_SERVICE"

# --- service_enable_and_start ----------------------------------------------------------------
if [ "${INSTALL_K3S_SKIP_ENABLE:-}" = true ]; then
    echo "result skip-enable" >>"$log"
    exit 0
fi
info "systemd: Enabling ${SYSTEM_NAME} unit"
systemctl enable "$FILE_K3S_SERVICE" >/dev/null
systemctl daemon-reload >/dev/null
if [ "${INSTALL_K3S_SKIP_START:-}" = true ]; then
    echo "result skip-start" >>"$log"
    exit 0
fi
# The real script restarts here, blocking until K3s sends READY=1 (k3s.md section 1.5).
info "systemd: Starting ${SYSTEM_NAME}"
echo "result started" >>"$log"
systemctl restart "$SYSTEM_NAME"
