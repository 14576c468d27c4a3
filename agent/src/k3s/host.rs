//! The one seam between the K3s executor and the machine: files under a root, commands with a
//! cleared environment, systemctl and the journal.
//!
//! Rules:
//! 1. Host paths are absolute paths as K3s sees them (`/etc/rancher/k3s/config.yaml`).
//!    [`SystemHost`] maps them under its root: `/` in production, a directory in tests. A path
//!    with `..` or a relative path is refused.
//! 2. Writes are atomic and private: a temporary file created with the final mode in the same
//!    directory, written, fsynced, renamed over the target, then the directory fsynced.
//! 3. Commands run with `env -i` semantics: only `PATH` plus the variables the caller passes.
//!    Nothing the agent inherited (a stray `K3S_TOKEN`, a proxy) reaches install.sh, which
//!    would copy it into the unit's env file. Callers never pass a token in argv or env.
//! 4. Program paths and arguments are not mapped: they name the real machine.
//! 5. Every command is bounded by a timeout and killed when it expires.

use std::{
    fs,
    future::Future,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use log::debug;

/// The `PATH` commands get unless configured otherwise.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// systemctl and journalctl answer quickly; `--no-block` keeps start and restart short.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong touching the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host path {path} must be absolute and free of `..`")]
    BadPath { path: PathBuf },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} did not finish within {timeout:?}; it was killed")]
    Timeout { program: String, timeout: Duration },
}

/// A command to run on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    /// Looked up in the command `PATH` unless absolute.
    pub program: String,
    pub args: Vec<String>,
    /// Added to `PATH`; nothing else is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub timeout: Duration,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    /// The exit code, `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `exit code N` or `a signal`, for messages.
    pub fn status_text(&self) -> String {
        match self.code {
            Some(code) => format!("exit code {code}"),
            None => "a signal".into(),
        }
    }

    /// The last `lines` non-empty lines of stderr then stdout, joined with ` | `.
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self
            .stdout
            .lines()
            .chain(self.stderr.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }
}

/// The systemctl verbs the executor uses. Start and restart never block: a `Type=notify`
/// unit with `TimeoutStartSec=0` would block until K3s is ready, possibly for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemctlAction {
    /// `is-active UNIT`: prints the state; exit 0 only when `active`.
    IsActive,
    /// `start --no-block UNIT`.
    Start,
    /// `restart --no-block UNIT`.
    Restart,
    /// `daemon-reload` (the unit is ignored).
    DaemonReload,
}

impl SystemctlAction {
    /// The arguments for `unit`.
    pub fn args(self, unit: &str) -> Vec<String> {
        let words: &[&str] = match self {
            Self::IsActive => &["is-active", unit],
            Self::Start => &["start", "--no-block", unit],
            Self::Restart => &["restart", "--no-block", unit],
            Self::DaemonReload => &["daemon-reload"],
        };
        words.iter().map(|w| (*w).to_owned()).collect()
    }
}

/// Everything that touches the machine.
pub trait Host: Send + Sync {
    /// The directory host paths are mapped under; `/` in production.
    fn root(&self) -> &Path;

    /// Where a host path really is.
    fn real_path(&self, path: &Path) -> Result<PathBuf, HostError> {
        map_under(self.root(), path)
    }

    /// A file's contents, `None` when it does not exist.
    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError>;

    /// Whether a file or directory exists.
    fn exists(&self, path: &Path) -> Result<bool, HostError>;

    /// Writes a file atomically with `mode`, creating missing parent directories (0755).
    fn write(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), HostError>;

    /// Removes a file; a missing file is not an error.
    fn remove(&self, path: &Path) -> Result<(), HostError>;

    /// Removes a directory and everything under it; a missing one is not an error.
    fn remove_tree(&self, path: &Path) -> Result<(), HostError>;

    /// Runs a command with a cleared environment and waits for it, within its timeout.
    fn run(
        &self,
        command: &HostCommand,
    ) -> impl Future<Output = Result<CommandOutput, HostError>> + Send;

