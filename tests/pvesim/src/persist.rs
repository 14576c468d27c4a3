//! The optional state file ([`SimConfig::state_file`](crate::SimConfig::state_file), `pve-sim
//! --state FILE`): the simulated cluster across a restart of the simulator.
//!
//! A restart models what a real node keeps across `systemctl restart pveproxy pvedaemon`:
//! `/etc/pve` and the task logs are on disk, and a running worker (a `qmclone`) is a process
//! of its own that goes on. So the file keeps:
//!
//! 1. the node certificate, its key and the CA (`pve-ssl.pem`): clients that pinned the
//!    fingerprint still connect;
//! 2. the ticket signing key (`authkey`): tickets stay valid;
//! 3. every VM with its config, pending values, power state and lock, every volume (uploaded
//!    bytes as blobs in `FILE.blobs/`, named by their SHA-256), pools, guest addresses;
//! 4. every task with its outcome, log and deadline, in wall-clock time. A clone still
//!    running when the simulator stopped is still running after the start, its VM holding
//!    the placeholder config with `lock: clone`, and ends at its deadline as it would have;
//!    a deadline that passed while the simulator was down ends on the first request.
//!
//! A power loss of the whole host (the worker killed, the placeholder left locked, the task
//! ending in `unexpected status`) is not modelled.
//!
//! Rules:
//! - The file is written at start and after every request other than `GET`, by replacing it
//!   (temporary file, fsync, rename), so a `kill -9` leaves the last complete state. Reads
//!   change nothing that is not derived again from the tasks' deadlines at the next start.
//! - Not kept: the request log, injected faults, knobs (the new start's configuration sets
//!   them) and a clock moved by `advance_clock`.
//! - Times are Unix milliseconds in the file, turned back into the simulator's clock at start.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::state::{State, Task, Vm, Volume};

/// The file format's version.
const VERSION: u32 = 1;

/// Reading or writing the state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file exists but cannot be read.
    #[error("failed to read the simulator state file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a state this simulator wrote, or a blob it names is missing.
    #[error("the simulator state file {path} cannot be used")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// Writing the file or a blob failed.
    #[error("failed to write the simulator state file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state did not encode (a blob could not be written).
    #[error("failed to encode the simulator state for {path}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The version is not [`VERSION`].
    #[error("the simulator state file {path} has version {found}, this simulator reads {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// The TLS identity as PEM (item 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedTls {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

/// What the file holds.
#[derive(Deserialize)]
pub(crate) struct Saved {
    version: u32,
    pub(crate) tls: SavedTls,
    ticket_key: String,
    next_pid: u32,
    writes: u64,
    vms: BTreeMap<u32, Vm>,
    volumes: BTreeMap<String, BTreeMap<String, Volume>>,
    pools: BTreeSet<String>,
    tasks: Vec<Task>,
    guest_addresses: BTreeMap<u32, Vec<IpAddr>>,
}

/// The same, borrowed from the running state for writing.
#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    tls: &'a SavedTls,
    ticket_key: String,
    next_pid: u32,
    writes: u64,
    vms: &'a BTreeMap<u32, Vm>,
    volumes: BTreeMap<&'a str, &'a BTreeMap<String, Volume>>,
    pools: &'a BTreeSet<String>,
    tasks: &'a [Task],
    guest_addresses: &'a BTreeMap<u32, Vec<IpAddr>>,
}

impl Saved {
    /// The ticket signing key.
    pub(crate) fn ticket_key(&self) -> Option<[u8; 32]> {
        hex::decode(&self.ticket_key).ok()?.try_into().ok()
    }

    /// Puts the saved cluster into `state`, a fresh one built from the configuration. Volumes
    /// on storages the configuration no longer has are dropped.
    pub(crate) fn restore(self, state: &mut State) {
        state.vms = self.vms;
        for (sid, volumes) in self.volumes {
            match state.storages.get_mut(&sid) {
                Some(storage) => storage.volumes = volumes,
                None => {
                    tracing::warn!(storage = %sid, "saved storage is not configured; its volumes are dropped")
                }
            }
        }
        state.pools.extend(self.pools);
        state.tasks = self.tasks;
        state.guest_addresses = self.guest_addresses;
        state.next_pid = self.next_pid;
        state.writes = self.writes;
    }
}

/// The state file and its blob directory.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    blobs: PathBuf,
    /// Serializes writers, so the file always ends with the newest state.
    writing: Mutex<()>,
}

impl StateFile {
    pub(crate) fn new(path: &Path) -> Self {
        let mut blobs = path.as_os_str().to_owned();
        blobs.push(".blobs");
        Self {
            path: path.to_owned(),
            blobs: PathBuf::from(blobs),
            writing: Mutex::new(()),
        }
    }

