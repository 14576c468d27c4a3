//! The simulated cluster: VMs, storages, volumes and worker tasks, all in memory.
//!
//! Time is `tokio::time::Instant`, so paused-time tests drive it. A task's outcome and its
//! effect on the cluster are fixed when it starts; the effect is applied once its deadline has
//! passed, by [`State::advance`], which every request and every snapshot runs first. Nothing
//! runs in the background, so a stopped simulator leaves no timers behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::{SimConfig, StorageSpec, TaskType, Timing};
use crate::faults::FaultState;
use crate::persist;
use crate::propstr;

/// Who made a request, as it appears in UPIDs and task status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Principal {
    /// `user@realm`.
    pub(crate) userid: String,
    /// The token name for API tokens.
    pub(crate) tokenid: Option<String>,
}

impl Principal {
    /// `user@realm` or `user@realm!token`, as in a UPID.
    pub(crate) fn upid_user(&self) -> String {
        match &self.tokenid {
            Some(token) => format!("{}!{token}", self.userid),
            None => self.userid.clone(),
        }
    }
}

/// Whether a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Power {
    Stopped,
    Running {
        #[serde(with = "persist::instant")]
        since: Instant,
        pid: u32,
        /// When the guest agent starts answering; `None` if the agent is disabled.
        #[serde(with = "persist::opt_instant")]
        agent_ready_at: Option<Instant>,
    },
}

/// One VM (or template).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Vm {
    pub(crate) vmid: u32,
    pub(crate) node: String,
    /// The applied config, `lock` included, as in the `.conf` file.
    pub(crate) config: BTreeMap<String, String>,
    /// Values waiting for the next start or stop.
    pub(crate) pending: BTreeMap<String, String>,
    /// Keys waiting to be deleted at the next start or stop.
    pub(crate) pending_delete: BTreeSet<String>,
    pub(crate) digest: String,
    pub(crate) power: Power,
    pub(crate) firewall: BTreeMap<String, String>,
    pub(crate) firewall_digest: String,
    pub(crate) pool: Option<String>,
}

impl Vm {
    pub(crate) fn lock(&self) -> Option<&str> {
        self.config.get("lock").map(String::as_str)
    }

    pub(crate) fn is_template(&self) -> bool {
        self.config.get("template").is_some_and(|v| v == "1")
    }

    pub(crate) fn is_running(&self) -> bool {
        matches!(self.power, Power::Running { .. })
    }

    pub(crate) fn name(&self) -> Option<&str> {
        self.config.get("name").map(String::as_str)
    }

    /// Moves pending values into the config; returns whether anything changed.
    fn apply_pending(&mut self) -> bool {
        let changed = !self.pending.is_empty() || !self.pending_delete.is_empty();
        for key in std::mem::take(&mut self.pending_delete) {
            self.config.remove(&key);
        }
        self.config.append(&mut self.pending);
        changed
    }

    /// Memory in MiB from the `memory` property string (PVE default 512).
    pub(crate) fn memory_mib(&self) -> u64 {
        self.config
            .get("memory")
            .and_then(|m| propstr::parse(&propstr::MEMORY, "memory", m).ok())
            .and_then(|m| m.get("current").and_then(|c| c.parse().ok()))
            .unwrap_or(512)
    }

    pub(crate) fn cpus(&self) -> u64 {
        let get = |k: &str| {
            self.config
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
        };
        get("cores") * get("sockets")
    }

    /// Size of the boot disk (the first disk of `boot: order=`, else the first disk).
    pub(crate) fn maxdisk(&self) -> u64 {
        let order = self
            .config
            .get("boot")
            .and_then(|b| propstr::parse(&propstr::BOOT, "boot", b).ok())
            .and_then(|b| b.get("order").map(str::to_owned));
        let candidates: Vec<String> = match order {
            Some(order) => order.split(';').map(str::to_owned).collect(),
            None => self.config.keys().cloned().collect(),
        };
        candidates
            .iter()
            .filter(|key| is_disk_key(key))
            .filter_map(|key| self.config.get(key))
            .filter(|value| !is_cdrom(value))
            .find_map(|value| drive_size(value))
            .unwrap_or(0)
    }

    pub(crate) fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| agent_enabled(a))
    }
}

/// `agent` → enabled?
pub(crate) fn agent_enabled(value: &str) -> bool {
    propstr::parse(&propstr::AGENT, "agent", value)
        .ok()
        .and_then(|m| m.get("enabled").and_then(propstr::parse_bool))
        .unwrap_or(false)
}

