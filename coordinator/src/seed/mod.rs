//! Building NoCloud seed images that carry a VM's cloud-init data and the node agent.
//!
//! # Layout
//! - [`render`]: `user-data`, `meta-data` and `network-config` from the templates in
//!   `cloud-init/`.
//! - [`iso`]: the ISO 9660 (with Joliet) image writer, labelled `cidata`.

pub mod iso;
pub mod render;

pub use render::{InterfaceMatch, Seed, SeedError, SeedInput};
