//! The homelab coordinator: the CLI and daemon that turn a Proxmox VE host into a K3s cluster.
//!
//! # Layout
//! - [`cli`]: one file per `homelab` subcommand, each with its `Args` and `run`.
//! - [`core`]: the domain: enrollment, link sessions, directives, revocation, events.
//! - [`grpc`]: the gRPC services over mutual TLS; they convert and delegate to [`core`].
//! - [`pki`]: the homelab CA, node CSR signing and peer identities.
//! - [`spec`]: the cluster spec, `homelab.toml`, parsed strictly.
//! - [`proxmox`]: the typed Proxmox VE API client.
//! - [`seed`]: NoCloud seeds: rendering and the ISO image.
//! - [`nodeops`]: kubeconfig and node removal, carried out through the agents.
//! - [`orchestrate`]: which node gets which K3s install plan, and when.
//! - [`provision`]: reconciling the spec's VMs with Proxmox (plan, apply, destroy).
//! - [`store`]: the SQLite state database and its migrations.
//! - [`state_dir`]: the files of the state directory.
//! - [`token`]: one-time enrollment tokens.
//! - [`fsutil`]: atomic, permission-exact file writes.

pub mod cli;
pub mod core;
pub mod fsutil;
pub mod grpc;
pub mod nodeops;
pub mod orchestrate;
pub mod pki;
pub mod provision;
pub mod proxmox;
pub mod seed;
pub mod spec;
pub mod state_dir;
pub mod store;
pub mod token;

/// Formats an error with all its causes, outermost first: `a: b: c`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