/// Whether a config key names a drive (`ide0`, `scsi3`, `efidisk0`, …).
pub(crate) fn is_disk_key(key: &str) -> bool {
    let numbered = |prefix: &str, max: u32| {
        key.strip_prefix(prefix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    numbered("ide", 3)
        || numbered("sata", 5)
        || numbered("scsi", 30)
        || numbered("virtio", 15)
        || key == "efidisk0"
        || key == "tpmstate0"
}

/// The volume (`file`) of a drive value.
pub(crate) fn drive_file(value: &str) -> Option<String> {
    propstr::parse(&propstr::DRIVE, "drive", value)
        .ok()
        .and_then(|m| m.get("file").map(str::to_owned))
}

pub(crate) fn is_cdrom(value: &str) -> bool {
    propstr::parse(&propstr::DRIVE, "drive", value)
        .ok()
        .is_some_and(|m| m.get("media") == Some("cdrom"))
}

pub(crate) fn is_cloudinit(value: &str) -> bool {
    drive_file(value).is_some_and(|f| f.contains("cloudinit"))
}

pub(crate) fn drive_size(value: &str) -> Option<u64> {
    propstr::parse(&propstr::DRIVE, "drive", value)
        .ok()
        .and_then(|m| m.get("size").and_then(propstr::parse_size))
}

/// One volume on a storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Volume {
    pub(crate) volid: String,
    pub(crate) content: String,
    pub(crate) format: String,
    pub(crate) size: u64,
    pub(crate) ctime: u64,
    pub(crate) vmid: Option<u32>,
    /// Uploaded bytes (uploads only); a state file keeps them as separate blobs.
    #[serde(with = "persist::blob")]
    pub(crate) data: Option<Arc<[u8]>>,
}

/// A storage and its volumes.
#[derive(Debug, Clone)]
pub(crate) struct Storage {
    pub(crate) spec: StorageSpec,
    pub(crate) volumes: BTreeMap<String, Volume>,
}

impl Storage {
    /// Where a path-based storage keeps content of one type.
    pub(crate) fn content_dir(&self, content: &str) -> String {
        let base = self.spec.path.as_deref().unwrap_or("/mnt/pve-sim");
        let sub = match content {
            "iso" => "template/iso",
            "vztmpl" => "template/cache",
            "import" => "import",
            "snippets" => "snippets",
            "backup" => "dump",
            _ => "images",
        };
        format!("{base}/{sub}")
    }
}

/// How a task ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TaskEnd {
    Ok,
    Warnings(u32),
    Error(String),
}

impl TaskEnd {
    pub(crate) fn exitstatus(&self) -> String {
        match self {
            Self::Ok => "OK".to_owned(),
            Self::Warnings(n) => format!("WARNINGS: {n}"),
            Self::Error(msg) => msg.clone(),
        }
    }

    fn last_line(&self) -> String {
        match self {
            Self::Ok => "TASK OK".to_owned(),
            Self::Warnings(n) => format!("TASK WARNINGS: {n}"),
            Self::Error(msg) => format!("TASK ERROR: {msg}"),
        }
    }
}

/// What a finished task does to the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Effect {
    None,
    /// Replace the clone placeholder with the real config and add the new volumes.
    FinishClone {
        newid: u32,
        node: String,
        config: BTreeMap<String, String>,
        volumes: Vec<(String, Volume)>,
    },
    /// A failed clone frees its placeholder.
    DropPlaceholder {
        newid: u32,
    },
    Start {
        vmid: u32,
    },
    Stop {
        vmid: u32,
    },
    Destroy {
        vmid: u32,
    },
    Resize {
        vmid: u32,
        key: String,
        value: String,
        volume: Option<(String, String, u64)>,
    },
    Store {
        storage: String,
        volume: Volume,
    },
    Remove {
        storage: String,
        volid: String,
    },
    /// A `POST …/config` worker: nothing left to do, the write already happened.
    Config,
}

/// One worker task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Task {
    pub(crate) upid: String,
    pub(crate) node: String,
    pub(crate) kind: TaskType,
    pub(crate) id: String,
    pub(crate) principal: Principal,
    pub(crate) pid: u32,
    pub(crate) pstart: u64,
    pub(crate) starttime: u64,
    #[serde(with = "persist::instant")]
    pub(crate) due: Instant,
    /// `(storage, from)`: the clone holds an allocation slot on `storage` from `from` to `due`.
    #[serde(with = "persist::slot")]
    pub(crate) slot: Option<(String, Instant)>,
    pub(crate) log: Vec<String>,
    pub(crate) end: TaskEnd,
    pub(crate) effect: Effect,
    pub(crate) finished: bool,
    pub(crate) polls: u32,
}

