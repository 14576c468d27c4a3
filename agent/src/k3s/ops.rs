//! Operations on an installed node, asked for by the coordinator: hand over a server's admin
//! kubeconfig, drain or delete another node through a server's cluster API, and uninstall K3s
//! (k3s.md §1.3, §10).
//!
//! Rules:
//! 1. Everything touches the machine through the [`Host`] seam: host paths mapped under its
//!    root, commands with a cleared environment and a timeout.
//! 2. The kubeconfig holds cluster-admin credentials: it is carried in a [`Kubeconfig`] whose
//!    `Debug` hides it, and is never logged. Command output quoted in errors is redacted of
//!    the join tokens.
//! 3. `kubectl` runs only on a server, with `KUBECONFIG` naming the admin kubeconfig, bounded
//!    by the directive's timeout plus [`KUBECTL_MARGIN`]. A node name must be a Kubernetes
//!    object name, so it can never be read as an option.
//! 4. Uninstall runs the uninstall script install.sh left for the installed role, then
//!    removes what the script leaves and the agent put there: `/etc/rancher/node` (so the
//!    node can rejoin under the same name), the token files and config.yaml, and finally the
//!    checkpoint. A failed script leaves the checkpoint, so the uninstall can be repeated. With
//!    nothing installed it succeeds and changes nothing.

use std::{fmt, path::Path, time::Duration};

use log::{debug, info};

use crate::k3s::{
    checkpoint::CheckpointError,
    host::{CommandOutput, Host, HostCommand, HostError},
    install::{Executor, NODE_DIR, token_redactor},
    plan::{AGENT_TOKEN_PATH, CONFIG_PATH, Role, SERVER_TOKEN_PATH},
    view::{K3S_BIN, KUBECONFIG_PATH},
};

/// The timeout a `Kubectl` directive gets when it names none.
pub const DEFAULT_KUBECTL_TIMEOUT: Duration = Duration::from_secs(120);
/// Added to kubectl's own `--timeout` before the agent kills it: kubectl needs a moment to
/// give up and say why.
pub const KUBECTL_MARGIN: Duration = Duration::from_secs(30);
/// Bound on an uninstall script: killall unmounts and deletes a lot, but not for ever.
pub const UNINSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Lines of command output quoted in an error.
const OUTPUT_QUOTED: usize = 3;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("this node has no K3s role")]
    NoRole,
    #[error("this node is a K3s {role}; only a server can {what}")]
    NotServer { role: Role, what: &'static str },
    #[error("{KUBECONFIG_PATH} does not exist; the K3s server has not started yet")]
    NoKubeconfig,
    #[error("{KUBECONFIG_PATH} is not UTF-8")]
    KubeconfigNotText,
    #[error("failed to read {KUBECONFIG_PATH}")]
    ReadKubeconfig(#[source] HostError),
    #[error("kubectl action {action} is not one this agent knows; upgrade the agent")]
    UnknownAction { action: i32 },
    #[error("{node:?} is not a Kubernetes node name")]
    BadNodeName { node: String },
    #[error("k3s kubectl {what} {node} did not finish")]
    KubectlRun {
        what: &'static str,
        node: String,
        #[source]
        source: HostError,
    },
    #[error("k3s kubectl {what} {node} ended with {status}: {tail}")]
    KubectlFailed {
        what: &'static str,
        node: String,
        status: String,
        tail: String,
    },
    #[error("{script} did not finish")]
    UninstallRun {
        script: &'static str,
        #[source]
        source: HostError,
    },
    #[error("{script} ended with {status}: {tail}")]
    UninstallFailed {
        script: &'static str,
        status: String,
        tail: String,
    },
    #[error("failed to clean up after the uninstall script")]
    Cleanup(#[source] HostError),
    #[error("K3s checkpoint")]
    Checkpoint(#[from] CheckpointError),
}

/// The admin kubeconfig; hidden from `Debug` (rule 2).
#[derive(Clone, PartialEq, Eq)]
pub struct Kubeconfig(String);

impl Kubeconfig {
    /// The file's contents.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Consumes it, for the reply.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Debug for Kubeconfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kubeconfig(<{} bytes redacted>)", self.0.len())
    }
}

/// What a server does to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubectlAction {
    /// `kubectl drain NODE --ignore-daemonsets --delete-emptydir-data --timeout=Ns`.
    Drain,
    /// `kubectl delete node NODE --ignore-not-found` (also removes its node-password Secret).
    DeleteNode,
}

impl KubectlAction {
    fn what(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::DeleteNode => "delete node",
        }
    }
}

