//! Facts about the machine the agent runs on, read under a configurable root.

use std::{fs, path::Path};

use homelab_proto::v1::NodeFacts;

/// Collects hostname, machine-id, product UUID, addresses and OS under `root`.
pub fn collect(root: &Path) -> NodeFacts {
    let read = |rel: &str| {
        fs::read_to_string(root.join(rel))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut hostname = read("etc/hostname");
    if hostname.is_empty() {
        hostname = read("proc/sys/kernel/hostname");
    }
    let os = os_pretty_name(&read("etc/os-release"));
    NodeFacts {
        hostname,
        machine_id: read("etc/machine-id"),
        // Readable by root only on most machines; empty otherwise, as the contract allows.
        product_uuid: read("sys/class/dmi/id/product_uuid"),
        ip_addresses: addresses(),
        os,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

fn os_pretty_name(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// Non-loopback addresses of the machine's interfaces.
fn addresses() -> Vec<String> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .filter(|i| !i.is_loopback())
            .map(|i| i.ip().to_string())
            .collect(),
        Err(e) => {
            log::warn!("cannot list network interfaces: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_configured_root() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/machine-id"), "0123abcd\n").unwrap();
        fs::write(root.path().join("etc/hostname"), "k3s-node-1\n").unwrap();
        fs::write(
            root.path().join("etc/os-release"),
            "NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        let facts = collect(root.path());
        assert_eq!(facts.machine_id, "0123abcd");
        assert_eq!(facts.hostname, "k3s-node-1");
        assert_eq!(facts.os, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(facts.product_uuid, "");
    }
}