impl Task {
    /// The log as the API shows it: the final `TASK …` line appears once the task stopped.
    pub(crate) fn visible_log(&self) -> Vec<String> {
        let mut lines = self.log.clone();
        if self.finished {
            lines.push(self.end.last_line());
        }
        lines
    }
}

/// What to start: the caller fills this, [`State::spawn_task`] numbers and schedules it.
pub(crate) struct TaskSpec {
    pub(crate) node: String,
    pub(crate) kind: TaskType,
    pub(crate) id: String,
    pub(crate) log: Vec<String>,
    pub(crate) end: TaskEnd,
    pub(crate) effect: Effect,
    /// Effect if a scripted failure replaces the outcome.
    pub(crate) effect_on_failure: Effect,
    /// When it finishes, counted from now.
    pub(crate) duration: Duration,
    pub(crate) slot: Option<(String, Instant)>,
}

/// Knobs that tests may change while the simulator runs.
#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    pub(crate) timing: Timing,
    pub(crate) clone_limit: Option<usize>,
    pub(crate) invisible_polls: u32,
    pub(crate) resize_returns_null: bool,
    pub(crate) check_iso_magic: bool,
    pub(crate) nextid_lower: u32,
    pub(crate) dhcp_prefix: [u8; 3],
}

/// The whole cluster.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) nodes: Vec<String>,
    pub(crate) vms: BTreeMap<u32, Vm>,
    pub(crate) storages: BTreeMap<String, Storage>,
    pub(crate) pools: BTreeSet<String>,
    pub(crate) tasks: Vec<Task>,
    pub(crate) knobs: Knobs,
    pub(crate) faults: FaultState,
    /// Guest addresses set by tests, overriding `ipconfig0` and the DHCP default.
    pub(crate) guest_addresses: BTreeMap<u32, Vec<std::net::IpAddr>>,
    pub(crate) next_pid: u32,
    pub(crate) writes: u64,
    boot: Instant,
}

/// A configuration that cannot describe a cluster.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfigError {
    /// No node at all.
    #[error("the simulated cluster needs at least one node")]
    NoNodes,
    /// A VM names a node that is not in `nodes`.
    #[error("VM {vmid} is placed on unknown node {node:?}")]
    UnknownNode {
        /// The VM.
        vmid: u32,
        /// Its node.
        node: String,
    },
    /// A VM's disk names a storage that is not configured.
    #[error("VM {vmid} uses unknown storage {storage:?}")]
    UnknownStorage {
        /// The VM.
        vmid: u32,
        /// The storage id.
        storage: String,
    },
    /// Two VMs share an id.
    #[error("VM id {vmid} is defined twice")]
    DuplicateVmid {
        /// The id.
        vmid: u32,
    },
}

pub(crate) fn epoch_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A SHA-256 over `parts`, shortened to the 40 hex digits of PVE's SHA-1 digests.
pub(crate) fn short_digest(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..20])
}

