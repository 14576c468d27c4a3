//! `homelab up` against the Proxmox simulator. The simulator creates VMs but boots nothing, so
//! first `up` must time out naming what each node waits for; then, with local agents standing
//! in for the booted VMs (K3s fakes in their host roots), `up` ends with every node Ready and
//! writes a kubeconfig. Re-running never duplicates a VM.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{AgentProcess, bin, finish_child, prepare_fake_k3s_at, wait_for};
use homelab::{spec::EXAMPLE, state_dir::StateDir};
use pve_sim::SimConfig;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";
const NAMES: [&str; 3] = ["k3s-control", "k3s-node-1", "k3s-node-2"];

struct Setup {
    dir: tempfile::TempDir,
    state: StateDir,
    spec: PathBuf,
    agent_bin: PathBuf,
}

fn setup(sim: &pve_sim::Simulator) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pve-root-ca.pem"), sim.ca_pem()).unwrap();
    std::fs::write(dir.path().join("token"), sim.token_secret()).unwrap();
    std::fs::write(dir.path().join("id.pub"), KEY).unwrap();
    let spec = EXAMPLE
        .replace(
            "https://192.168.0.250:8006",
            &format!("https://{}", sim.addr()),
        )
        .replace("homelab@pve!coordinator", sim.token_id())
        .replace(
            "token_secret_env = \"HOMELAB_PROXMOX_TOKEN\"",
            "token_secret_file = \"token\"",
        )
        .replace("~/.ssh/id_ed25519.pub", "id.pub")
        .replace("https://192.168.0.10:7443", "https://127.0.0.1:7443")
        // The coordinator sends the (fake) installer itself: no download anywhere.
        .replace("[k3s]", "[k3s]\ninstaller_file = \"install.sh\"");
    std::fs::copy(
        common::testdata("fake-install.sh"),
        dir.path().join("install.sh"),
    )
    .unwrap();
    let spec_path = dir.path().join("homelab.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let agent_bin = dir.path().join("homelab-agent");
    std::fs::write(&agent_bin, b"\x7fELF a stand-in agent binary").unwrap();
    let state = StateDir::new(dir.path().join("state"));
    Setup {
        dir,
        state,
        spec: spec_path,
        agent_bin,
    }
}

fn up(s: &Setup, timeout: &str) -> Child {
    Command::new(bin("homelab"))
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .arg("--state-dir")
        .arg(s.state.root())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            timeout,
            "--spec",
        ])
        .arg(&s.spec)
        .arg("--agent-bin")
        .arg(&s.agent_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn vms(sim: &pve_sim::Simulator) -> usize {
    sim.vms().iter().filter(|v| !v.template).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_names_what_each_node_waits_for_then_finishes_when_nodes_call_home() {
    let sim = pve_sim::start(SimConfig::default()).await.unwrap();
    let s = setup(&sim);

    // 1. Nothing boots: up creates the VMs, then times out naming each node's wait.
    let (ok, _, stderr) = tokio::task::spawn_blocking({
        let child = up(&s, "3s");
        move || finish_child(child, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(!ok, "up must fail when the cluster is not Ready");
    for name in NAMES {
        assert!(
            stderr.contains(&format!("{name}: its VM has not enrolled")),
            "{stderr}"
        );
    }
    assert_eq!(vms(&sim), 3);

    // 2. Again, and this time the "VMs" boot: local agents with fresh tokens call home.
    let _ = std::fs::remove_file(s.state.address_file());
    let child = up(&s, "60s");
    let address = wait_for(
        Duration::from_secs(30),
        "the in-process coordinator",
        || std::fs::read_to_string(s.state.address_file()).ok(),
    );
    let url = format!("https://{}", address.trim());
    let cluster = s.dir.path().join("fake-cluster");
    std::fs::create_dir_all(&cluster).unwrap();
    let mut agents = Vec::new();
    for name in NAMES {
        let token = Command::new(bin("homelab"))
            .arg("--state-dir")
            .arg(s.state.root())
            .args(["token", "create", name])
            .output()
            .unwrap();
        assert!(token.status.success());
        let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let (extra, _) = prepare_fake_k3s_at(s.dir.path(), name, &cluster);
        agents.push(AgentProcess::start_at(
            s.dir.path(),
            &url,
            &s.state,
            name,
            &token,
            &extra,
        ));
    }
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || finish_child(child, Duration::from_secs(90)))
            .await
            .unwrap();
    assert!(ok, "up failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("The cluster is Ready"), "{stdout}");
    assert_eq!(vms(&sim), 3, "re-running never duplicates a VM");
    // The seeds held one-time tokens: once the nodes enrolled, up removed them.
    assert!(
        !sim.storage_contents()
            .iter()
            .any(|v| v.volid.contains("seed-")),
        "{:?}",
        sim.storage_contents()
    );
    for vm in sim.vms().iter().filter(|v| !v.template) {
        assert!(
            !vm.config.values().any(|v| v.contains("seed-")),
            "{:?}",
            vm.config
        );
    }
    let kubeconfig = s.dir.path().join(".kube/homelab.yaml");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .contains("192.168.0.100:6443")
    );
    drop(agents);
    sim.shutdown().await;
}
