//! An in-memory [`Host`] for unit tests: files, units and a log of every call, with knobs to
//! make the installer fail or the unit never come up. It behaves like install.sh and systemctl
//! as k3s.md describes them; it does not script call sequences. `k3s kubectl` answers like a
//! server: `/readyz` is `ok` while the `k3s` unit is active, and the Node list is a knob.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use crate::k3s::{
    host::{CommandOutput, Host, HostCommand, HostError, SystemctlAction},
    view::SERVER_CA_PATH,
};

/// The cluster CA a fake server generates: a real self-signed certificate.
pub(crate) const FAKE_SERVER_CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIBnDCCAUGgAwIBAgIUBZsJ6jkzdhnI19KN3M/fxoOJDlYwCgYIKoZIzj0EAwIw\nIzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAxNzAwMDAwMDAwMB4XDTI2MTIwNDIz\nMjQ0N1oXDTM2MTIwMTIzMjQ0N1owIzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAx\nNzAwMDAwMDAwMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqHGq4b1oDojAvJy1\n/4mueGOuJHXjLXxbcEwh7lWrZSd+pqsbKWVO10WJeervfcxzlk7DhdwrgxkCra3h\nK74tpaNTMFEwHQYDVR0OBBYEFGw3IB+gW66/hWtubCQpiO8/5B0GMB8GA1UdIwQY\nMBaAFGw3IB+gW66/hWtubCQpiO8/5B0GMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI\nzj0EAwIDSQAwRgIhALmDLodXxbBYX3k3E6P1QoqYAreaHR/l28uasHCReeiBAiEA\nx4ImELx/ohQeTrF6VNPV8POs003kaOWKvqDY2uXU/Kc=\n-----END CERTIFICATE-----\n";
/// `sha256sum` of [`FAKE_SERVER_CA`].
pub(crate) const FAKE_SERVER_CA_SHA256: &str =
    "d52d8f3fda751e79d73f7905658ec639240cb2a72a5c397efa599536c128d88a";

#[derive(Debug)]
struct State {
    files: BTreeMap<PathBuf, (Vec<u8>, u32)>,
    /// Units install.sh created, with their state.
    units: BTreeMap<String, String>,
    calls: Vec<String>,
    mutations: Vec<String>,
    installer_exit: i32,
    start_result: String,
    journal: Option<String>,
    /// `get --raw=/readyz` answers this (exit code, stdout) instead of following the unit.
    readyz: Option<(i32, String)>,
    /// What `get nodes -o json` prints while the API server is up.
    nodes_json: String,
    /// kubectl never answers: it runs until its timeout.
    kubectl_hangs: bool,
    /// The uninstall scripts' exit code.
    uninstall_exit: i32,
    /// Nodes the fake cluster knows, for `kubectl drain` and `delete node`, with whether
    /// they are cordoned.
    cluster_nodes: BTreeMap<String, bool>,
}

/// The fake host. Clones share one machine, so a test can keep a handle on a host it gave
/// to an executor.
#[derive(Debug, Clone)]
pub(crate) struct FakeHost {
    state: Arc<Mutex<State>>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                files: BTreeMap::new(),
                units: BTreeMap::new(),
                calls: Vec::new(),
                mutations: Vec::new(),
                installer_exit: 0,
                start_result: "active".into(),
                journal: None,
                readyz: None,
                nodes_json: r#"{"apiVersion":"v1","kind":"List","items":[]}"#.into(),
                kubectl_hangs: false,
                uninstall_exit: 0,
                cluster_nodes: BTreeMap::new(),
            })),
        }
    }
}

impl FakeHost {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread poisons only that test's host.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a file (0644) on the host, as if it had always been there.
    pub(crate) fn put(&self, path: &str, contents: &[u8]) {
        self.state()
            .files
            .insert(path.into(), (contents.to_vec(), 0o644));
    }

