//! The coordinator's VM lifecycle: clone, configure, resize, start, agent, stop, delete.

use std::time::Duration;

use pve_sim::{SimConfig, Timing, VmStatus};
use serde_json::{Value, json};

use crate::common::{encode, iso_bytes, start};

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g coord@ctl";

/// The `sshkeys` value: every byte outside `[A-Za-z0-9-_.~]` percent-encoded, space as `%20`.
fn sshkeys_value(keys: &str) -> String {
    keys.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn is_upid_of(upid: &str, kind: &str, id: &str) -> bool {
    let parts: Vec<&str> = upid.split(':').collect();
    parts.len() == 9
        && parts[0] == "UPID"
        && parts[1] == "pve"
        && parts[2].len() == 8
        && parts[3].len() >= 8
        && parts[4].len() == 8
        && parts[5] == kind
        && parts[6] == id
        && parts[7] == "homelab@pve!coordinator"
        && parts[8].is_empty()
}

#[tokio::test]
async fn clone_configure_start_and_read_the_agent_address() {
    let config = SimConfig {
        timing: Timing {
            clone: Duration::from_secs(2),
            start: Duration::from_secs(1),
            resize: Duration::from_secs(1),
            agent_ready: Duration::from_secs(30),
            ..Timing::default()
        },
        ..SimConfig::default()
    };
    let (sim, api) = start(config).await;

    // 1. Find the template.
    let resources = api
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .ok()
        .data();
    let template = &resources.as_array().unwrap()[0];
    assert_eq!(template["vmid"], 9000);
    assert_eq!(template["node"], "pve");
    assert_eq!(template["template"], 1);
    let template_config = api.config(9000).await;

    // 2. An id, as a string.
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));
    assert_eq!(
        api.get("/cluster/nextid", &[("vmid", "100")]).await.data(),
        json!("100")
    );

    // 3. Clone; the placeholder holds the id while the task runs.
    let upid = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "100"), ("name", "worker-01"), ("full", "0")],
        )
        .await
        .upid();
    assert!(is_upid_of(&upid, "qmclone", "9000"), "{upid}");
    let placeholder = api.config(100).await;
    assert_eq!(placeholder["lock"], "clone");
    assert_eq!(placeholder["description"], " qmclone temporary file\n");
    let status = api
        .get("/nodes/pve/qemu/100/status/current", &[])
        .await
        .ok()
        .data();
    assert_eq!(status["lock"], "clone");
    let reply = api
        .put("/nodes/pve/qemu/100/config", &[("cores", "4")])
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.reason.as_deref(), Some("VM is locked (clone)"));
    let resources = api
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .data();
    assert!(
        resources
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["vmid"] == 100 && r["lock"] == "clone")
    );

    let running = api
        .get(&format!("/nodes/pve/tasks/{}/status", encode(&upid)), &[])
        .await
        .data();
    assert_eq!(running["status"], "running");
    assert!(running.get("exitstatus").is_none());
    sim.advance_clock(Duration::from_secs(2));
    let task = api.wait_task(&upid).await;
    assert_eq!(task["exitstatus"], "OK");
    assert_eq!(task["type"], "qmclone");
    assert_eq!(task["user"], "homelab@pve");
    assert_eq!(task["tokenid"], "coordinator");
    let log = api.task_log(&upid, &[]).await.data();
    assert_eq!(
        log[0]["t"],
        "create linked clone of drive scsi0 (local-lvm:base-9000-disk-0)"
    );

    // 4. The lock is gone; the clone has its own identity.
    let status = api
        .get("/nodes/pve/qemu/100/status/current", &[])
        .await
        .data();
    assert!(status.get("lock").is_none());
    assert_eq!(status["status"], "stopped");
    let config = api.config(100).await;
    assert_eq!(config["name"], "worker-01");
    assert!(config.get("template").is_none());
    assert_eq!(config["memory"], "2048");
    assert_eq!(config["agent"], "1");
    assert_eq!(config["cores"], 2);
    assert_eq!(
        config["scsi0"],
        "local-lvm:base-9000-disk-0/vm-100-disk-0,iothread=1,size=3584M"
    );
    assert_eq!(config["ide2"], "local-lvm:vm-100-cloudinit,media=cdrom");
    assert_ne!(config["net0"], template_config["net0"]);
    assert!(
        config["net0"]
            .as_str()
            .unwrap()
            .starts_with("virtio=BC:24:11:")
    );
    assert_ne!(config["smbios1"], template_config["smbios1"]);
    let digest = config["digest"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 40);

    // 5. Seed ISO, then configure with the digest.
    let iso = api
        .upload("local", "iso", "seed-100.iso", iso_bytes(1))
        .await
        .upid();
    assert_eq!(api.wait_task(&iso).await["exitstatus"], "OK");
    let keys = sshkeys_value(ED25519);
    api.put(
        "/nodes/pve/qemu/100/config",
        &[
            ("cores", "4"),
            ("memory", "4096"),
            ("agent", "1"),
            ("ciupgrade", "0"),
            ("delete", "ide2"),
            ("ide3", "local:iso/seed-100.iso,media=cdrom"),
            ("boot", "order=scsi0"),
            ("ipconfig0", "ip=192.168.10.23/24,gw=192.168.10.1"),
            ("sshkeys", &keys),
            ("cipassword", "hunter2"),
            ("digest", &digest),
        ],
    )
    .await
    .ok();
    let config = api.config(100).await;
    assert!(config.get("ide2").is_none());
    assert_eq!(config["ide3"], "local:iso/seed-100.iso,media=cdrom");
    assert_eq!(config["sshkeys"], keys);
    assert_eq!(config["cipassword"], "**********");
    assert_eq!(config["memory"], "4096");
    assert_ne!(config["digest"], digest.as_str());
    assert!(
        !sim.storage_contents()
            .iter()
            .any(|v| v.volid == "local-lvm:vm-100-cloudinit")
    );
    let stale = api
        .put(
            "/nodes/pve/qemu/100/config",
            &[("cores", "2"), ("digest", &digest)],
        )
        .await;
    assert_eq!(stale.status, 500);
    assert_eq!(
        stale.reason.as_deref(),
        Some("detected modified configuration - file changed by other user? Try again.")
    );

    // 6. Resize (a task since PVE 8), firewall options.
    let resize = api
        .put(
            "/nodes/pve/qemu/100/resize",
            &[("disk", "scsi0"), ("size", "+8G")],
        )
        .await
        .upid();
    assert!(is_upid_of(&resize, "resize", "100"));
    sim.advance_clock(Duration::from_secs(1));
    api.wait_task(&resize).await;
    assert_eq!(
        api.config(100).await["scsi0"],
        "local-lvm:base-9000-disk-0/vm-100-disk-0,iothread=1,size=11776M"
    );
    let shrink = api
        .put(
            "/nodes/pve/qemu/100/resize",
            &[("disk", "scsi0"), ("size", "4G")],
        )
        .await;
    assert_eq!(shrink.status, 500);
    assert_eq!(
        shrink.reason.as_deref(),
        Some("shrinking disks is not supported")
    );
    assert_eq!(
        api.put(
            "/nodes/pve/qemu/100/firewall/options",
            &[("enable", "1"), ("policy_in", "DROP")],
        )
        .await
        .ok()
        .data(),
        Value::Null
    );
    let firewall = api
        .get("/nodes/pve/qemu/100/firewall/options", &[])
        .await
        .data();
    assert_eq!(firewall["enable"], 1);
    assert_eq!(firewall["policy_in"], "DROP");

    // 7. Start; the agent answers only after its delay.
    let agent = "/nodes/pve/qemu/100/agent/network-get-interfaces";
    let reply = api.get(agent, &[]).await;
    assert_eq!(reply.reason.as_deref(), Some("VM 100 is not running"));
    let started = api
        .post("/nodes/pve/qemu/100/status/start", &[])
        .await
        .upid();
    assert!(is_upid_of(&started, "qmstart", "100"));
    sim.advance_clock(Duration::from_secs(1));
    assert_eq!(api.wait_task(&started).await["exitstatus"], "OK");
    let reply = api.get(agent, &[]).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("QEMU guest agent is not running")
    );
    sim.advance_clock(Duration::from_secs(29));
    let reply = api.get(agent, &[]).await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("QEMU guest agent is not running")
    );
    sim.advance_clock(Duration::from_secs(1));
    let result = api.get(agent, &[]).await.ok().data()["result"].clone();
    let mac = config["net0"].as_str().unwrap()[7..24].to_ascii_lowercase();
    let eth0 = result
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["hardware-address"] == mac.as_str())
        .expect("an interface with net0's MAC");
    assert_eq!(eth0["ip-addresses"][0]["ip-address"], "192.168.10.23");
    assert_eq!(eth0["ip-addresses"][0]["prefix"], 24);
    let status = api
        .get("/nodes/pve/qemu/100/status/current", &[])
        .await
        .data();
    assert_eq!(status["qmpstatus"], "running");
    assert_eq!(status["agent"], 1);

    // 8. Starting again is a task failure, not an HTTP error.
    let again = api
        .post("/nodes/pve/qemu/100/status/start", &[])
        .await
        .upid();
    let task = api.wait_task(&again).await;
    assert_eq!(task["exitstatus"], "VM 100 already running");
    let log = api.task_log(&again, &[]).await.data();
    let lines = log.as_array().unwrap();
    assert_eq!(
        lines[lines.len() - 1]["t"],
        "TASK ERROR: VM 100 already running"
    );

    // 9. Tear down.
    let reply = api.delete("/nodes/pve/qemu/100", &[("purge", "1")]).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("VM 100 is running - destroy failed")
    );
    let stop = api
        .post("/nodes/pve/qemu/100/status/stop", &[])
        .await
        .upid();
    api.wait_task(&stop).await;
    let destroy = api
        .delete(
            "/nodes/pve/qemu/100",
            &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        )
        .await
        .upid();
    assert!(is_upid_of(&destroy, "qmdestroy", "100"));
    api.wait_task(&destroy).await;
    let gone = api.delete("/nodes/pve/qemu/100", &[("purge", "1")]).await;
    assert_eq!(gone.status, 500);
    assert_eq!(
        gone.reason.as_deref(),
        Some("Configuration file 'nodes/pve/qemu-server/100.conf' does not exist")
    );
    assert!(sim.vm(100).is_none());
    // The seed ISO is not the VM's: it survives.
    assert!(
        sim.storage_contents()
            .iter()
            .any(|v| v.volid == "local:iso/seed-100.iso")
    );
    assert!(!sim.storage_contents().iter().any(|v| v.vmid == Some(100)));

    let log = sim.request_log();
    // clone, 3 config PUTs, upload, 2 resizes, firewall, 2 starts, stop, 3 deletes.
    assert_eq!(log.mutating_count(), 14);
    assert_eq!(log.count("POST", "/nodes/pve/qemu/9000/clone"), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn full_clones_get_their_own_disks_and_linked_ones_refuse_storage() {
    let (sim, api) = start(SimConfig::default()).await;
    let upid = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "101"), ("full", "1"), ("storage", "local-lvm")],
        )
        .await
        .upid();
    api.wait_task(&upid).await;
    let config = api.config(101).await;
    assert_eq!(
        config["scsi0"],
        "local-lvm:vm-101-disk-0,iothread=1,size=3584M"
    );
    assert_eq!(config["name"], "Copy-of-VM-ubuntu-noble");
    let log = api.task_log(&upid, &[]).await.data();
    assert_eq!(
        log[0]["t"],
        "create full clone of drive scsi0 (local-lvm:base-9000-disk-0)"
    );

    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "102"), ("storage", "local-lvm")],
        )
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("parameter 'storage' not allowed for linked clones")
    );
    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "102"), ("full", "1"), ("storage", "local")],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.reason.as_deref(),
        Some("storage 'local' does not support vm images")
    );
    assert!(sim.vm(102).is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn clone_runs_only_on_the_template_node_and_never_over_an_existing_id() {
    let (sim, api) = start(SimConfig {
        nodes: vec!["pve".into(), "pve2".into()],
        ..SimConfig::default()
    })
    .await;
    let reply = api
        .post("/nodes/pve2/qemu/9000/clone", &[("newid", "100")])
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("unable to find configuration file for VM 9000 on node 'pve2'")
    );
    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "100"), ("target", "pve2")],
        )
        .await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("can't clone VM to node 'pve2' (VM uses local storage)")
    );
    let reply = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "9000")])
        .await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("unable to create VM 9000: config file already exists")
    );
    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "100"), ("pool", "nope")],
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.reason.as_deref(), Some("pool 'nope' does not exist"));
    let reply = api.get("/nodes/pve2/qemu/9000/config", &[]).await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("Configuration file 'nodes/pve2/qemu-server/9000.conf' does not exist")
    );
    assert_eq!(sim.request_log().mutating_count(), 4);
    assert_eq!(sim.vms().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn changes_to_a_running_vm_wait_until_it_stops() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "worker-01").await;
    let start = api
        .post("/nodes/pve/qemu/100/status/start", &[])
        .await
        .upid();
    api.wait_task(&start).await;
    api.put(
        "/nodes/pve/qemu/100/config",
        &[
            ("memory", "4096"),
            ("name", "renamed"),
            ("ipconfig0", "ip=dhcp"),
            ("delete", "ide2"),
        ],
    )
    .await
    .ok();
    let snapshot = sim.vm(100).unwrap();
    assert_eq!(snapshot.status, VmStatus::Running);
    assert_eq!(snapshot.name.as_deref(), Some("renamed"));
    assert_eq!(snapshot.config["memory"], "2048");
    assert_eq!(snapshot.pending["memory"], "4096");
    assert_eq!(snapshot.pending_delete, vec!["ide2".to_owned()]);

    let pending_wins = api.config(100).await;
    assert_eq!(pending_wins["memory"], "4096");
    assert!(pending_wins.get("ide2").is_none());
    let current = api
        .get("/nodes/pve/qemu/100/config", &[("current", "1")])
        .await
        .data();
    assert_eq!(current["memory"], "2048");
    assert!(current.get("ide2").is_some());

    let cloudinit = api.get("/nodes/pve/qemu/100/cloudinit", &[]).await.data();
    assert!(
        cloudinit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == "ipconfig0" && e["pending"] == "ip=dhcp")
    );

    let stop = api
        .post("/nodes/pve/qemu/100/status/stop", &[])
        .await
        .upid();
    api.wait_task(&stop).await;
    let snapshot = sim.vm(100).unwrap();
    assert_eq!(snapshot.config["memory"], "4096");
    assert!(snapshot.pending.is_empty());
    assert!(!snapshot.config.contains_key("ide2"));
    sim.shutdown().await;
}