/// A checked `Kubectl` directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubectlCommand {
    action: KubectlAction,
    node: String,
    timeout: Duration,
}

impl KubectlCommand {
    /// `node` must be a Kubernetes object name (rule 3); a zero `timeout` means
    /// [`DEFAULT_KUBECTL_TIMEOUT`].
    pub fn new(
        action: KubectlAction,
        node: &str,
        timeout: Duration,
    ) -> Result<Self, OperationError> {
        if !is_node_name(node) {
            return Err(OperationError::BadNodeName {
                node: node.chars().take(80).collect(),
            });
        }
        Ok(Self {
            action,
            node: node.to_owned(),
            timeout: if timeout.is_zero() {
                DEFAULT_KUBECTL_TIMEOUT
            } else {
                timeout
            },
        })
    }

    pub fn action(&self) -> KubectlAction {
        self.action
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// kubectl's own timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The arguments after `k3s`.
    fn args(&self) -> Vec<String> {
        let mut args = vec!["kubectl".to_owned()];
        match self.action {
            KubectlAction::Drain => args.extend([
                "drain".to_owned(),
                self.node.clone(),
                "--ignore-daemonsets".to_owned(),
                "--delete-emptydir-data".to_owned(),
                format!("--timeout={}s", self.timeout.as_secs()),
            ]),
            KubectlAction::DeleteNode => args.extend([
                "delete".to_owned(),
                "node".to_owned(),
                self.node.clone(),
                "--ignore-not-found".to_owned(),
            ]),
        }
        args
    }
}

/// A DNS-1123 subdomain, the rule for Node names: lowercase alphanumerics, `-` and `.`,
/// starting and ending with an alphanumeric, at most 253 characters.
fn is_node_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 253
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// What the coordinator asked for, besides an Assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    FetchKubeconfig,
    Kubectl(KubectlCommand),
    Uninstall,
}

/// Servers only: the admin kubeconfig as stored.
pub fn kubeconfig<H: Host>(host: &H, role: Option<Role>) -> Result<Kubeconfig, OperationError> {
    server_only(role, "hand over the admin kubeconfig")?;
    let bytes = host
        .read(Path::new(KUBECONFIG_PATH))
        .map_err(OperationError::ReadKubeconfig)?
        .ok_or(OperationError::NoKubeconfig)?;
    String::from_utf8(bytes)
        .map(Kubeconfig)
        .map_err(|_| OperationError::KubeconfigNotText)
}

/// Servers only: runs `command` through the cluster API; the message says what kubectl did.
pub async fn kubectl<H: Host>(
    host: &H,
    role: Option<Role>,
    command: &KubectlCommand,
) -> Result<String, OperationError> {
    server_only(role, "act on other nodes")?;
    let what = command.action.what();
    let run = |source| OperationError::KubectlRun {
        what,
        node: command.node.clone(),
        source,
    };
    let program = host.real_path(Path::new(K3S_BIN)).map_err(run)?;
    let kubeconfig = host.real_path(Path::new(KUBECONFIG_PATH)).map_err(run)?;
    let host_command = HostCommand {
        program: program.display().to_string(),
        args: command.args(),
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        cwd: None,
        timeout: command.timeout + KUBECTL_MARGIN,
    };
    info!("k3s kubectl {what} {}", command.node);
    let output = host.run(&host_command).await.map_err(run)?;
    let redactor = token_redactor(host);
    let tail = redactor.redact(&output.tail(OUTPUT_QUOTED)).into_owned();
    if !output.success() {
        return Err(OperationError::KubectlFailed {
            what,
            node: command.node.clone(),
            status: output.status_text(),
            tail,
        });
    }
    Ok(if tail.is_empty() {
        format!("k3s kubectl {what} {}: done", command.node)
    } else {
        format!("k3s kubectl {what} {}: {tail}", command.node)
    })
}

