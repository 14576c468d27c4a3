//! `pve-sim`: an in-memory Proxmox VE API server for testing the coordinator's Proxmox client.
//!
//! It speaks HTTPS on loopback with a throw-away CA, serves the part of `/api2/json` the
//! coordinator uses (clone, config, resize, power, guest agent, storage upload and delete,
//! tasks), and reproduces the real server's quirks: reason phrases as the only error text on
//! old servers, `nextid` as a string, property strings as strings, digests, locks, pending
//! values, UPIDs and task logs. Delays and failures are knobs, so retries and timing can be
//! tested without a cluster. `shared/reference/proxmox-api.md` is the specification; §12 is
//! its checklist.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pve_sim::SimError> {
//! let sim = pve_sim::start(pve_sim::SimConfig::default()).await?;
//! println!("{} trusts {}", sim.base_url(), sim.fingerprint());
//! // … point the client at sim.base_url() with sim.ca_pem() and sim.authorization() …
//! assert_eq!(sim.request_log().mutating_count(), 0);
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`SimConfig`], the starting cluster (nodes, template, storages, tokens) and
//!   the behaviour knobs ([`Timing`], limits, switches).
//! - `server`: the TLS listener, connection handling and the [`Simulator`] handle.
//! - `tls`: the generated CA and node certificate.
//! - `http`: pveproxy's layer: body rules, authentication order, parameter extraction, fault
//!   injection and the JSON/ExtJS envelopes with reason phrases.
//! - `auth`: API tokens, tickets and CSRF tokens.
//! - `multipart`: the upload body parser.
//! - `api`: routing and the handlers (`cluster`, `access`, `qemu`, `tasks`, `storage`).
//! - `schema` and `propstr`: parameter validation and property strings, worded like
//!   `PVE::JSONSchema`.
//! - `state`: VMs, volumes and tasks; tasks finish when their tokio deadline passes.
//! - [`faults`]: request faults, scripted task failures, the `nextid` race.
//! - [`observe`]: the request log and snapshots for assertions.
//! - [`persist`]: the optional state file that carries the cluster across a restart.

mod api;
mod auth;
pub mod config;
pub mod faults;
mod http;
mod multipart;
pub mod observe;
pub mod persist;
mod propstr;
mod schema;
mod server;
mod state;
mod tls;

pub use config::{
    Acl, DEFAULT_NODE, DEFAULT_ROOT_PASSWORD, DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, Grant,
    Secret, SimConfig, StorageKind, StorageSpec, TaskType, TemplateSpec, Timing, TokenSpec,
    UserSpec, parse_duration,
};
pub use faults::{FaultRule, Faults, MethodFilter};
pub use observe::{RequestLog, RequestRecord, TaskSnapshot, VmSnapshot, VmStatus, VolumeSnapshot};
pub use persist::StateFileError;
pub use server::{SimError, Simulator, start, start_with_listener};
pub use state::InvalidConfigError;
pub use tls::TlsSetupError;
