//! A typed client for the part of the Proxmox VE REST API that homelab uses, built from
//! `shared/reference/proxmox-api.md` (the server's real behaviour, quirks included).
//!
//! # Layout
//! - [`client`]: the one request function: auth (API token, or ticket plus CSRF), encoding,
//!   the `{"data": …}` envelope, both error shapes, retries of transient failures.
//! - [`api`]: one typed wrapper per endpoint, the task waiter, the lock waiter and the VMID
//!   allocator.
//! - [`error`]: [`ProxmoxError`] and its classification.
//! - [`tls`]: trust by CA or by certificate fingerprint.
//! - [`upid`]: task ids.
//! - [`de`]: lenient decoding of `0`/`1` booleans and numbers sent as strings.

pub mod api;
pub mod client;
pub mod de;
pub mod error;
pub mod tls;
pub mod upid;

pub use api::{
    CloneRequest, PowerAction, TaskOutcome, VmConfig, VmResource, VmStatus, VmidAllocator, Volume,
};
pub use client::{Auth, Client, ClientConfig, Idempotency, RetryPolicy};
pub use error::{ApiErrorKind, ProxmoxError, Secret};
pub use tls::Trust;
pub use upid::Upid;
