//! What the simulated cluster looks like at start, and how slow and strict it is.
//!
//! [`SimConfig::default`] is the cluster the coordinator's tests expect: one node `pve`, the
//! cloud-init template 9000 `ubuntu-noble`, the storages `local` and `local-lvm`, and one API
//! token. Tests change single fields with struct update syntax:
//!
//! ```no_run
//! use std::time::Duration;
//! use pve_sim::{SimConfig, Timing};
//!
//! let config = SimConfig {
//!     timing: Timing { clone: Duration::from_secs(2), ..Timing::default() },
//!     ..SimConfig::default()
//! };
//! ```

use std::fmt;
use std::time::Duration;

/// The node every default object lives on.
pub const DEFAULT_NODE: &str = "pve";

/// The API token the default configuration accepts.
pub const DEFAULT_TOKEN_ID: &str = "homelab@pve!coordinator";

/// The secret of [`DEFAULT_TOKEN_ID`]. Fixed so that test fixtures and demo scripts can hard-code
/// it; it protects nothing but a loopback simulator.
pub const DEFAULT_TOKEN_SECRET: &str = "5e1f9c2a-7b3d-4e8f-a6c1-0d2b9e4f7a31";

/// The password of the default `root@pam` user, for ticket logins.
pub const DEFAULT_ROOT_PASSWORD: &str = "pve-sim-root";

/// The request body limit of libpve-http-server-perl before 5.2.1; the coordinator must stay
/// under it, so the simulator enforces it by default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Upper bound for an upload body, so a runaway client cannot exhaust the test's memory.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// The whole simulated cluster plus its behaviour knobs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Cluster node names; the first one is where the TLS certificate is issued for.
    pub nodes: Vec<String>,
    /// VMs present at start, usually templates.
    pub templates: Vec<TemplateSpec>,
    /// Storages, each available on every node.
    pub storages: Vec<StorageSpec>,
    /// Resource pools that exist (`pool=` on clone must name one of them).
    pub pools: Vec<String>,
    /// API tokens that authenticate.
    pub tokens: Vec<TokenSpec>,
    /// Users that may log in through `POST /access/ticket`.
    pub users: Vec<UserSpec>,
    /// What `GET /version` reports.
    pub version: String,
    /// Serve pre-2025 error bodies: no `message` field, and empty bodies for HTTP-layer errors.
    pub legacy_errors: bool,
    /// Largest accepted non-upload request body; larger ones get 501 `for data too large`.
    pub max_body_bytes: usize,
    /// Largest accepted upload body.
    pub max_upload_bytes: usize,
    /// Task durations and other delays.
    pub timing: Timing,
    /// How many clones may allocate on one storage at once; `None` means no limit. A clone that
    /// cannot get a slot within [`Timing::storage_lock_timeout`] fails with the storage lock
    /// timeout, as real parallel clones do.
    pub clone_limit_per_storage: Option<usize>,
    /// How many status or log polls of a new task answer 400 `no such task` first.
    pub task_invisible_polls: u32,
    /// Behave like PVE 7: `PUT …/resize` is synchronous and returns `null`.
    pub resize_returns_null: bool,
    /// Make the upload task fail unless an ISO upload has `CD001` at byte offset 32769.
    pub check_iso_magic: bool,
    /// The first id `GET /cluster/nextid` considers.
    pub nextid_lower: u32,
    /// The first three octets of the /24 that guests without a static `ipconfig0` get their
    /// address from (the last octet derives from the vmid).
    pub dhcp_prefix: [u8; 3],
    /// Keep the cluster in this file, so a restarted simulator carries on like a restarted
    /// pveproxy: same certificate, VMs, volumes and tasks (see [`crate::persist`]). `None`:
    /// memory only.
    pub state_file: Option<std::path::PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: vec![DEFAULT_NODE.to_owned()],
            templates: vec![TemplateSpec::default()],
            storages: vec![StorageSpec::local(), StorageSpec::local_lvm()],
            pools: Vec::new(),
            tokens: vec![TokenSpec::new(DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET)],
            users: vec![UserSpec {
                userid: "root@pam".to_owned(),
                password: Secret::new(DEFAULT_ROOT_PASSWORD),
            }],
            version: "9.1.2".to_owned(),
            legacy_errors: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            timing: Timing::default(),
            clone_limit_per_storage: None,
            task_invisible_polls: 0,
            resize_returns_null: false,
            check_iso_magic: false,
            nextid_lower: 100,
            dhcp_prefix: [192, 0, 2],
            state_file: None,
        }
    }
}

