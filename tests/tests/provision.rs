//! The Proxmox client and the reconciler against the Proxmox VE simulator (HTTPS on
//! 127.0.0.1:0): a full apply of the example spec, a no-op re-apply, idempotent destroy,
//! retries, task failures, parameter errors, conflicts and the nextid race.

use std::{path::PathBuf, sync::Arc, time::Duration};

use homelab::{
    provision::{Action, Provisioner, Timeouts, client_for, seed_file},
    proxmox::{Auth, Client, ClientConfig, CloneRequest, ProxmoxError, Secret, Trust},
    spec::{EXAMPLE, Spec},
    state_dir::StateDir,
};
use pve_sim::{FaultRule, MethodFilter, SimConfig, Simulator, TaskType};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";
const NAMES: [&str; 3] = ["k3s-control", "k3s-node-1", "k3s-node-2"];

/// A simulator, a coordinator state directory and the example spec pointed at the simulator.
struct Env {
    sim: Simulator,
    _dir: tempfile::TempDir,
    state: StateDir,
    spec_path: PathBuf,
    agent_bin: PathBuf,
}

impl Env {
    async fn start(config: SimConfig) -> Self {
        let sim = pve_sim::start(SimConfig {
            check_iso_magic: true,
            ..config
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        state.init(&[], false).unwrap();
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
            .replace("~/.ssh/id_ed25519.pub", "id.pub");
        let spec_path = dir.path().join("homelab.toml");
        std::fs::write(&spec_path, spec).unwrap();
        let agent_bin = dir.path().join("homelab-agent");
        std::fs::write(&agent_bin, b"\x7fELF a stand-in agent binary").unwrap();
        Self {
            sim,
            _dir: dir,
            state,
            spec_path,
            agent_bin,
        }
    }

    fn client_config(&self) -> ClientConfig {
        let spec = Spec::from_file(&self.spec_path).unwrap();
        let mut config = client_for(&spec, self.spec_path.parent().unwrap()).unwrap();
        config.task_poll = Duration::from_millis(20);
        config.retry.base_delay = Duration::from_millis(50);
        config
    }

    fn provisioner(&self) -> Arc<Provisioner> {
        let spec = Spec::from_file(&self.spec_path).unwrap();
        let client = Client::new(self.client_config()).unwrap();
        let timeouts = Timeouts {
            clone: Duration::from_secs(20),
            unlock: Duration::from_secs(20),
            upload: Duration::from_secs(20),
            power: Duration::from_secs(20),
            delete: Duration::from_secs(20),
        };
        Arc::new(
            Provisioner::new(
                spec,
                self.spec_path.parent().unwrap().to_path_buf(),
                client,
                self.state.clone(),
                self.agent_bin.clone(),
                Box::new(|_| {}),
            )
            .unwrap()
            .with_timeouts(timeouts),
        )
    }

    /// The simulator's non-template VMs, by name.
    fn vms(&self) -> Vec<pve_sim::VmSnapshot> {
        let mut vms: Vec<_> = self.sim.vms().into_iter().filter(|v| !v.template).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    }
}

#[tokio::test]
async fn apply_builds_the_example_homelab_then_reapply_is_a_noop_and_destroy_is_idempotent() {
    let env = Env::start(SimConfig::default()).await;
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    assert_eq!(plan.template_vmid, 9000);
    assert!(
        plan.vms.iter().all(|vm| vm.action == Action::Create),
        "{plan:?}"
    );
    assert_eq!(
        env.sim.request_log().mutating_count(),
        0,
        "planning changes nothing"
    );

    let applied = provisioner.apply(&plan).await.unwrap();
    assert_eq!(applied.len(), 3);
    let vms = env.vms();
    let names: Vec<_> = vms.iter().map(|v| v.name.clone().unwrap()).collect();
    assert_eq!(names, NAMES);
    for (vm, (cores, memory)) in vms.iter().zip([(2, 4096), (2, 4096), (2, 2048)]) {
        let name = vm.name.as_deref().unwrap();
        let c = &vm.config;
        assert_eq!(c["cores"], cores.to_string(), "{name}");
        assert_eq!(c["memory"], memory.to_string(), "{name}");
        assert!(
            c["net0"].contains("bridge=vmbr0") && c["net0"].contains("firewall=1"),
            "{name}: {}",
            c["net0"]
        );
        assert!(
            c["ide3"].contains(&format!("local:iso/{}", seed_file(u64::from(vm.vmid)))),
            "{name}: {c:?}"
        );
        assert!(
            !c.values().any(|v| v.contains("cloudinit")),
            "Proxmox's cloud-init drive removed: {c:?}"
        );
        assert!(c["description"].contains("homelab-managed"), "{name}");
        assert_eq!(vm.status, pve_sim::VmStatus::Running, "{name}");
        let iso = env
            .sim
            .volume_bytes(&format!("local:iso/{}", seed_file(u64::from(vm.vmid))))
            .expect("seed uploaded");
        assert_eq!(&iso[32769..32774], b"CD001");
    }
    let firewall = env
        .sim
        .request_log()
        .records
        .iter()
        .filter(|r| {
            r.method == "PUT"
                && r.path.ends_with("/firewall/options")
                && r.params.get("enable").map(String::as_str) == Some("1")
        })
        .count();
    assert_eq!(firewall, 3, "the firewall is enabled on every VM");
    // Each seed carries its own one-time token; only hashes are stored.
    let store = env.state.open_store().unwrap();
    for name in NAMES {
        let node = store.node(name).unwrap().expect("node recorded");
        assert_eq!(node.state, homelab::store::NodeState::Pending);
    }
    drop(store);

    // Re-applying changes nothing: the plan is a no-op and applying it makes no changing call.
    env.sim.clear_request_log();
    let again = env.provisioner();
    let plan = again.plan().await.unwrap();
    assert!(plan.is_noop(), "{plan:?}");
    again.apply(&plan).await.unwrap();
    assert_eq!(
        env.sim.request_log().mutating_count(),
        0,
        "{:?}",
        env.sim.request_log().records
    );
    assert_eq!(env.vms().len(), 3, "no VM duplicated");

    // Destroy, then destroy again: both succeed; the VMs and their seeds are gone.
    let destroyed = again.destroy(&[]).await.unwrap();
    assert!(destroyed.iter().all(|d| d.vmid.is_some()), "{destroyed:?}");
    assert!(env.vms().is_empty());
    assert!(
        !env.sim
            .storage_contents()
            .iter()
            .any(|v| v.volid.contains("seed-")),
        "{:?}",
        env.sim.storage_contents()
    );
    let destroyed = again.destroy(&[]).await.unwrap();
    assert!(destroyed.iter().all(|d| d.vmid.is_none()), "{destroyed:?}");
    env.sim.shutdown().await;
}

#[tokio::test]
async fn lock_timeouts_and_5xx_are_retried() {
    let env = Env::start(SimConfig::default()).await;
    let faults = env.sim.faults();
    // The first VM gets VMID 100: its first config write hits a lock timeout, and the first
    // resource listing a failed proxy hop.
    faults.fail_requests(FaultRule::config_lock_timeout("pve", 100).times(1));
    faults.fail_requests(
        FaultRule::new(MethodFilter::Get, "/cluster/resources", 596, "Broken pipe").times(1),
    );
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    provisioner.apply(&plan).await.unwrap();
    assert_eq!(env.vms().len(), 3);
    let log = env.sim.request_log();
    let config_puts: Vec<_> = log
        .matching("PUT", "/nodes/pve/qemu/100/config")
        .map(|r| r.status)
        .collect();
    assert_eq!(config_puts, [500, 200], "retried after the lock timeout");
    let listings: Vec<_> = log
        .matching("GET", "/cluster/resources")
        .map(|r| r.status)
        .collect();
    assert_eq!(&listings[..2], [596, 200], "retried after the 596");
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_failing_task_surfaces_its_exact_error_text() {
    let env = Env::start(SimConfig::default()).await;
    let text = "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout";
    env.sim.faults().fail_next_task(TaskType::Clone, text);
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    let err = provisioner.apply(&plan).await.unwrap_err();
    let chain = homelab::error_chain(&err);
    assert!(chain.contains(text), "{chain}");
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_parameter_error_names_the_parameter_in_both_error_shapes() {
    let env = Env::start(SimConfig::default()).await;
    let client = Client::new(env.client_config()).unwrap();
    let request = CloneRequest {
        node: "pve",
        template_vmid: 9000,
        new_vmid: 150,
        name: "bad_name",
        full: false,
        storage: None,
        description: "x",
    };
    for legacy in [false, true] {
        env.sim.set_legacy_errors(legacy);
        let err = client.clone_vm(&request).await.unwrap_err();
        let ProxmoxError::Api {
            status,
            errors,
            message,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*status, 400);
        assert!(errors.contains_key("name"), "{errors:?}");
        assert!(
            message.contains("Parameter verification failed"),
            "legacy={legacy}: {message}"
        );
        assert!(err.to_string().contains("parameter name:"), "{err}");
    }
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_vm_homelab_did_not_create_is_a_conflict_and_nothing_changes() {
    let env = Env::start(SimConfig::default()).await;
    let client = Client::new(env.client_config()).unwrap();
    let task = client
        .clone_vm(&CloneRequest {
            node: "pve",
            template_vmid: 9000,
            new_vmid: 200,
            name: "k3s-node-1",
            full: false,
            storage: None,
            description: "someone else's VM",
        })
        .await
        .unwrap();
    client
        .wait_task(&task, Duration::from_secs(10))
        .await
        .unwrap();
    env.sim.clear_request_log();
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    assert_eq!(plan.conflicts(), ["k3s-node-1"]);
    assert!(provisioner.apply(&plan).await.is_err());
    assert_eq!(env.sim.request_log().mutating_count(), 0);
    // Destroy leaves it alone too.
    provisioner
        .destroy(&["k3s-node-1".to_owned()])
        .await
        .unwrap();
    assert!(env.sim.vm(200).is_some());
    env.sim.shutdown().await;
}

#[tokio::test]
async fn nextid_races_do_not_collide() {
    let env = Env::start(SimConfig::default()).await;
    env.sim.faults().set_nextid_race(true);
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    let applied = provisioner.apply(&plan).await.unwrap();
    let mut vmids: Vec<_> = applied.iter().map(|a| a.vmid).collect();
    vmids.sort_unstable();
    vmids.dedup();
    assert_eq!(vmids.len(), 3, "{applied:?}");
    assert_eq!(env.vms().len(), 3);
    env.sim.shutdown().await;
}

#[tokio::test]
async fn ticket_authentication_works_as_a_fallback() {
    let env = Env::start(SimConfig::default()).await;
    let config = ClientConfig::new(
        format!("https://{}", env.sim.addr()),
        Auth::Password {
            username: "root@pam".into(),
            password: Secret::new(pve_sim::DEFAULT_ROOT_PASSWORD),
        },
        Trust::Ca(env.sim.ca_pem().to_owned()),
    );
    let client = Client::new(config).unwrap();
    assert_eq!(client.version().await.unwrap(), "9.1.2");
    // A write needs the CSRF token, which the client sends with the ticket.
    let vmid = homelab::proxmox::VmidAllocator::default()
        .allocate(&client)
        .await
        .unwrap();
    assert!(vmid >= 100);
    env.sim.shutdown().await;
}

#[tokio::test]
async fn the_cli_dry_run_prints_the_plan_and_changes_nothing() {
    let env = Env::start(SimConfig::default()).await;
    let homelab = {
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("homelab")
    };
    assert!(
        homelab.is_file(),
        "run `cargo build --workspace --bins` first"
    );
    let spec = env.spec_path.clone();
    let state = env.state.root().to_path_buf();
    let out = tokio::process::Command::new(&homelab)
        .arg("--state-dir")
        .arg(&state)
        .args(["apply", "--dry-run", "--output", "json", "--spec"])
        .arg(&spec)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<_> = json["plan"]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["create", "create", "create"]);
    assert_eq!(env.sim.request_log().mutating_count(), 0);
    // Destroy refuses without --yes when stdin is not a terminal.
    let out = tokio::process::Command::new(&homelab)
        .arg("--state-dir")
        .arg(&state)
        .args(["destroy", "--spec"])
        .arg(&spec)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    env.sim.shutdown().await;
}

#[tokio::test]
async fn an_apply_interrupted_between_clone_and_seed_is_finished_by_the_next() {
    let env = Env::start(SimConfig::default()).await;
    // The first seed upload fails: that VM is cloned but never seeded or configured.
    env.sim.faults().fail_requests(
        FaultRule::new(
            MethodFilter::Post,
            "/nodes/pve/storage/local/upload",
            500,
            "upload failed",
        )
        .times(1),
    );
    let provisioner = env.provisioner();
    let plan = provisioner.plan().await.unwrap();
    assert!(provisioner.apply(&plan).await.is_err());

    let again = env.provisioner();
    let plan = again.plan().await.unwrap();
    let reseeded: Vec<_> = plan
        .vms
        .iter()
        .filter(|vm| matches!(vm.action, Action::Adopt { reseed: true, .. }))
        .map(|vm| vm.name.clone())
        .collect();
    assert!(!reseeded.is_empty(), "{plan:?}");
    again.apply(&plan).await.unwrap();
    let vms = env.vms();
    assert_eq!(vms.len(), 3, "no VM duplicated");
    for vm in &vms {
        let seed = seed_file(u64::from(vm.vmid));
        assert!(
            vm.config.get("ide3").is_some_and(|v| v.contains(&seed)),
            "{:?}",
            vm.config
        );
        assert_eq!(vm.status, pve_sim::VmStatus::Running, "{:?}", vm.name);
    }
    // And now it is all done: nothing left to do.
    let plan = env.provisioner().plan().await.unwrap();
    assert!(plan.is_noop(), "{plan:?}");
    env.sim.shutdown().await;
}
