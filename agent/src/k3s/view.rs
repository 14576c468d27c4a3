//! A server's view of the cluster, for health reports: the cluster CA hash that secure join
//! tokens pin, the API server's readiness, and every Node's Ready condition (k3s.md §4.1, §6).
//!
//! Rules:
//! 1. Everything is read through the [`Host`] seam: the CA file as a host path, `k3s kubectl`
//!    at its host path with the admin kubeconfig mapped under the host root.
//! 2. Each kubectl call is bounded by [`KUBECTL_TIMEOUT`]; the two run concurrently, so a hung
//!    API server delays a refresh by at most that long.
//! 3. A part that cannot be read is left empty (or `api_ready` false) and its reason is kept
//!    in [`ServerView::problem`]; the rest of the view is still filled.

use std::{path::Path, time::Duration};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::k3s::host::{CommandOutput, Host, HostCommand, HostError};

/// The cluster CA bundle, the bytes `/cacerts` serves.
pub const SERVER_CA_PATH: &str = "/var/lib/rancher/k3s/server/tls/server-ca.crt";
/// Where install.sh puts the k3s binary.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";
/// The admin kubeconfig K3s writes on servers.
pub const KUBECONFIG_PATH: &str = "/etc/rancher/k3s/k3s.yaml";
/// How long one kubectl call may take: a healthy API server answers in milliseconds.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(5);

/// What a server sees of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerView {
    /// `k3s kubectl get --raw=/readyz` exited 0 and printed `ok`.
    pub api_ready: bool,
    /// Lowercase hex SHA-256 of the cluster CA as join tokens pin it; `None` when unreadable.
    pub cluster_ca_sha256: Option<String>,
    /// Every Node's Ready condition, sorted by name.
    pub nodes: Vec<NodeReady>,
    /// Why some part could not be read, for the health detail.
    pub problem: Option<String>,
}

/// One Node's Ready condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReady {
    pub name: String,
    /// The Ready condition's status is `True`.
    pub ready: bool,
    /// The Ready condition's reason (`KubeletReady`, `KubeletNotReady`, …); empty when absent.
    pub reason: String,
}

impl ServerView {
    /// Whether every Node this server sees is Ready (and it sees at least one).
    pub fn all_nodes_ready(&self) -> bool {
        !self.nodes.is_empty() && self.nodes.iter().all(|n| n.ready)
    }
}