/// How long things take. Every default is zero, so tests finish quickly; the binary sets
/// realistic values from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Linked clone task (`qmclone`).
    pub clone: Duration,
    /// Full clone task (`qmclone` with `full=1`).
    pub full_clone: Duration,
    /// `qmstart`.
    pub start: Duration,
    /// `qmstop`.
    pub stop: Duration,
    /// `qmshutdown`.
    pub shutdown: Duration,
    /// `qmdestroy`.
    pub destroy: Duration,
    /// `qmconfig` (`POST …/config`).
    pub config: Duration,
    /// `resize`.
    pub resize: Duration,
    /// `imgcopy` (upload).
    pub upload: Duration,
    /// `imgdel` (volume delete).
    pub volume_delete: Duration,
    /// Time from the end of `qmstart` until the guest agent answers.
    pub agent_ready: Duration,
    /// How long a clone waits for a storage slot before failing (PVE: 10 s).
    pub storage_lock_timeout: Duration,
    /// Delay before every 401 (PVE: 3 s).
    pub auth_failure_delay: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            clone: Duration::ZERO,
            full_clone: Duration::ZERO,
            start: Duration::ZERO,
            stop: Duration::ZERO,
            shutdown: Duration::ZERO,
            destroy: Duration::ZERO,
            config: Duration::ZERO,
            resize: Duration::ZERO,
            upload: Duration::ZERO,
            volume_delete: Duration::ZERO,
            agent_ready: Duration::ZERO,
            storage_lock_timeout: Duration::from_secs(10),
            auth_failure_delay: Duration::ZERO,
        }
    }
}

impl Timing {
    /// Durations close to a small real cluster, for demos.
    pub fn realistic() -> Self {
        Self {
            clone: Duration::from_secs(3),
            full_clone: Duration::from_secs(20),
            start: Duration::from_secs(2),
            stop: Duration::from_secs(1),
            shutdown: Duration::from_secs(5),
            destroy: Duration::from_secs(2),
            config: Duration::from_secs(1),
            resize: Duration::from_secs(1),
            upload: Duration::from_secs(1),
            volume_delete: Duration::from_millis(500),
            agent_ready: Duration::from_secs(20),
            storage_lock_timeout: Duration::from_secs(10),
            auth_failure_delay: Duration::from_secs(3),
        }
    }

    pub(crate) fn task(&self, kind: TaskType) -> Duration {
        match kind {
            TaskType::Clone => self.clone,
            TaskType::Start => self.start,
            TaskType::Stop => self.stop,
            TaskType::Shutdown => self.shutdown,
            TaskType::Destroy => self.destroy,
            TaskType::Config => self.config,
            TaskType::Resize => self.resize,
            TaskType::Upload => self.upload,
            TaskType::VolumeDelete => self.volume_delete,
        }
    }
}

/// The worker task types the simulator runs, named by their UPID type string.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum TaskType {
    /// `qmclone`
    Clone,
    /// `qmstart`
    Start,
    /// `qmstop`
    Stop,
    /// `qmshutdown`
    Shutdown,
    /// `qmdestroy`
    Destroy,
    /// `qmconfig`
    Config,
    /// `resize`
    Resize,
    /// `imgcopy`
    Upload,
    /// `imgdel`
    VolumeDelete,
}

impl TaskType {
    /// The type field of the UPID.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clone => "qmclone",
            Self::Start => "qmstart",
            Self::Stop => "qmstop",
            Self::Shutdown => "qmshutdown",
            Self::Destroy => "qmdestroy",
            Self::Config => "qmconfig",
            Self::Resize => "resize",
            Self::Upload => "imgcopy",
            Self::VolumeDelete => "imgdel",
        }
    }

    /// Parses a UPID type string.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Clone,
            Self::Start,
            Self::Stop,
            Self::Shutdown,
            Self::Destroy,
            Self::Config,
            Self::Resize,
            Self::Upload,
            Self::VolumeDelete,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM that exists when the simulator starts.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// Its id.
    pub vmid: u32,
    /// Node it lives on.
    pub node: String,
    /// Whether it is a template (`template: 1`).
    pub template: bool,
    /// The config as `key → value`, as PVE stores it. Disk volumes named here are added to the
    /// storages' content.
    pub config: Vec<(String, String)>,
}

impl Default for TemplateSpec {
    /// Template 9000 `ubuntu-noble`: one 3.5 GiB `scsi0` on `local-lvm`, a cloud-init drive on
    /// `ide2`, `net0` on `vmbr0`, and the guest agent enabled.
    fn default() -> Self {
        let pairs = [
            ("name", "ubuntu-noble"),
            ("agent", "1"),
            ("boot", "order=scsi0"),
            ("cores", "2"),
            ("ide2", "local-lvm:vm-9000-cloudinit,media=cdrom"),
            ("memory", "2048"),
            ("net0", "virtio=BC:24:11:90:00:01,bridge=vmbr0,firewall=1"),
            ("ostype", "l26"),
            ("scsi0", "local-lvm:base-9000-disk-0,iothread=1,size=3584M"),
            ("scsihw", "virtio-scsi-single"),
            ("serial0", "socket"),
            ("smbios1", "uuid=6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"),
            ("vga", "serial0"),
            ("vmgenid", "0b6d9e4f-1a2b-4c3d-8e5f-6a7b8c9d0e1f"),
        ];
        Self {
            vmid: 9000,
            node: DEFAULT_NODE.to_owned(),
            template: true,
            config: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }
}

/// The storage back-ends the simulator distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// A directory (`dir`): path based, takes uploads, images as files.
    Dir,
    /// NFS: like `Dir`, but shared.
    Nfs,
    /// LVM-thin: block storage with linked clones, no uploads.
    LvmThin,
    /// Plain LVM: block storage without linked clones.
    Lvm,
}