    /// The saved state, `None` when the file does not exist yet. `now` is the simulator's
    /// clock.
    pub(crate) fn load(&self, now: Instant) -> Result<Option<Saved>, StateFileError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateFileError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let saved: Saved = with_context(now, &self.blobs, || serde_json::from_slice(&text))
            .map_err(|source| StateFileError::Parse {
                path: self.path.clone(),
                source,
            })?;
        if saved.version != VERSION {
            return Err(StateFileError::Version {
                path: self.path.clone(),
                found: saved.version,
            });
        }
        Ok(Some(saved))
    }

    /// Writes `state` (rule 1). `lock` gives the state, locked, and the simulator's clock.
    pub(crate) fn save<G: std::ops::Deref<Target = State>>(
        &self,
        tls: &SavedTls,
        ticket_key: &[u8; 32],
        lock: impl FnOnce() -> (G, Instant),
    ) -> Result<(), StateFileError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let encode_err = |source| StateFileError::Encode {
            path: self.path.clone(),
            source,
        };
        let write_err = |source| StateFileError::Write {
            path: self.path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.blobs).map_err(write_err)?;
        let (bytes, referenced) = {
            let (state, now) = lock();
            let saved = SavedRef {
                version: VERSION,
                tls,
                ticket_key: hex::encode(ticket_key),
                next_pid: state.next_pid,
                writes: state.writes,
                vms: &state.vms,
                volumes: state
                    .storages
                    .iter()
                    .map(|(sid, s)| (sid.as_str(), &s.volumes))
                    .collect(),
                pools: &state.pools,
                tasks: &state.tasks,
                guest_addresses: &state.guest_addresses,
            };
            with_context(now, &self.blobs, || {
                let bytes = serde_json::to_vec_pretty(&saved)?;
                Ok((bytes, take_referenced()))
            })
            .map_err(encode_err)?
        };
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        file.as_file().sync_all().map_err(write_err)?;
        file.persist(&self.path).map_err(|e| write_err(e.error))?;
        // Blobs no volume names any more (deleted ISOs).
        if let Ok(entries) = std::fs::read_dir(&self.blobs) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !referenced.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// What the serde helpers below need while one file is read or written.
struct Context {
    now: Instant,
    wall_ms: i64,
    blobs: PathBuf,
    referenced: BTreeSet<String>,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

fn with_context<R>(
    now: Instant,
    blobs: &Path,
    f: impl FnOnce() -> Result<R, serde_json::Error>,
) -> Result<R, serde_json::Error> {
    CONTEXT.with(|c| {
        *c.borrow_mut() = Some(Context {
            now,
            wall_ms: wall_ms(),
            blobs: blobs.to_owned(),
            referenced: BTreeSet::new(),
        });
    });
    let result = f();
    CONTEXT.with(|c| c.borrow_mut().take());
    result
}

fn take_referenced() -> BTreeSet<String> {
    CONTEXT.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map(|c| std::mem::take(&mut c.referenced))
            .unwrap_or_default()
    })
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `(simulator now, wall-clock now in ms)`; outside a file operation, the real clocks.
fn reference() -> (Instant, i64) {
    CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .map_or_else(|| (Instant::now(), wall_ms()), |c| (c.now, c.wall_ms))
    })
}

fn to_ms(at: Instant) -> i64 {
    let (now, wall) = reference();
    if at >= now {
        wall + (at - now).as_millis() as i64
    } else {
        wall - (now - at).as_millis() as i64
    }
}

fn from_ms(ms: i64) -> Instant {
    let (now, wall) = reference();
    let delta = Duration::from_millis(ms.abs_diff(wall));
    if ms >= wall {
        now + delta
    } else {
        now.checked_sub(delta).unwrap_or(now)
    }
}

/// `Instant` as Unix milliseconds.
pub(crate) mod instant {
    use serde::{Deserialize, Deserializer, Serializer};
    use tokio::time::Instant;

    pub(crate) fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(super::to_ms(*at))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        Ok(super::from_ms(i64::deserialize(d)?))
    }
}

/// `Option<Instant>` as Unix milliseconds or null.
pub(crate) mod opt_instant {
    use serde::{Deserialize, Deserializer, Serializer};
    use tokio::time::Instant;

    pub(crate) fn serialize<S: Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_some(&super::to_ms(*at)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Instant>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.map(super::from_ms))
    }
}

/// A clone's storage slot `(storage, from)`, `from` as Unix milliseconds.
pub(crate) mod slot {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use tokio::time::Instant;

    pub(crate) fn serialize<S: Serializer>(
        slot: &Option<(String, Instant)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        slot.as_ref()
            .map(|(sid, from)| (sid, super::to_ms(*from)))
            .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<(String, Instant)>, D::Error> {
        Ok(Option::<(String, i64)>::deserialize(d)?.map(|(sid, ms)| (sid, super::from_ms(ms))))
    }
}

/// Uploaded bytes as the name of a blob file (item 3).
pub(crate) mod blob {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::Error as _};

    pub(crate) fn serialize<S: Serializer>(
        data: &Option<Arc<[u8]>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match data {
            Some(bytes) => s.serialize_some(&super::store_blob(bytes).map_err(S::Error::custom)?),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<[u8]>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(name) => super::load_blob(&name)
                .map(|bytes| Some(Arc::from(bytes)))
                .map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

fn blob_dir() -> Result<PathBuf, String> {
    CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|c| c.blobs.clone())
            .ok_or_else(|| "uploaded bytes are only encoded into a state file".to_owned())
    })
}

fn store_blob(bytes: &[u8]) -> Result<String, String> {
    let name = hex::encode(Sha256::digest(bytes));
    let path = blob_dir()?.join(&name);
    if !path.exists() {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let write = || -> std::io::Result<()> {
            let mut file = tempfile::NamedTempFile::new_in(dir)?;
            file.write_all(bytes)?;
            file.as_file().sync_all()?;
            file.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|e| format!("failed to write blob {}: {e}", path.display()))?;
    }
    CONTEXT.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.referenced.insert(name.clone());
        }
    });
    Ok(name)
}

fn load_blob(name: &str) -> Result<Vec<u8>, String> {
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{name:?} is not a blob name"));
    }
    let path = blob_dir()?.join(name);
    std::fs::read(&path).map_err(|e| format!("failed to read blob {}: {e}", path.display()))
}
