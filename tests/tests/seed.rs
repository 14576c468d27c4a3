//! The rendered seed against the real tools: `cloud-init schema` for user-data,
//! `cloud-init devel net-convert` for network-config (Debian ENI and Ubuntu netplan), and
//! `isoinfo` for the image. scripts/setup installs cloud-init, genisoimage and xorriso.

use std::{net::Ipv4Addr, path::Path, process::Command};

use homelab::{
    pki::NodeName,
    seed::{InterfaceMatch, Seed, SeedInput},
};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";

fn seed(interface: InterfaceMatch) -> Seed {
    let node = NodeName::parse("k3s-node-1").unwrap();
    let dns = [Ipv4Addr::new(192, 168, 0, 1)];
    Seed::render(&SeedInput {
        node: &node,
        instance_id: "iid-101-5e1f",
        user: "ops",
        ssh_public_key: KEY,
        locale: "C.UTF-8",
        coordinator_url: "https://192.168.0.10:7443",
        ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        token: "hlet_0123456789abcdefghijklmnopqrstuvwxyzABCDEF",
        interface,
        address: Ipv4Addr::new(192, 168, 0, 101),
        prefix: 24,
        gateway: Ipv4Addr::new(192, 168, 0, 1),
        dns: &dns,
        search_domain: Some("home.internal"),
    })
    .unwrap()
}

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is missing: run scripts/setup (it installs cloud-init, genisoimage and xorriso)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn user_data_passes_cloud_init_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user-data");
    std::fs::write(
        &path,
        seed(InterfaceMatch::Mac("bc:24:11:5a:3c:7e".into())).user_data,
    )
    .unwrap();
    run(Command::new(tool("cloud-init"))
        .args(["schema", "-c"])
        .arg(&path));
}

#[test]
fn cloud_init_schema_catches_a_broken_user_data() {
    // The validator itself must be able to fail, or the test above proves nothing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user-data");
    let broken = seed(InterfaceMatch::Mac("bc:24:11:5a:3c:7e".into()))
        .user_data
        .replace("permissions: \"0600\"", "permissions: 0600");
    std::fs::write(&path, broken).unwrap();
    let out = Command::new(tool("cloud-init"))
        .args(["schema", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unquoted permissions value must be refused"
    );
}

fn net_convert(network_config: &str, distro: &str, output: &str, dir: &Path) -> String {
    let input = dir.join("network-config");
    std::fs::write(&input, network_config).unwrap();
    let out_dir = dir.join(format!("out-{distro}"));
    run(Command::new(tool("cloud-init"))
        .args(["devel", "net-convert", "-p"])
        .arg(&input)
        .args(["-k", "yaml", "-d"])
        .arg(&out_dir)
        .args(["-D", distro, "-O", output]));
    let mut text = String::new();
    for entry in walk(&out_dir) {
        text.push_str(&std::fs::read_to_string(entry).unwrap_or_default());
    }
    text
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn network_config_renders_for_debian_and_ubuntu() {
    let dir = tempfile::tempdir().unwrap();
    let config = seed(InterfaceMatch::Mac("bc:24:11:5a:3c:7e".into())).network_config;
    let eni = net_convert(&config, "debian", "eni", dir.path());
    assert!(eni.contains("192.168.0.101"), "{eni}");
    assert!(eni.contains("192.168.0.1"), "{eni}");
    let netplan = net_convert(&config, "ubuntu", "netplan", dir.path());
    assert!(netplan.contains("192.168.0.101/24"), "{netplan}");
    assert!(netplan.contains("bc:24:11:5a:3c:7e"), "{netplan}");
    let by_name = seed(InterfaceMatch::Name("ens18".into())).network_config;
    let netplan = net_convert(&by_name, "ubuntu", "netplan", dir.path());
    assert!(netplan.contains("ens18"), "{netplan}");
}

#[test]
fn the_iso_carries_exact_names_and_the_cidata_label() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed(InterfaceMatch::Mac("bc:24:11:5a:3c:7e".into()));
    let agent = b"\x7fELF pretend agent binary".repeat(1000);
    let image = seed.iso(&agent).unwrap();
    let path = dir.path().join("seed.iso");
    std::fs::write(&path, &image).unwrap();
    let isoinfo = tool("isoinfo");
    let info = run(Command::new(&isoinfo).arg("-d").arg("-i").arg(&path));
    assert!(info.contains("Volume id: cidata"), "{info}");
    assert!(info.contains("Joliet"), "{info}");
    let listing = run(Command::new(&isoinfo).args(["-J", "-f", "-i"]).arg(&path));
    for name in [
        "/user-data",
        "/meta-data",
        "/network-config",
        "/homelab-agent",
    ] {
        assert!(
            listing.lines().any(|l| l == name),
            "{name} missing from {listing}"
        );
    }
    let user_data = run(Command::new(&isoinfo)
        .args(["-J", "-x", "/user-data", "-i"])
        .arg(&path));
    assert_eq!(user_data, seed.user_data);
    let extracted = Command::new(&isoinfo)
        .args(["-J", "-x", "/homelab-agent", "-i"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(extracted.stdout, agent);
}

/// Golden files: the rendered seed must match `tests/testdata/seed/`, so any change to what
/// a node receives shows up in review. `UPDATE_GOLDEN=1 cargo test --test seed` rewrites them.
#[test]
fn rendered_seed_matches_the_golden_files() {
    let seed = seed(InterfaceMatch::Mac("bc:24:11:5a:3c:7e".into()));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/seed");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, data) in seed.files() {
        let path = dir.join(name);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, data).unwrap();
            continue;
        }
        let golden = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert_eq!(
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&golden),
            "{name} differs from {}; if the change is intended, rerun with UPDATE_GOLDEN=1",
            path.display()
        );
    }
}