fn server_only(role: Option<Role>, what: &'static str) -> Result<(), OperationError> {
    match role {
        Some(Role::Server) => Ok(()),
        Some(role) => Err(OperationError::NotServer { role, what }),
        None => Err(OperationError::NoRole),
    }
}

/// The uninstall script install.sh writes for `role` (k3s.md §1.3).
pub fn uninstall_script(role: Role) -> &'static str {
    match role {
        Role::Server => "/usr/local/bin/k3s-uninstall.sh",
        Role::Agent => "/usr/local/bin/k3s-agent-uninstall.sh",
    }
}

/// Rule 4. The message says what was done.
pub async fn uninstall<H: Host>(executor: &Executor<H>) -> Result<String, OperationError> {
    let host = executor.host();
    let checkpoint = executor.checkpoint()?;
    let installed = checkpoint
        .as_ref()
        .and_then(|c| c.installed.as_ref())
        .map(|i| i.role);
    // The installed role's script first; a script of the other role if the checkpoint lost
    // track of what install.sh did.
    let mut roles = vec![Role::Server, Role::Agent];
    if let Some(role) = installed {
        roles.retain(|r| *r != role);
        roles.insert(0, role);
    }
    let mut script = None;
    for role in roles {
        if host
            .exists(Path::new(uninstall_script(role)))
            .map_err(OperationError::Cleanup)?
        {
            script = Some(role);
            break;
        }
    }
    let leftovers = [NODE_DIR, SERVER_TOKEN_PATH, AGENT_TOKEN_PATH, CONFIG_PATH];
    let mut any_left = checkpoint.is_some();
    for path in leftovers {
        any_left |= host
            .exists(Path::new(path))
            .map_err(OperationError::Cleanup)?;
    }
    if script.is_none() && !any_left {
        return Ok("nothing to uninstall".into());
    }
    let mut message = match script {
        Some(role) => {
            let output = run_uninstall_script(host, role).await?;
            debug!("uninstall script output: {}", output.tail(20));
            format!("ran {}", uninstall_script(role))
        }
        None => "no uninstall script".to_owned(),
    };
    host.remove_tree(Path::new(NODE_DIR))
        .map_err(OperationError::Cleanup)?;
    for path in [SERVER_TOKEN_PATH, AGENT_TOKEN_PATH, CONFIG_PATH] {
        host.remove(Path::new(path))
            .map_err(OperationError::Cleanup)?;
    }
    executor.forget_checkpoint()?;
    message.push_str(&format!(
        "; removed {NODE_DIR}, the token files and the K3s checkpoint"
    ));
    Ok(message)
}

