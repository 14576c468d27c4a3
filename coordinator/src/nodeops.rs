//! Operator actions carried out through the agents: fetching the admin kubeconfig from a
//! server, and removing a node from the cluster.
//!
//! Removing a node:
//! 1. A server may only go if the Ready servers that stay still form an etcd quorum of the
//!    servers there are now; the last server never goes (both unless `force`).
//! 2. Drain it through another Ready server, when there is one.
//! 3. Uninstall K3s on it, when it is connected.
//! 4. Delete its Node object through that server (which also removes its node-password).
//! 5. Drop it from the desired cluster, so nothing assigns it a role again.
//!
//! Each step that cannot be done is reported as a warning rather than silently skipped.

use std::time::Duration;

use tracing::info;

use crate::{
    core::{Coordinator, Directive, KubectlAction, Reply, RequestError},
    store::StoreError,
};

/// How long a server has to drain a node.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a node has to uninstall K3s.
const UNINSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long simple answers may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an operator action on nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeOpError {
    #[error("no node named {0:?} in the desired cluster")]
    UnknownNode(String),
    #[error("no Ready, connected server can answer")]
    NoServer,
    #[error(
        "removing server {node} would leave {remaining} Ready server(s) of {total}, below the etcd quorum of {quorum}; add servers first, or pass --force"
    )]
    Quorum {
        node: String,
        remaining: usize,
        total: usize,
        quorum: usize,
    },
    #[error("{node} refused: {message}")]
    Refused { node: String, message: String },
    #[error("request")]
    Request(#[from] RequestError),
    #[error("state database")]
    Store(#[from] StoreError),
}

/// What a removal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    pub drained: bool,
    pub uninstalled: bool,
    pub node_deleted: bool,
    pub warnings: Vec<String>,
}

struct Member {
    name: String,
    role: String,
    ip: String,
    connected: bool,
    ready: bool,
}

impl Coordinator {
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        let connected = self.connected_nodes();
        let store = self.store();
        store
            .desired_nodes()?
            .into_iter()
            .map(|(name, role, ip)| {
                let ready = store.node(&name)?.is_some_and(|n| {
                    if role == "server" {
                        n.serves_api()
                    } else {
                        n.k3s_ready
                    }
                });
                Ok(Member {
                    connected: connected.contains(&name),
                    ready,
                    name,
                    role,
                    ip,
                })
            })
            .collect()
    }

    /// The admin kubeconfig from a Ready server, pointed at that server's address:
    /// (content, server name).
    pub async fn kubeconfig(&self) -> Result<(String, String), NodeOpError> {
        let members = self.members()?;
        let server = members
            .iter()
            .find(|m| m.role == "server" && m.connected && m.ready)
            .ok_or(NodeOpError::NoServer)?;
        match self
            .request(&server.name, Directive::FetchKubeconfig, ANSWER_TIMEOUT)
            .await?
        {
            Reply::Kubeconfig(content) => {
                let rewritten = content
                    .replace(
                        "https://127.0.0.1:6443",
                        &format!("https://{}:6443", server.ip),
                    )
                    .replace(
                        "https://localhost:6443",
                        &format!("https://{}:6443", server.ip),
                    );
                self.event(
                    &server.name,
                    "cluster.kubeconfig_fetched",
                    "admin kubeconfig handed to the operator",
                );
                Ok((rewritten, server.name.clone()))
            }
            Reply::Ack { message, .. } => Err(NodeOpError::Refused {
                node: server.name.clone(),
                message,
            }),
        }
    }

    /// Removes `name` from the cluster (rules in the module docs).
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<Removal, NodeOpError> {
        let members = self.members()?;
        let target = members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| NodeOpError::UnknownNode(name.to_owned()))?;
        if target.role == "server" && !force {
            let total = members.iter().filter(|m| m.role == "server").count();
            let remaining = members
                .iter()
                .filter(|m| m.role == "server" && m.name != name && m.ready)
                .count();
            let quorum = total / 2 + 1;
            if remaining == 0 || remaining < quorum {
                return Err(NodeOpError::Quorum {
                    node: name.to_owned(),
                    remaining,
                    total,
                    quorum,
                });
            }
        }
        let helper = members
            .iter()
            .find(|m| m.role == "server" && m.name != name && m.connected && m.ready);
        let mut removal = Removal::default();

        match helper {
            Some(server) => {
                let drain = Directive::Kubectl {
                    action: KubectlAction::Drain,
                    node: name.to_owned(),
                    timeout_seconds: u32::try_from(DRAIN_TIMEOUT.as_secs()).unwrap_or(u32::MAX),
                };
                match self
                    .request(&server.name, drain, DRAIN_TIMEOUT + ANSWER_TIMEOUT)
                    .await
                {
                    Ok(Reply::Ack { ok: true, .. }) => removal.drained = true,
                    Ok(Reply::Ack { message, .. }) => removal
                        .warnings
                        .push(format!("drain through {}: {message}", server.name)),
                    Ok(Reply::Kubeconfig(_)) => {
                        removal.warnings.push("drain: unexpected answer".into())
                    }
                    Err(e) => removal
                        .warnings
                        .push(format!("drain: {}", crate::error_chain(&e))),
                }
            }
            None => removal.warnings.push(
                "no other Ready server: the node was not drained and its Node object stays".into(),
            ),
        }

        if target.connected {
            match self
                .request(name, Directive::Uninstall, UNINSTALL_TIMEOUT)
                .await
            {
                Ok(Reply::Ack { ok: true, .. }) => removal.uninstalled = true,
                Ok(Reply::Ack { message, .. }) => {
                    removal.warnings.push(format!("uninstall: {message}"))
                }
                Ok(Reply::Kubeconfig(_)) => {
                    removal.warnings.push("uninstall: unexpected answer".into())
                }
                Err(e) => removal
                    .warnings
                    .push(format!("uninstall: {}", crate::error_chain(&e))),
            }
        } else {
            removal.warnings.push(format!(
                "{name} is not connected: K3s was not uninstalled on it"
            ));
        }

        if let Some(server) = helper {
            let delete = Directive::Kubectl {
                action: KubectlAction::DeleteNode,
                node: name.to_owned(),
                timeout_seconds: u32::try_from(ANSWER_TIMEOUT.as_secs()).unwrap_or(u32::MAX),
            };
            match self.request(&server.name, delete, ANSWER_TIMEOUT * 2).await {
                Ok(Reply::Ack { ok: true, .. }) => removal.node_deleted = true,
                Ok(Reply::Ack { message, .. }) => {
                    removal.warnings.push(format!("delete node: {message}"))
                }
                Ok(Reply::Kubeconfig(_)) => removal
                    .warnings
                    .push("delete node: unexpected answer".into()),
                Err(e) => removal
                    .warnings
                    .push(format!("delete node: {}", crate::error_chain(&e))),
            }
        }

        {
            let mut store = self.store();
            store.remove_desired_node(name)?;
            store.set_k3s_ready(name, false)?;
        }
        info!(
            node = name,
            drained = removal.drained,
            uninstalled = removal.uninstalled,
            "node removed"
        );
        self.event(
            name,
            "node.removed",
            &format!(
                "drained: {}, uninstalled: {}, Node deleted: {}{}",
                removal.drained,
                removal.uninstalled,
                removal.node_deleted,
                if removal.warnings.is_empty() {
                    String::new()
                } else {
                    format!("; {}", removal.warnings.join("; "))
                }
            ),
        );
        Ok(removal)
    }
}
