//! Network namespaces for the fault tests: each agent is a separate host, linked to the
//! coordinator's host by its own veth pair, so a test can cut one link or all of them.
//!
//! Rules:
//! 1. Every namespace is created by the test (`ip netns add`), named `hlt-<pid>-<n>-<role>`
//!    with a process-wide counter, and deleted when its [`Netns`] is dropped, also after a
//!    panic. Nothing is created or changed in the root namespace: veth pairs are created
//!    inside the hub namespace with their peer moved straight into the node's namespace.
//! 2. Addresses exist only inside these namespaces: link `i` is `10.231.<i+1>.0/24`, the hub's
//!    end `.1`, the node's end `.2`. Two tests may use the same addresses: each namespace has
//!    its own stack.
//! 3. Cutting a link sets the hub's end down. The node's end loses its carrier, so its
//!    packets vanish without an error, as on a pulled cable or a dead switch port.
//! 4. Creating a namespace needs root and iproute2. If `ip netns add` fails the test panics
//!    naming why; it never passes without having run.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace this test created; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with its loopback up. `role` ends its name (a few characters).
    pub fn create(role: &str) -> Self {
        let name = format!(
            "hlt-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`ip netns add {name}` failed ({}): {}; the fault tests need root \
                 (CAP_SYS_ADMIN) to create network namespaces",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!(
                "cannot run `ip` ({e}); the fault tests need iproute2 (apt-get install iproute2) and root"
            ),
        }
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS…`; panics with ip's message on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "`ip -n {} {}` failed: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it, and their peers.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// A hub namespace (the coordinator's host) and one namespace per node, each linked to the
/// hub by a veth pair (rule 2).
pub struct Lab {
    /// Dropped after the nodes' namespaces (fields drop in declaration order).
    pub nodes: Vec<Netns>,
    pub hub: Netns,
}

impl Lab {
    pub fn new(nodes: usize) -> Self {
        let hub = Netns::create("hub");
        let mut lab = Self {
            nodes: Vec::new(),
            hub,
        };
        for i in 0..nodes {
            let node = Netns::create(&format!("n{i}"));
            let hub_end = Self::hub_end(i);
            lab.hub.ip(&[
                "link",
                "add",
                &hub_end,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                node.name(),
            ]);
            lab.hub.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::hub_address(i)),
                "dev",
                &hub_end,
            ]);
            lab.hub.ip(&["link", "set", &hub_end, "up"]);
            node.ip(&[
                "addr",
                "add",
                &format!("10.231.{}.2/24", i + 1),
                "dev",
                "uplink",
            ]);
            node.ip(&["link", "set", "uplink", "up"]);
            lab.nodes.push(node);
        }
        lab
    }

    /// The hub's address on link `i`: what node `i` dials.
    pub fn hub_address(i: usize) -> String {
        format!("10.231.{}.1", i + 1)
    }

    /// `--san` arguments for `homelab init` covering every hub address.
    pub fn san_args(&self) -> Vec<String> {
        (0..self.nodes.len())
            .flat_map(|i| ["--san".to_owned(), Self::hub_address(i)])
            .collect()
    }

    fn hub_end(i: usize) -> String {
        format!("n{i}")
    }

    /// Cuts link `i` (rule 3).
    pub fn cut(&self, i: usize) {
        self.hub.ip(&["link", "set", &Self::hub_end(i), "down"]);
    }

    /// Restores link `i`.
    pub fn restore(&self, i: usize) {
        self.hub.ip(&["link", "set", &Self::hub_end(i), "up"]);
    }

    /// Cuts every link: the hub is partitioned from all nodes.
    pub fn partition(&self) {
        for i in 0..self.nodes.len() {
            self.cut(i);
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for i in 0..self.nodes.len() {
            self.restore(i);
        }
    }
}