/// Why part of the view could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("failed to read the cluster CA")]
    ReadCa(#[source] HostError),
    #[error("{SERVER_CA_PATH} does not exist")]
    NoCa,
    #[error("{SERVER_CA_PATH} holds no PEM certificate")]
    NoCertificate,
    #[error("k3s kubectl {what} did not answer")]
    Run {
        what: &'static str,
        #[source]
        source: HostError,
    },
    #[error("k3s kubectl {what} ended with {status}: {tail}")]
    Failed {
        what: &'static str,
        status: String,
        tail: String,
    },
    #[error("the API server's /readyz answered {answer:?}")]
    NotReady { answer: String },
    #[error("k3s kubectl get nodes printed no NodeList")]
    Parse(#[source] serde_json::Error),
}

/// Reads the whole view (rule 3: a failed part does not hide the others).
pub async fn read<H: Host>(host: &H) -> ServerView {
    let (readyz, nodes) = tokio::join!(api_ready(host), nodes(host));
    let ca = cluster_ca_sha256(host);
    let mut problems = Vec::new();
    let mut keep = |e: ViewError| problems.push(crate::chain(&e));
    let view = ServerView {
        api_ready: readyz.map_err(&mut keep).is_ok(),
        cluster_ca_sha256: ca.map_err(&mut keep).ok(),
        nodes: nodes.map_err(&mut keep).unwrap_or_default(),
        problem: None,
    };
    ServerView {
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        ..view
    }
}

/// The hash secure join tokens pin (`hashCA` in k3s `pkg/clientaccess/token.go`).
pub fn cluster_ca_sha256<H: Host>(host: &H) -> Result<String, ViewError> {
    let bytes = host
        .read(Path::new(SERVER_CA_PATH))
        .map_err(ViewError::ReadCa)?
        .ok_or(ViewError::NoCa)?;
    ca_hash(&bytes)
}

/// A single-certificate bundle (the default, self-signed CA) is hashed as stored, byte for
/// byte. A bundle with more than one certificate (a custom CA with intermediates) is hashed
/// as k3s does it: the DER of its last certificate, the root.
fn ca_hash(bundle: &[u8]) -> Result<String, ViewError> {
    let certificates: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(bundle)
        .filter_map(Result::ok)
        .filter(|pem| pem.label == "CERTIFICATE")
        .map(|pem| pem.contents)
        .collect();
    match certificates.as_slice() {
        [] => Err(ViewError::NoCertificate),
        [_] => Ok(hex::encode(Sha256::digest(bundle))),
        [.., root] => Ok(hex::encode(Sha256::digest(root))),
    }
}

/// `k3s kubectl get --raw=/readyz`: ready when it exits 0 and prints `ok`.
pub async fn api_ready<H: Host>(host: &H) -> Result<(), ViewError> {
    let what = "get --raw=/readyz";
    let output = kubectl(host, what, &["get", "--raw=/readyz"]).await?;
    match output.stdout.trim() {
        "ok" => Ok(()),
        answer => Err(ViewError::NotReady {
            answer: answer.to_owned(),
        }),
    }
}

/// `k3s kubectl get nodes -o json`: each Node's Ready condition.
pub async fn nodes<H: Host>(host: &H) -> Result<Vec<NodeReady>, ViewError> {
    let output = kubectl(host, "get nodes", &["get", "nodes", "-o", "json"]).await?;
    parse_nodes(&output.stdout)
}

/// Runs `k3s kubectl ARGS` with the admin kubeconfig; an exit other than 0 is an error.
async fn kubectl<H: Host>(
    host: &H,
    what: &'static str,
    args: &[&str],
) -> Result<CommandOutput, ViewError> {
    let run = |source| ViewError::Run { what, source };
    let program = host.real_path(Path::new(K3S_BIN)).map_err(run)?;
    let kubeconfig = host.real_path(Path::new(KUBECONFIG_PATH)).map_err(run)?;
    let command = HostCommand {
        program: program.display().to_string(),
        args: std::iter::once("kubectl")
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect(),
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        cwd: None,
        timeout: KUBECTL_TIMEOUT,
    };
    let output = host.run(&command).await.map_err(run)?;
    if !output.success() {
        return Err(ViewError::Failed {
            what,
            status: output.status_text(),
            tail: output.tail(2),
        });
    }
    Ok(output)
}

/// The parts of a `NodeList` (or `List` of Nodes) the view needs; everything may be missing.
#[derive(Deserialize)]
struct NodeList {
    #[serde(default)]
    items: Vec<Node>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Node {
    metadata: Metadata,
    status: NodeStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeStatus {
    conditions: Vec<Condition>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
    reason: String,
}

/// Nodes without a name are skipped; a Node without a Ready condition is not Ready.
fn parse_nodes(json: &str) -> Result<Vec<NodeReady>, ViewError> {
    let list: NodeList = serde_json::from_str(json).map_err(ViewError::Parse)?;
    let mut nodes: Vec<NodeReady> = list
        .items
        .into_iter()
        .filter(|node| !node.metadata.name.is_empty())
        .map(|node| {
            let ready = node
                .status
                .conditions
                .into_iter()
                .find(|c| c.kind == "Ready");
            NodeReady {
                name: node.metadata.name,
                ready: ready.as_ref().is_some_and(|c| c.status == "True"),
                reason: ready.map(|c| c.reason).unwrap_or_default(),
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::k3s::fake::{FAKE_SERVER_CA, FAKE_SERVER_CA_SHA256, FakeHost};

    const CA: &[u8] = FAKE_SERVER_CA;
    const CA_SHA256: &str = FAKE_SERVER_CA_SHA256;

    fn active_server() -> FakeHost {
        let host = FakeHost::default();
        host.put(K3S_BIN, b"fake k3s");
        host.set_unit_state("k3s", "active");
        host
    }

    #[test]
    fn a_single_certificate_ca_is_hashed_exactly_as_stored() {
        let host = active_server();
        host.put(SERVER_CA_PATH, CA);
        assert_eq!(cluster_ca_sha256(&host).unwrap(), CA_SHA256);
        // Other bytes around the same certificate give another hash: nothing is normalised.
        let mut crlf = CA.to_vec();
        crlf.extend_from_slice(b"\n");
        host.put(SERVER_CA_PATH, &crlf);
        assert_ne!(cluster_ca_sha256(&host).unwrap(), CA_SHA256);
    }

    #[test]
    fn a_ca_bundle_is_hashed_by_the_der_of_its_last_certificate() {
        let host = active_server();
        let intermediate = CA.to_vec();
        let mut bundle = intermediate.clone();
        bundle.extend_from_slice(CA);
        host.put(SERVER_CA_PATH, &bundle);
        let root = x509_parser::pem::Pem::iter_from_buffer(CA)
            .next()
            .unwrap()
            .unwrap()
            .contents;
        assert_eq!(
            cluster_ca_sha256(&host).unwrap(),
            hex::encode(Sha256::digest(&root))
        );
    }

    #[test]
    fn a_missing_or_empty_ca_is_an_error() {
        let host = active_server();
        assert!(matches!(cluster_ca_sha256(&host), Err(ViewError::NoCa)));
        host.put(SERVER_CA_PATH, b"not a certificate\n");
        assert!(matches!(
            cluster_ca_sha256(&host),
            Err(ViewError::NoCertificate)
        ));
    }

    #[tokio::test]
    async fn readyz_ok_means_ready_and_anything_else_does_not() {
        let host = active_server();
        host.put(SERVER_CA_PATH, CA);
        let view = read(&host).await;
        assert!(view.api_ready, "{view:?}");
        assert_eq!(view.cluster_ca_sha256.as_deref(), Some(CA_SHA256));
        assert_eq!(view.problem, None);
        let call = host
            .calls()
            .into_iter()
            .find(|c| c.contains("--raw=/readyz"))
            .unwrap();
        assert!(
            call.contains("/usr/local/bin/k3s")
                && call.contains("KUBECONFIG=/etc/rancher/k3s/k3s.yaml"),
            "{call}"
        );

        host.set_readyz(0, "[-]etcd failed: reason withheld\nreadyz check failed");
        let view = read(&host).await;
        assert!(!view.api_ready);
        assert!(view.problem.unwrap().contains("readyz check failed"));

        host.set_unit_state("k3s", "activating");
        host.clear_readyz();
        let view = read(&host).await;
        assert!(!view.api_ready);
        let problem = view.problem.unwrap();
        assert!(
            problem.contains("get --raw=/readyz ended with exit code 1")
                && problem.contains("connection to the server"),
            "{problem}"
        );
        // The CA hash does not depend on the API server.
        assert_eq!(view.cluster_ca_sha256.as_deref(), Some(CA_SHA256));
    }

    #[tokio::test]
    async fn a_node_list_gives_each_nodes_ready_condition_and_reason() {
        let host = active_server();
        host.put(SERVER_CA_PATH, CA);
        host.set_nodes_json(
            &json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {"metadata": {"name": "wk-1", "labels": {"tier": "worker"}},
                     "status": {"conditions": [
                        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                        {"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                         "message": "container runtime network not ready"}]}},
                    {"metadata": {"name": "cp-1"},
                     "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}},
                    {"metadata": {"name": "wk-2"}},
                    {"metadata": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                    {"kind": "Node"}
                ]
            })
            .to_string(),
        );
        let view = read(&host).await;
        let node = |name: &str, ready, reason: &str| NodeReady {
            name: name.into(),
            ready,
            reason: reason.into(),
        };
        assert_eq!(
            view.nodes,
            [
                node("cp-1", true, "KubeletReady"),
                node("wk-1", false, "KubeletNotReady"),
                node("wk-2", false, ""),
            ]
        );
        assert!(!view.all_nodes_ready());
        assert_eq!(view.problem, None);

        host.set_nodes_json("error: You must be logged in to the server (Unauthorized)");
        let view = read(&host).await;
        assert!(view.nodes.is_empty());
        assert!(view.api_ready, "readyz still answered");
        assert!(
            view.problem.unwrap().contains("printed no NodeList"),
            "parse errors are reported"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_api_server_times_out_and_is_not_ready() {
        let host = active_server();
        host.put(SERVER_CA_PATH, CA);
        host.set_kubectl_hangs(true);
        let started = tokio::time::Instant::now();
        let view = read(&host).await;
        assert!(!view.api_ready);
        assert!(view.nodes.is_empty());
        assert_eq!(
            started.elapsed(),
            KUBECTL_TIMEOUT,
            "both calls ran at once, each bounded"
        );
        assert_eq!(view.cluster_ca_sha256.as_deref(), Some(CA_SHA256));
        let problem = view.problem.unwrap();
        assert!(
            problem.contains("did not answer") && problem.contains("killed"),
            "{problem}"
        );
    }
}