    /// Runs one systemctl action on `unit`.
    fn systemctl(
        &self,
        action: SystemctlAction,
        unit: &str,
    ) -> impl Future<Output = Result<CommandOutput, HostError>> + Send;

    /// The last `lines` lines of the unit's journal, or `None` when there is no journal.
    fn journal_tail(&self, unit: &str, lines: usize)
    -> impl Future<Output = Option<String>> + Send;
}

/// The real machine (or a directory standing in for it).
#[derive(Debug, Clone)]
pub struct SystemHost {
    /// Host paths are mapped under this directory: `/` in production.
    pub root: PathBuf,
    /// The systemctl binary.
    pub systemctl: PathBuf,
    /// The journalctl binary; `None`, or a path that does not exist, means no journal.
    pub journalctl: Option<PathBuf>,
    /// `PATH` for every command.
    pub path_env: String,
}

impl SystemHost {
    /// A host rooted at `root` with the given systemctl and the default `PATH`.
    pub fn new(root: PathBuf, systemctl: PathBuf) -> Self {
        Self {
            root,
            systemctl,
            journalctl: None,
            path_env: DEFAULT_PATH.into(),
        }
    }

    fn tool(&self, program: &Path, args: Vec<String>, timeout: Duration) -> HostCommand {
        HostCommand {
            program: program.display().to_string(),
            args,
            env: Vec::new(),
            cwd: None,
            timeout,
        }
    }
}

impl Host for SystemHost {
    fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        let real = self.real_path(path)?;
        match fs::read(&real) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Read { path: real, source }),
        }
    }

    fn exists(&self, path: &Path) -> Result<bool, HostError> {
        let real = self.real_path(path)?;
        real.try_exists()
            .map_err(|source| HostError::Read { path: real, source })
    }

    fn write(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), HostError> {
        let real = self.real_path(path)?;
        write_atomic(&real, contents, mode)
            .map_err(|source| HostError::Write { path: real, source })
    }

    fn remove(&self, path: &Path) -> Result<(), HostError> {
        let real = self.real_path(path)?;
        match fs::remove_file(&real) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Remove { path: real, source }),
        }
    }

    fn remove_tree(&self, path: &Path) -> Result<(), HostError> {
        let real = self.real_path(path)?;
        match fs::remove_dir_all(&real) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Remove { path: real, source }),
        }
    }

    async fn run(&self, command: &HostCommand) -> Result<CommandOutput, HostError> {
        run_cleared(command, &self.path_env).await
    }

    async fn systemctl(
        &self,
        action: SystemctlAction,
        unit: &str,
    ) -> Result<CommandOutput, HostError> {
        let command = self.tool(&self.systemctl, action.args(unit), SYSTEMCTL_TIMEOUT);
        run_cleared(&command, &self.path_env).await
    }

    async fn journal_tail(&self, unit: &str, lines: usize) -> Option<String> {
        let journalctl = self.journalctl.as_ref().filter(|p| p.exists())?;
        let args = [
            "-u",
            unit,
            "-n",
            &lines.to_string(),
            "--no-pager",
            "-o",
            "cat",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let command = self.tool(journalctl, args, SYSTEMCTL_TIMEOUT);
        match run_cleared(&command, &self.path_env).await {
            Ok(output) if output.success() => Some(output.stdout),
            _ => None,
        }
    }
}