async fn run_uninstall_script<H: Host>(
    host: &H,
    role: Role,
) -> Result<CommandOutput, OperationError> {
    let script = uninstall_script(role);
    let run = |source| OperationError::UninstallRun { script, source };
    let path = host.real_path(Path::new(script)).map_err(run)?;
    let command = HostCommand {
        program: "sh".into(),
        args: vec![path.display().to_string()],
        env: Vec::new(),
        cwd: None,
        timeout: UNINSTALL_TIMEOUT,
    };
    info!("running {script}");
    let output = host.run(&command).await.map_err(run)?;
    if !output.success() {
        return Err(OperationError::UninstallFailed {
            script,
            status: output.status_text(),
            tail: token_redactor(host)
                .redact(&output.tail(OUTPUT_QUOTED))
                .into_owned(),
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::k3s::{
        ExecutorSettings, InstallPlan, fake::FakeHost, install::PhaseEvent, install::Reporter,
        install::Step,
    };

    const TOKEN: &str = "ops-test-server-token-123";

    struct Quiet;

    impl Reporter for Quiet {
        fn report(&mut self, _: PhaseEvent) {}
        fn proceed(&mut self, _: Step) -> bool {
            true
        }
    }

    fn server() -> FakeHost {
        let host = FakeHost::default();
        host.put(K3S_BIN, b"fake k3s");
        host.put(KUBECONFIG_PATH, b"apiVersion: v1\nkind: Config\n");
        host.put(crate::k3s::plan::SERVER_TOKEN_PATH, TOKEN.as_bytes());
        host.set_unit_state("k3s", "active");
        host
    }

    fn drain(node: &str, seconds: u64) -> KubectlCommand {
        KubectlCommand::new(KubectlAction::Drain, node, Duration::from_secs(seconds)).unwrap()
    }

    /// An executor that has installed `role` on `host`.
    async fn installed(dir: &Path, host: &FakeHost, role: &str) -> Executor<FakeHost> {
        host.put("/opt/install.sh", b"#!/bin/sh\n");
        let mut plan = json!({
            "schema": 1, "revision": 2, "install_revision": 1, "role": role,
            "version": "v1.31.4+k3s1", "installer": {"file": "/opt/install.sh"},
            "token": TOKEN, "config": {"node-ip": "10.0.0.1"}
        });
        if role == "agent" {
            plan["token"] = json!(format!("K10{}::node:{TOKEN}", "ab".repeat(32)));
            plan["config"]["server"] = json!("https://10.0.0.11:6443");
        }
        let executor = Executor::new(
            host.clone(),
            dir.to_owned(),
            ExecutorSettings {
                poll_interval: Duration::from_millis(1),
                ..ExecutorSettings::default()
            },
        );
        let plan = InstallPlan::for_directive(2, role, &plan.to_string()).unwrap();
        executor.apply(&plan, &mut Quiet).await.unwrap();
        host.put("/etc/rancher/node/password", b"node-password");
        executor
    }

    #[test]
    fn the_kubeconfig_is_read_on_servers_only_and_hidden_from_debug() {
        let host = server();
        let config = kubeconfig(&host, Some(Role::Server)).unwrap();
        assert_eq!(config.expose(), "apiVersion: v1\nkind: Config\n");
        assert!(!format!("{config:?}").contains("Config"), "{config:?}");

        let err = kubeconfig(&host, Some(Role::Agent)).unwrap_err();
        assert!(
            err.to_string()
                .contains("a K3s agent; only a server can hand over the admin kubeconfig"),
            "{err}"
        );
        assert!(matches!(
            kubeconfig(&host, None),
            Err(OperationError::NoRole)
        ));
        host.remove(Path::new(KUBECONFIG_PATH)).unwrap();
        let err = kubeconfig(&host, Some(Role::Server)).unwrap_err();
        assert!(matches!(err, OperationError::NoKubeconfig), "{err}");
    }

    #[test]
    fn node_names_that_could_be_options_are_refused_and_zero_means_the_default() {
        for bad in [
            "",
            "--all",
            "-x",
            "Wk-1",
            "wk 1",
            "wk-1-",
            "a/b",
            &"a".repeat(254),
        ] {
            assert!(
                KubectlCommand::new(KubectlAction::Drain, bad, Duration::ZERO).is_err(),
                "{bad:?}"
            );
        }
        let command =
            KubectlCommand::new(KubectlAction::Drain, "wk-1.lan", Duration::ZERO).unwrap();
        assert_eq!(command.timeout(), DEFAULT_KUBECTL_TIMEOUT);
    }

    #[tokio::test]
    async fn drain_and_delete_run_k3s_kubectl_with_the_admin_kubeconfig_and_no_token() {
        let host = server();
        host.add_cluster_node("wk-1");
        let message = kubectl(&host, Some(Role::Server), &drain("wk-1", 60))
            .await
            .unwrap();
        assert!(message.contains("node/wk-1 drained"), "{message}");
        assert_eq!(host.cluster_nodes().get("wk-1"), Some(&true));
        let delete =
            KubectlCommand::new(KubectlAction::DeleteNode, "wk-1", Duration::ZERO).unwrap();
        kubectl(&host, Some(Role::Server), &delete).await.unwrap();
        assert!(host.cluster_nodes().is_empty());
        // Deleting a node that is gone already is fine.
        kubectl(&host, Some(Role::Server), &delete).await.unwrap();

        let calls: Vec<String> = host
            .calls()
            .into_iter()
            .filter(|c| c.contains("kubectl"))
            .collect();
        assert_eq!(
            calls,
            [
                "run /usr/local/bin/k3s kubectl drain wk-1 --ignore-daemonsets --delete-emptydir-data --timeout=60s KUBECONFIG=/etc/rancher/k3s/k3s.yaml",
                "run /usr/local/bin/k3s kubectl delete node wk-1 --ignore-not-found KUBECONFIG=/etc/rancher/k3s/k3s.yaml",
                "run /usr/local/bin/k3s kubectl delete node wk-1 --ignore-not-found KUBECONFIG=/etc/rancher/k3s/k3s.yaml",
            ]
        );
        assert!(calls.iter().all(|c| !c.contains(TOKEN)));
    }

    #[tokio::test]
    async fn a_failed_kubectl_names_the_command_and_quotes_its_error() {
        let host = server();
        let err = kubectl(&host, Some(Role::Server), &drain("wk-9", 10))
            .await
            .unwrap_err();
        let text = crate::chain(&err);
        assert!(
            text.contains("k3s kubectl drain wk-9 ended with exit code 1")
                && text.contains(r#"nodes "wk-9" not found"#),
            "{text}"
        );
        let err = kubectl(&host, Some(Role::Agent), &drain("wk-1", 10))
            .await
            .unwrap_err();
        assert!(matches!(err, OperationError::NotServer { .. }), "{err}");
        assert!(
            !host.calls().iter().any(|c| c.contains("drain wk-1")),
            "an agent runs no kubectl"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_kubectl_is_killed_after_its_timeout_plus_the_margin() {
        let host = server();
        host.set_kubectl_hangs(true);
        let started = tokio::time::Instant::now();
        let err = kubectl(&host, Some(Role::Server), &drain("wk-1", 60))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(60) + KUBECTL_MARGIN);
        assert!(matches!(err, OperationError::KubectlRun { .. }), "{err}");
    }

    #[tokio::test]
    async fn uninstall_runs_the_roles_script_with_no_token_and_forgets_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let executor = installed(dir.path(), &host, "agent").await;
        assert!(executor.checkpoint().unwrap().is_some());
        let message = uninstall(&executor).await.unwrap();
        assert!(
            message.starts_with("ran /usr/local/bin/k3s-agent-uninstall.sh"),
            "{message}"
        );
        let run = host
            .calls()
            .into_iter()
            .find(|c| c.contains("uninstall.sh"))
            .unwrap();
        assert_eq!(run.trim_end(), "run /usr/local/bin/k3s-agent-uninstall.sh");
        for gone in [
            "/usr/local/bin/k3s",
            "/etc/systemd/system/k3s-agent.service",
            "/etc/rancher/node/password",
            crate::k3s::plan::AGENT_TOKEN_PATH,
            CONFIG_PATH,
        ] {
            assert_eq!(host.file(gone), None, "{gone}");
        }
        assert!(executor.checkpoint().unwrap().is_none());

        // Again: nothing is left.
        assert_eq!(uninstall(&executor).await.unwrap(), "nothing to uninstall");
    }

    #[tokio::test]
    async fn a_failed_uninstall_script_keeps_the_checkpoint_so_it_can_be_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let executor = installed(dir.path(), &host, "server").await;
        host.set_uninstall_exit(1);
        let err = uninstall(&executor).await.unwrap_err();
        assert!(
            crate::chain(&err)
                .contains("k3s-uninstall.sh ended with exit code 1: rm: cannot remove"),
            "{err}"
        );
        assert!(executor.checkpoint().unwrap().is_some());
        assert!(host.file("/etc/rancher/node/password").is_some());
        host.set_uninstall_exit(0);
        let message = uninstall(&executor).await.unwrap();
        assert!(
            message.starts_with("ran /usr/local/bin/k3s-uninstall.sh"),
            "{message}"
        );
        assert_eq!(host.file(KUBECONFIG_PATH), None);
    }
}
