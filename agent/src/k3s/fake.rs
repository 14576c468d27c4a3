//! An in-memory [`Host`] for unit tests: files, units and a log of every call, with knobs to
//! make the installer fail or the unit never come up. It behaves like install.sh and systemctl
//! as k3s.md describes them; it does not script call sequences.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use crate::k3s::host::{CommandOutput, Host, HostCommand, HostError, SystemctlAction};

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
}

/// The fake host.
#[derive(Debug)]
pub(crate) struct FakeHost {
    state: Mutex<State>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                files: BTreeMap::new(),
                units: BTreeMap::new(),
                calls: Vec::new(),
                mutations: Vec::new(),
                installer_exit: 0,
                start_result: "active".into(),
                journal: None,
            }),
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

    /// Changes a unit's state behind the agent's back.
    pub(crate) fn set_unit_state(&self, unit: &str, state: &str) {
        self.state().units.insert(unit.into(), state.into());
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

    async fn run(&self, command: &HostCommand) -> Result<CommandOutput, HostError> {
        // A real command takes time: let other tasks run, as they would meanwhile.
        tokio::task::yield_now().await;
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
                state.units.insert(unit.into(), result);
                Ok(output(0, "", ""))
            }
        }
    }

    async fn journal_tail(&self, _unit: &str, _lines: usize) -> Option<String> {
        self.state().journal.clone()
    }
}