#[tokio::test]
async fn nextid_is_a_string_and_reserves_nothing() {
    let (sim, api) = start(SimConfig::default()).await;
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));
    let taken = api.get("/cluster/nextid", &[("vmid", "9000")]).await;
    assert_eq!(taken.status, 400);
    assert_eq!(taken.message(), "Parameter verification failed.\n");
    assert_eq!(taken.error("vmid"), "VM 9000 already exists");
    api.clone_vm(100, "a").await;
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("101"));
    sim.shutdown().await;
}

#[tokio::test]
async fn task_endpoints_check_the_upid_and_its_node() {
    let (sim, api) = start(SimConfig {
        nodes: vec!["pve".into(), "pve2".into()],
        ..SimConfig::default()
    })
    .await;
    let upid = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .upid();
    let status = api.wait_task(&upid).await;
    assert_eq!(status["upid"], upid.as_str());
    assert_eq!(status["node"], "pve");
    assert_eq!(status["id"], "9000");
    assert!(status["pid"].is_u64() && status["starttime"].is_u64());

    let page = api
        .task_log(&upid, &[("start", "1"), ("limit", "1")])
        .await
        .json();
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["n"], 2);
    assert!(page["total"].as_u64().unwrap() >= 3);

    let elsewhere = api
        .get(&format!("/nodes/pve2/tasks/{}/status", encode(&upid)), &[])
        .await;
    assert_eq!(elsewhere.status, 400);
    assert_eq!(elsewhere.error("upid"), "no such task");
    let garbage = api.get("/nodes/pve/tasks/garbage/status", &[]).await;
    assert_eq!(garbage.error("upid"), "unable to parse worker upid");
    let unknown = upid.replace(":qmclone:", ":qmstart:");
    let reply = api
        .get(
            &format!("/nodes/pve/tasks/{}/status", encode(&unknown)),
            &[],
        )
        .await;
    assert_eq!(reply.error("upid"), "no such task");
    sim.shutdown().await;
}