impl State {
    pub(crate) fn new(config: &SimConfig) -> Result<Self, InvalidConfigError> {
        if config.nodes.is_empty() {
            return Err(InvalidConfigError::NoNodes);
        }
        let storages = config
            .storages
            .iter()
            .map(|spec| {
                (
                    spec.id.clone(),
                    Storage {
                        spec: spec.clone(),
                        volumes: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let mut state = Self {
            nodes: config.nodes.clone(),
            vms: BTreeMap::new(),
            storages,
            pools: config.pools.iter().cloned().collect(),
            tasks: Vec::new(),
            knobs: Knobs {
                timing: config.timing.clone(),
                clone_limit: config.clone_limit_per_storage,
                invisible_polls: config.task_invisible_polls,
                resize_returns_null: config.resize_returns_null,
                check_iso_magic: config.check_iso_magic,
                nextid_lower: config.nextid_lower,
                dhcp_prefix: config.dhcp_prefix,
            },
            faults: FaultState::default(),
            guest_addresses: BTreeMap::new(),
            next_pid: 0x0003_A000,
            writes: 0,
            boot: Instant::now(),
        };
        let ctime = epoch_now();
        for spec in &config.templates {
            if !state.nodes.contains(&spec.node) {
                return Err(InvalidConfigError::UnknownNode {
                    vmid: spec.vmid,
                    node: spec.node.clone(),
                });
            }
            if state.vms.contains_key(&spec.vmid) {
                return Err(InvalidConfigError::DuplicateVmid { vmid: spec.vmid });
            }
            let mut cfg: BTreeMap<String, String> = spec.config.iter().cloned().collect();
            if spec.template {
                cfg.insert("template".to_owned(), "1".to_owned());
            }
            for (key, value) in &cfg {
                if !is_disk_key(key) || (is_cdrom(value) && !is_cloudinit(value)) {
                    continue;
                }
                let Some(file) = drive_file(value) else {
                    continue;
                };
                let Some((sid, name)) = file.split_once(':') else {
                    continue;
                };
                let Some(storage) = state.storages.get_mut(sid) else {
                    return Err(InvalidConfigError::UnknownStorage {
                        vmid: spec.vmid,
                        storage: sid.to_owned(),
                    });
                };
                let size = if is_cloudinit(value) {
                    4 << 20
                } else {
                    drive_size(value).unwrap_or(0)
                };
                storage.volumes.insert(
                    file.clone(),
                    Volume {
                        volid: format!("{sid}:{name}"),
                        content: "images".to_owned(),
                        format: "raw".to_owned(),
                        size,
                        ctime,
                        vmid: Some(spec.vmid),
                        data: None,
                    },
                );
            }
            let digest = state.next_digest(&cfg);
            state.vms.insert(
                spec.vmid,
                Vm {
                    vmid: spec.vmid,
                    node: spec.node.clone(),
                    config: cfg,
                    pending: BTreeMap::new(),
                    pending_delete: BTreeSet::new(),
                    digest,
                    power: Power::Stopped,
                    firewall: BTreeMap::new(),
                    firewall_digest: short_digest(&[b"firewall", &spec.vmid.to_be_bytes()]),
                    pool: None,
                },
            );
        }
        Ok(state)
    }

    /// A fresh digest: it changes on every write, even one that changes nothing.
    pub(crate) fn next_digest(&mut self, config: &BTreeMap<String, String>) -> String {
        self.writes += 1;
        let text: String = config.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        short_digest(&[&self.writes.to_be_bytes(), text.as_bytes()])
    }

    /// Re-digests a VM after its config or pending values changed.
    pub(crate) fn touch(&mut self, vmid: u32) {
        let Some(vm) = self.vms.get(&vmid) else {
            return;
        };
        let mut all = vm.config.clone();
        for (k, v) in &vm.pending {
            all.insert(format!("pending.{k}"), v.clone());
        }
        let digest = self.next_digest(&all);
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.digest = digest;
        }
    }

    pub(crate) fn next_pid(&mut self) -> u32 {
        self.next_pid += 0x1F;
        self.next_pid
    }

    /// Applies every task effect whose deadline is at or before `now`, in deadline order.
    pub(crate) fn advance(&mut self, now: Instant) {
        loop {
            let next = self
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.finished && t.due <= now)
                .min_by_key(|(_, t)| t.due)
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let task = &mut self.tasks[i];
            task.finished = true;
            let effect = std::mem::replace(&mut task.effect, Effect::None);
            let due = task.due;
            info!(upid = %task.upid, exitstatus = %task.end.exitstatus(), "task finished");
            self.apply(effect, due);
        }
    }

    fn apply(&mut self, effect: Effect, at: Instant) {
        match effect {
            Effect::None | Effect::Config => {}
            Effect::FinishClone {
                newid,
                node,
                config,
                volumes,
            } => {
                for (sid, volume) in volumes {
                    if let Some(storage) = self.storages.get_mut(&sid) {
                        storage.volumes.insert(volume.volid.clone(), volume);
                    }
                }
                if let Some(vm) = self.vms.get_mut(&newid) {
                    vm.config = config;
                    vm.node = node;
                }
                self.touch(newid);
            }
            Effect::DropPlaceholder { newid } => {
                if self
                    .vms
                    .get(&newid)
                    .is_some_and(|vm| vm.lock() == Some("clone"))
                {
                    self.vms.remove(&newid);
                }
            }
            Effect::Start { vmid } => {
                let pid = self.next_pid();
                let agent_delay = self.knobs.timing.agent_ready;
                let Some(vm) = self.vms.get_mut(&vmid) else {
                    return;
                };
                let changed = vm.apply_pending();
                vm.power = Power::Running {
                    since: at,
                    pid,
                    agent_ready_at: vm.agent_enabled().then_some(at + agent_delay),
                };
                if changed {
                    self.touch(vmid);
                }
            }
            Effect::Stop { vmid } => {
                let Some(vm) = self.vms.get_mut(&vmid) else {
                    return;
                };
                vm.power = Power::Stopped;
                if vm.apply_pending() {
                    self.touch(vmid);
                }
            }
            Effect::Destroy { vmid } => {
                self.vms.remove(&vmid);
                for storage in self.storages.values_mut() {
                    storage.volumes.retain(|_, v| {
                        !(v.vmid == Some(vmid)
                            && matches!(v.content.as_str(), "images" | "rootdir"))
                    });
                }
                debug!(vmid, "VM destroyed");
            }
            Effect::Resize {
                vmid,
                key,
                value,
                volume,
            } => {
                if let Some((sid, volid, size)) = volume
                    && let Some(v) = self
                        .storages
                        .get_mut(&sid)
                        .and_then(|s| s.volumes.get_mut(&volid))
                {
                    v.size = size;
                }
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.config.insert(key, value);
                }
                self.touch(vmid);
            }
            Effect::Store { storage, volume } => {
                if let Some(s) = self.storages.get_mut(&storage) {
                    s.volumes.insert(volume.volid.clone(), volume);
                }
            }
            Effect::Remove { storage, volid } => {
                if let Some(s) = self.storages.get_mut(&storage) {
                    s.volumes.remove(&volid);
                }
            }
        }
    }

    /// Numbers, schedules and records a task; returns its UPID.
    pub(crate) fn spawn_task(&mut self, spec: TaskSpec, who: &Principal, now: Instant) -> String {
        let TaskSpec {
            node,
            kind,
            id,
            mut log,
            mut end,
            mut effect,
            effect_on_failure,
            duration,
            slot,
        } = spec;
        if let Some(msg) = self.faults.take_task_failure(kind) {
            let msg = if kind == TaskType::Clone {
                format!("clone failed: {msg}")
            } else {
                msg
            };
            end = TaskEnd::Error(msg);
            effect = effect_on_failure;
        } else if end == TaskEnd::Ok
            && let Some(n) = self.faults.take_task_warnings(kind)
        {
            for i in 1..=n {
                log.push(format!("WARN: simulated warning {i}"));
            }
            end = TaskEnd::Warnings(n);
        }
        let pid = self.next_pid();
        let pstart = 0x01B2_C3D4 + (now - self.boot).as_millis() as u64 / 10;
        let starttime = epoch_now();
        let upid = format!(
            "UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{}:",
            who.upid_user()
        );
        let due = match &slot {
            Some((_, from)) => *from + duration,
            None => now + duration,
        };
        info!(%upid, ?duration, "task started");
        self.tasks.push(Task {
            upid: upid.clone(),
            node,
            kind,
            id,
            principal: who.clone(),
            pid,
            pstart,
            starttime,
            due,
            slot,
            log,
            end,
            effect,
            finished: false,
            polls: 0,
        });
        // A zero-length task is done at once.
        self.advance(now);
        upid
    }

    /// When a new clone of length `duration` can start allocating on `storage`, if within
    /// the storage lock timeout.
    pub(crate) fn clone_slot(
        &self,
        storage: &str,
        now: Instant,
        duration: Duration,
    ) -> Result<Instant, ()> {
        let Some(limit) = self.knobs.clone_limit else {
            return Ok(now);
        };
        let busy: Vec<(Instant, Instant)> = self
            .tasks
            .iter()
            .filter(|t| !t.finished)
            .filter_map(|t| match &t.slot {
                Some((sid, from)) if sid == storage && t.due > now => Some((*from, t.due)),
                _ => None,
            })
            .collect();
        let deadline = now + self.knobs.timing.storage_lock_timeout;
        let mut candidates: Vec<Instant> = std::iter::once(now)
            .chain(busy.iter().map(|(_, end)| *end))
            .filter(|t| *t >= now && *t <= deadline)
            .collect();
        candidates.sort();
        let overlap_at = |p: Instant| busy.iter().filter(|(s, e)| *s <= p && p < *e).count();
        for start in candidates {
            let end = start + duration;
            let peak = std::iter::once(start)
                .chain(
                    busy.iter()
                        .map(|(s, _)| *s)
                        .filter(|s| *s > start && *s < end),
                )
                .map(overlap_at)
                .max()
                .unwrap_or(0);
            if peak < limit {
                return Ok(start);
            }
        }
        Err(())
    }

    /// Finds a task by UPID for a status or log request on `node`, honouring the
    /// "invisible for the first polls" knob.
    pub(crate) fn poll_task(&mut self, node: &str, upid: &str) -> Option<&Task> {
        let invisible = self.knobs.invisible_polls;
        let task = self
            .tasks
            .iter_mut()
            .find(|t| t.upid == upid && t.node == node)?;
        if task.polls < invisible {
            task.polls += 1;
            return None;
        }
        Some(task)
    }
}