/// Runs `command` with only `PATH` and its own variables in the environment.
async fn run_cleared(command: &HostCommand, path_env: &str) -> Result<CommandOutput, HostError> {
    debug!(
        "running {} {:?} with PATH and {:?}",
        command.program, command.args, command.env
    );
    let mut process = tokio::process::Command::new(&command.program);
    process
        .args(&command.args)
        .env_clear()
        .env("PATH", path_env)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = &command.cwd {
        process.current_dir(cwd);
    }
    let spawn_error = |source| HostError::Spawn {
        program: command.program.clone(),
        source,
    };
    let child = spawn_retrying_busy(&mut process)
        .await
        .map_err(spawn_error)?;
    let output = tokio::time::timeout(command.timeout, child.wait_with_output())
        .await
        .map_err(|_| HostError::Timeout {
            program: command.program.clone(),
            timeout: command.timeout,
        })?
        .map_err(spawn_error)?;
    Ok(CommandOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// How often a spawn that failed with `ETXTBSY` is retried.
const BUSY_RETRIES: u32 = 20;

/// Spawns `process`, retrying while the kernel reports the program busy.
///
/// A script this process has just written (`install.sh`) can still be open for
/// writing in a child that another thread forked in between: the descriptor
/// closes at that child's `exec`, microseconds later. Until then `execve`
/// fails with `ETXTBSY`, so a short bounded retry is the usual remedy.
async fn spawn_retrying_busy(
    process: &mut tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    let mut attempt = 0;
    loop {
        match process.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempt < BUSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            result => return result,
        }
    }
}

/// `path` (absolute, no `..`) under `root`.
pub fn map_under(root: &Path, path: &Path) -> Result<PathBuf, HostError> {
    let bad = || HostError::BadPath {
        path: path.to_owned(),
    };
    let mut mapped = root.to_path_buf();
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(bad());
    }
    for component in components {
        match component {
            Component::Normal(part) => mapped.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(mapped)
}

/// Writes `path` atomically with `mode`: a fresh temporary file created with that mode in the
/// same directory, written, fsynced, renamed over `path`; then the directory is fsynced so the
/// rename survives a power cut. Missing parent directories are created 0755.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    // A leftover from a crash may have another mode: start from nothing.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The umask may have narrowed the mode; set it exactly before any byte is written.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_under_the_root_and_escapes_are_refused() {
        let root = Path::new("/tmp/root");
        assert_eq!(
            map_under(root, Path::new("/etc/rancher/k3s/config.yaml")).unwrap(),
            Path::new("/tmp/root/etc/rancher/k3s/config.yaml")
        );
        assert_eq!(
            map_under(Path::new("/"), Path::new("/etc/x")).unwrap(),
            Path::new("/etc/x")
        );
        assert!(map_under(root, Path::new("etc/x")).is_err());
        assert!(map_under(root, Path::new("/etc/../../x")).is_err());
    }

    #[test]
    fn writes_are_atomic_with_the_exact_mode_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let host = SystemHost::new(dir.path().to_owned(), "/bin/false".into());
        let path = Path::new("/etc/rancher/k3s/server-token");
        host.write(path, b"one\n", 0o600).unwrap();
        host.write(path, b"two\n", 0o600).unwrap();
        let real = dir.path().join("etc/rancher/k3s/server-token");
        assert_eq!(fs::read(&real).unwrap(), b"two\n");
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(real.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["server-token"]);
        assert_eq!(host.read(path).unwrap().as_deref(), Some(&b"two\n"[..]));
        host.remove(path).unwrap();
        host.remove(path).unwrap();
        assert_eq!(host.read(path).unwrap(), None);
    }

    #[tokio::test]
    async fn commands_get_only_path_and_their_own_variables() {
        let dir = tempfile::tempdir().unwrap();
        let host = SystemHost::new(dir.path().to_owned(), "/bin/false".into());
        let output = host
            .run(&HostCommand {
                program: "sh".into(),
                args: vec!["-c".into(), "env | sort".into()],
                env: vec![("INSTALL_K3S_EXEC".into(), "agent".into())],
                cwd: Some(dir.path().to_owned()),
                timeout: Duration::from_secs(10),
            })
            .await
            .unwrap();
        assert!(output.success(), "{output:?}");
        let names: Vec<&str> = output
            .stdout
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        // sh itself may add PWD, SHLVL and `_`.
        for name in names {
            assert!(
                ["PATH", "INSTALL_K3S_EXEC", "PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
                "unexpected variable {name} in {}",
                output.stdout
            );
        }
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let host = SystemHost::new(dir.path().to_owned(), "/bin/false".into());
        let err = host
            .run(&HostCommand {
                program: "sleep".into(),
                args: vec!["30".into()],
                env: Vec::new(),
                cwd: None,
                timeout: Duration::from_millis(50),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, HostError::Timeout { .. }), "{err}");
    }
}