    /// A file's contents.
    pub(crate) fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.state()
            .files
            .get(Path::new(path))
            .map(|(c, _)| c.clone())
    }

    /// A file's mode.
    pub(crate) fn mode(&self, path: &str) -> Option<u32> {
        self.state().files.get(Path::new(path)).map(|(_, m)| *m)
    }

    /// Every call, mutating or not, with arguments and environment.
    pub(crate) fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// The calls that changed the host.
    pub(crate) fn mutations(&self) -> Vec<String> {
        self.state().mutations.clone()
    }

    /// The installer's exit code from now on.
    pub(crate) fn set_installer_exit(&self, code: i32) {
        self.state().installer_exit = code;
    }

    /// The state a unit reaches when started.
    pub(crate) fn set_start_result(&self, state: &str) {
        self.state().start_result = state.into();
    }

    /// The journal every unit shows.
    pub(crate) fn set_journal(&self, text: &str) {
        self.state().journal = Some(text.into());
    }

    /// What `kubectl get --raw=/readyz` answers from now on, whatever the unit's state.
    pub(crate) fn set_readyz(&self, code: i32, stdout: &str) {
        self.state().readyz = Some((code, stdout.into()));
    }

    /// `/readyz` follows the `k3s` unit again.
    pub(crate) fn clear_readyz(&self) {
        self.state().readyz = None;
    }

    /// What `kubectl get nodes -o json` prints while the API server is up.
    pub(crate) fn set_nodes_json(&self, json: &str) {
        self.state().nodes_json = json.into();
    }

    /// Whether kubectl hangs until its timeout.
    pub(crate) fn set_kubectl_hangs(&self, hangs: bool) {
        self.state().kubectl_hangs = hangs;
    }

    /// The uninstall scripts' exit code from now on.
    pub(crate) fn set_uninstall_exit(&self, code: i32) {
        self.state().uninstall_exit = code;
    }

    /// Registers a Node in the fake cluster (for drain and delete).
    pub(crate) fn add_cluster_node(&self, name: &str) {
        self.state().cluster_nodes.insert(name.into(), false);
    }

    /// The fake cluster's Nodes, with whether each is cordoned.
    pub(crate) fn cluster_nodes(&self) -> BTreeMap<String, bool> {
        self.state().cluster_nodes.clone()
    }

    /// Changes a unit's state behind the agent's back.
    pub(crate) fn set_unit_state(&self, unit: &str, state: &str) {
        self.state().units.insert(unit.into(), state.into());
    }
}

impl FakeHost {
    /// `k3s kubectl …` on a server: answers only while the `k3s` unit is active.
    async fn kubectl(&self, command: &HostCommand) -> Result<CommandOutput, HostError> {
        let hangs = {
            let mut state = self.state();
            let env: Vec<String> = command
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            state.calls.push(format!(
                "run {} {} {}",
                command.program,
                command.args.join(" "),
                env.join(" ")
            ));
            state.kubectl_hangs
        };
        if hangs {
            // As the real host does: the command is killed at its timeout.
            tokio::time::sleep(command.timeout).await;
            return Err(HostError::Timeout {
                program: command.program.clone(),
                timeout: command.timeout,
            });
        }
        let mut state = self.state();
        let up = state.units.get("k3s").map(String::as_str) == Some("active");
        let args: Vec<&str> = command.args.iter().map(String::as_str).collect();
        match (args.as_slice(), &state.readyz) {
            (["kubectl", "get", "--raw=/readyz"], Some((code, stdout))) => {
                Ok(output(*code, stdout, ""))
            }
            (_, _) if !up => Ok(output(
                1,
                "",
                "The connection to the server 127.0.0.1:6443 was refused - did you specify the right host or port?",
            )),
            (["kubectl", "get", "--raw=/readyz"], None) => Ok(output(0, "ok", "")),
            (["kubectl", "get", "nodes", "-o", "json"], _) => Ok(output(0, &state.nodes_json, "")),
            (["kubectl", "drain", node, ..], _) => match state.cluster_nodes.get_mut(*node) {
                Some(cordoned) => {
                    *cordoned = true;
                    Ok(output(
                        0,
                        &format!("node/{node} cordoned\nnode/{node} drained"),
                        "",
                    ))
                }
                None => Ok(output(
                    1,
                    "",
                    &format!("Error from server (NotFound): nodes \"{node}\" not found"),
                )),
            },
            (["kubectl", "delete", "node", node, rest @ ..], _) => {
                if state.cluster_nodes.remove(*node).is_some() {
                    Ok(output(0, &format!("node \"{node}\" deleted"), ""))
                } else if rest.contains(&"--ignore-not-found") {
                    Ok(output(0, "", ""))
                } else {
                    Ok(output(
                        1,
                        "",
                        &format!("Error from server (NotFound): nodes \"{node}\" not found"),
                    ))
                }
            }
            _ => Ok(output(1, "", "fake kubectl: unsupported arguments")),
        }
    }
}