#[tokio::test]
async fn post_config_returns_a_qmconfig_task() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let upid = api
        .post("/nodes/pve/qemu/100/config", &[("cores", "3")])
        .await
        .upid();
    assert_eq!(upid.split(':').nth(5), Some("qmconfig"));
    api.wait_task(&upid).await;
    assert_eq!(api.config(100).await["cores"], 3);
    let reply = api
        .post(
            "/nodes/pve/qemu/100/config",
            &[("cores", "4"), ("background_delay", "5")],
        )
        .await
        .ok();
    assert_eq!(reply.data(), Value::Null);
    let empty = api.put("/nodes/pve/qemu/100/config", &[]).await;
    assert_eq!(empty.reason.as_deref(), Some("no options specified"));
    sim.shutdown().await;
}

#[tokio::test]
async fn guests_without_static_ip_report_a_dhcp_address_or_the_override() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let start = api
        .post("/nodes/pve/qemu/100/status/start", &[])
        .await
        .upid();
    api.wait_task(&start).await;
    let agent = "/nodes/pve/qemu/100/agent/network-get-interfaces";
    let result = api.get(agent, &[]).await.ok().data()["result"].clone();
    assert_eq!(result[0]["name"], "lo");
    assert_eq!(result[1]["ip-addresses"][0]["ip-address"], "192.0.2.102");
    sim.set_guest_addresses(100, vec!["10.9.8.7".parse().unwrap()]);
    let result = api.get(agent, &[]).await.ok().data()["result"].clone();
    assert_eq!(result[1]["ip-addresses"][0]["ip-address"], "10.9.8.7");
    let list = api.get("/nodes/pve/qemu", &[]).await.ok().data();
    assert_eq!(list.as_array().unwrap().len(), 2);
    sim.shutdown().await;
}
