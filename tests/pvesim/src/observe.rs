//! What tests can see of the simulator: the request log and snapshots of VMs, volumes and
//! tasks. Snapshots are plain values, taken under the state lock after due tasks finished.

use std::collections::BTreeMap;

use crate::config::TaskType;
use crate::state::{State, Vm};

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, `PUT`, `DELETE`, or whatever the client sent.
    pub method: String,
    /// The decoded path below `/api2/json` (or the raw path if it was outside).
    pub path: String,
    /// Query parameters, in order.
    pub query: Vec<(String, String)>,
    /// Body and query parameters merged (query wins). Passwords are masked; an upload's file
    /// part appears as `filename` plus `file-size`.
    pub params: BTreeMap<String, String>,
    /// The status sent.
    pub status: u16,
    /// The authenticated `user@realm` or `user@realm!token`, if any.
    pub user: Option<String>,
}

impl RequestRecord {
    /// POST, PUT or DELETE.
    pub fn is_mutating(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "DELETE")
    }
}

/// A copy of the request log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLog {
    /// Every request since start (or the last clear), oldest first.
    pub records: Vec<RequestRecord>,
}

impl RequestLog {
    /// How many POST, PUT and DELETE requests arrived.
    pub fn mutating_count(&self) -> usize {
        self.records.iter().filter(|r| r.is_mutating()).count()
    }

    /// How many requests had `method` and a path starting with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.matching(method, path_prefix).count()
    }

    /// The requests with `method` and a path starting with `path_prefix`.
    pub fn matching<'a>(
        &'a self,
        method: &'a str,
        path_prefix: &'a str,
    ) -> impl Iterator<Item = &'a RequestRecord> + 'a {
        self.records
            .iter()
            .filter(move |r| r.method == method && r.path.starts_with(path_prefix))
    }
}

/// Whether a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStatus {
    /// Not running.
    Stopped,
    /// Running.
    Running,
}

/// A VM as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshot {
    /// Its id.
    pub vmid: u32,
    /// `name` from the config.
    pub name: Option<String>,
    /// The node it lives on.
    pub node: String,
    /// The applied config, as stored (`sshkeys` encoded, `cipassword` hashed).
    pub config: BTreeMap<String, String>,
    /// Values that apply at the next start or stop.
    pub pending: BTreeMap<String, String>,
    /// Keys deleted at the next start or stop.
    pub pending_delete: Vec<String>,
    /// Power state.
    pub status: VmStatus,
    /// `lock` from the config.
    pub lock: Option<String>,
    /// Whether it is a template.
    pub template: bool,
    /// Its resource pool.
    pub pool: Option<String>,
}

impl VmSnapshot {
    pub(crate) fn of(vm: &Vm) -> Self {
        Self {
            vmid: vm.vmid,
            name: vm.name().map(str::to_owned),
            node: vm.node.clone(),
            config: vm.config.clone(),
            pending: vm.pending.clone(),
            pending_delete: vm.pending_delete.iter().cloned().collect(),
            status: if vm.is_running() {
                VmStatus::Running
            } else {
                VmStatus::Stopped
            },
            lock: vm.lock().map(str::to_owned),
            template: vm.is_template(),
            pool: vm.pool.clone(),
        }
    }
}

/// A volume on a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSnapshot {
    /// Storage id.
    pub storage: String,
    /// Full volume id, e.g. `local:iso/seed-123.iso`.
    pub volid: String,
    /// Content type (`iso`, `images`, …).
    pub content: String,
    /// Format (`iso`, `raw`, …).
    pub format: String,
    /// Size in bytes.
    pub size: u64,
    /// Owning VM, for disks.
    pub vmid: Option<u32>,
    /// Hex SHA-256 of the uploaded bytes (uploads only).
    pub sha256: Option<String>,
}

/// A worker task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSnapshot {
    /// The UPID.
    pub upid: String,
    /// Node that ran it.
    pub node: String,
    /// Its type.
    pub kind: TaskType,
    /// The UPID id field.
    pub id: String,
    /// Whether it still runs.
    pub running: bool,
    /// `OK`, `WARNINGS: n` or the error text, once stopped.
    pub exitstatus: Option<String>,
    /// Its log lines so far.
    pub log: Vec<String>,
}

pub(crate) fn vms(state: &State) -> Vec<VmSnapshot> {
    state.vms.values().map(VmSnapshot::of).collect()
}

pub(crate) fn volumes(state: &State) -> Vec<VolumeSnapshot> {
    use sha2::{Digest, Sha256};
    state
        .storages
        .iter()
        .flat_map(|(sid, storage)| {
            storage.volumes.values().map(move |v| VolumeSnapshot {
                storage: sid.clone(),
                volid: v.volid.clone(),
                content: v.content.clone(),
                format: v.format.clone(),
                size: v.size,
                vmid: v.vmid,
                sha256: v.data.as_ref().map(|d| hex::encode(Sha256::digest(d))),
            })
        })
        .collect()
}

pub(crate) fn tasks(state: &State) -> Vec<TaskSnapshot> {
    state
        .tasks
        .iter()
        .map(|t| TaskSnapshot {
            upid: t.upid.clone(),
            node: t.node.clone(),
            kind: t.kind,
            id: t.id.clone(),
            running: !t.finished,
            exitstatus: t.finished.then(|| t.end.exitstatus()),
            log: t.visible_log(),
        })
        .collect()
}