impl FakeHost {
    /// `sh /usr/local/bin/<unit>-uninstall.sh`: stops the unit and removes what install.sh
    /// wrote and the K3s directories, leaving `/etc/rancher/node` (k3s.md §1.3).
    fn uninstall(&self, command: &HostCommand) -> CommandOutput {
        let mut state = self.state();
        let env: Vec<String> = command
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let line = format!("run {} {}", command.args.join(" "), env.join(" "));
        state.calls.push(line.clone());
        state.mutations.push(line);
        if state.uninstall_exit != 0 {
            return output(
                state.uninstall_exit,
                "",
                "rm: cannot remove '/var/lib/rancher/k3s': Device or resource busy",
            );
        }
        let script = Path::new(&command.args[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let unit = script.trim_end_matches("-uninstall.sh").to_owned();
        state.units.remove(&unit);
        let doomed = [
            PathBuf::from("/usr/local/bin/k3s"),
            format!("/usr/local/bin/{script}").into(),
            format!("/etc/systemd/system/{unit}.service").into(),
            format!("/etc/systemd/system/{unit}.service.env").into(),
        ];
        state.files.retain(|p, _| {
            !doomed.contains(p)
                && !p.starts_with("/etc/rancher/k3s")
                && !p.starts_with("/var/lib/rancher/k3s")
        });
        output(0, &format!("fake {script}"), "")
    }
}

fn output(code: i32, stdout: &str, stderr: &str) -> CommandOutput {
    CommandOutput {
        code: Some(code),
        stdout: stdout.into(),
        stderr: stderr.into(),
    }
}

impl Host for FakeHost {
    fn root(&self) -> &Path {
        Path::new("/")
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.state().files.get(path).map(|(c, _)| c.clone()))
    }

    fn exists(&self, path: &Path) -> Result<bool, HostError> {
        Ok(self.state().files.keys().any(|p| p.starts_with(path)))
    }

    fn write(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), HostError> {
        let mut state = self.state();
        state.calls.push(format!("write {}", path.display()));
        state
            .mutations
            .push(format!("write {} {mode:o}", path.display()));
        state.files.insert(path.into(), (contents.to_vec(), mode));
        Ok(())
    }

    fn remove(&self, path: &Path) -> Result<(), HostError> {
        let mut state = self.state();
        if state.files.remove(path).is_some() {
            state.mutations.push(format!("remove {}", path.display()));
        }
        Ok(())
    }

    fn remove_tree(&self, path: &Path) -> Result<(), HostError> {
        let mut state = self.state();
        let before = state.files.len();
        state.files.retain(|p, _| !p.starts_with(path));
        if state.files.len() != before {
            state
                .mutations
                .push(format!("remove -r {}", path.display()));
        }
        Ok(())
    }

    async fn run(&self, command: &HostCommand) -> Result<CommandOutput, HostError> {
        // A real command takes time: let other tasks run, as they would meanwhile.
        tokio::task::yield_now().await;
        if command.args.first().map(String::as_str) == Some("kubectl") {
            return self.kubectl(command).await;
        }
        if command
            .args
            .first()
            .is_some_and(|a| a.ends_with("-uninstall.sh"))
        {
            return Ok(self.uninstall(command));
        }
        let mut state = self.state();
        let script = command
            .args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let env: Vec<String> = command
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let line = format!("run {} {} {}", command.program, script, env.join(" "));
        state.calls.push(format!("{line} argv={:?}", command.args));
        state.mutations.push(line);
        let var = |name: &str| {
            command
                .env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if state.installer_exit != 0 {
            let code = state.installer_exit;
            return Ok(output(
                code,
                "[INFO]  Finding release",
                "[ERROR] Download failed",
            ));
        }
        // As install.sh with INSTALL_K3S_SKIP_START=true: files and an enabled unit, no start.
        let unit = match var("INSTALL_K3S_EXEC") {
            Some("agent") => "k3s-agent",
            _ => "k3s",
        };
        state
            .files
            .insert("/usr/local/bin/k3s".into(), (b"fake k3s".to_vec(), 0o755));
        state.files.insert(
            format!("/usr/local/bin/{unit}-uninstall.sh").into(),
            (b"#!/bin/sh\n".to_vec(), 0o755),
        );
        state.files.insert(
            format!("/etc/systemd/system/{unit}.service").into(),
            (b"[Service]\nType=notify\nRestart=always\n".to_vec(), 0o644),
        );
        state
            .units
            .entry(unit.to_owned())
            .or_insert_with(|| "inactive".into());
        Ok(output(0, "[INFO]  systemd: Enabling", ""))
    }

    async fn systemctl(
        &self,
        action: SystemctlAction,
        unit: &str,
    ) -> Result<CommandOutput, HostError> {
        let mut state = self.state();
        let line = format!("systemctl {}", action.args(unit).join(" "));
        state.calls.push(line.clone());
        match action {
            SystemctlAction::IsActive => {
                let current = state
                    .units
                    .get(unit)
                    .cloned()
                    .unwrap_or_else(|| "inactive".into());
                let code = if current == "active" { 0 } else { 3 };
                Ok(output(code, &format!("{current}\n"), ""))
            }
            SystemctlAction::DaemonReload => {
                state.mutations.push(line);
                Ok(output(0, "", ""))
            }
            SystemctlAction::Start | SystemctlAction::Restart => {
                state.mutations.push(line);
                if !state.units.contains_key(unit) {
                    return Ok(output(
                        5,
                        "",
                        &format!("Failed to start {unit}.service: Unit {unit}.service not found."),
                    ));
                }
                let result = state.start_result.clone();
                // A server that comes up has generated its cluster CA, once.
                if unit == "k3s" && result == "active" {
                    state
                        .files
                        .entry(SERVER_CA_PATH.into())
                        .or_insert_with(|| (FAKE_SERVER_CA.to_vec(), 0o644));
                }
                state.units.insert(unit.into(), result);
                Ok(output(0, "", ""))
            }
        }
    }

    async fn journal_tail(&self, _unit: &str, _lines: usize) -> Option<String> {
        self.state().journal.clone()
    }
}