impl StorageKind {
    /// The type name PVE uses in `storage.cfg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dir => "dir",
            Self::Nfs => "nfs",
            Self::LvmThin => "lvmthin",
            Self::Lvm => "lvm",
        }
    }

    pub(crate) fn path_based(self) -> bool {
        matches!(self, Self::Dir | Self::Nfs)
    }

    pub(crate) fn linked_clones(self) -> bool {
        matches!(self, Self::LvmThin)
    }
}

/// One storage, present on every node.
#[derive(Debug, Clone)]
pub struct StorageSpec {
    /// Storage id, e.g. `local`.
    pub id: String,
    /// Back-end type.
    pub kind: StorageKind,
    /// Content types it accepts (`images`, `rootdir`, `iso`, `vztmpl`, `snippets`, `backup`,
    /// `import`).
    pub content: Vec<String>,
    /// Whether all nodes see the same volumes.
    pub shared: bool,
    /// Mount path of path-based storages.
    pub path: Option<String>,
}

impl StorageSpec {
    /// `local`: a directory for ISOs, container templates, snippets and backups.
    pub fn local() -> Self {
        Self {
            id: "local".to_owned(),
            kind: StorageKind::Dir,
            content: ["iso", "vztmpl", "snippets", "backup"]
                .map(str::to_owned)
                .to_vec(),
            shared: false,
            path: Some("/var/lib/vz".to_owned()),
        }
    }

    /// `local-lvm`: LVM-thin for VM disks and container volumes.
    pub fn local_lvm() -> Self {
        Self {
            id: "local-lvm".to_owned(),
            kind: StorageKind::LvmThin,
            content: ["images", "rootdir"].map(str::to_owned).to_vec(),
            shared: false,
            path: None,
        }
    }

    pub(crate) fn supports(&self, content: &str) -> bool {
        self.content.iter().any(|c| c == content)
    }
}

/// Which privileges a token holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acl {
    /// Every privilege everywhere (like `root@pam` without privilege separation).
    All,
    /// Only these grants; a grant on a path also covers the paths below it.
    Grants(Vec<Grant>),
}

/// Privileges on an ACL path, e.g. `/vms/9000` → `VM.Clone`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// ACL path such as `/`, `/vms/123`, `/storage/local`, `/pool/homelab`.
    pub path: String,
    /// Privilege names such as `VM.Allocate`.
    pub privileges: Vec<String>,
}

impl Grant {
    /// A grant of `privileges` on `path`.
    pub fn new(path: &str, privileges: &[&str]) -> Self {
        Self {
            path: path.to_owned(),
            privileges: privileges.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// An API token: `user@realm!tokenid` plus its secret.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// `user@realm!tokenid`.
    pub token_id: String,
    /// The secret (a UUID on real servers).
    pub secret: Secret,
    /// Its effective privileges.
    pub acl: Acl,
}

impl TokenSpec {
    /// A token with every privilege.
    pub fn new(token_id: &str, secret: &str) -> Self {
        Self {
            token_id: token_id.to_owned(),
            secret: Secret::new(secret),
            acl: Acl::All,
        }
    }
}

/// A user that may log in with a password.
#[derive(Debug, Clone)]
pub struct UserSpec {
    /// `user@realm`.
    pub userid: String,
    /// Login password.
    pub password: Secret,
}

/// A string that `Debug` does not print.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: &str) -> Self {
        Self(value.to_owned())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A duration string that did not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {value:?}: expected a number with unit ms, s or m (e.g. 500ms, 2s)")]
pub struct DurationParseError {
    value: String,
}

/// Parses `500ms`, `2s`, `1.5s`, `3m` or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, DurationParseError> {
    let err = || DurationParseError {
        value: value.to_owned(),
    };
    let trimmed = value.trim();
    let (number, scale) = if let Some(n) = trimmed.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = trimmed.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = trimmed.strip_suffix('m') {
        (n, 60.0)
    } else {
        (trimmed, 1.0)
    };
    let number: f64 = number.trim().parse().map_err(|_| err())?;
    if !number.is_finite() || number < 0.0 {
        return Err(err());
    }
    Duration::try_from_secs_f64(number * scale).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let token = TokenSpec::new(DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET);
        assert!(!format!("{token:?}").contains(DEFAULT_TOKEN_SECRET));
    }
}
