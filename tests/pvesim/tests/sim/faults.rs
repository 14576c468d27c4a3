//! Injected failures and the knobs that shape timing.

use std::time::Duration;

use pve_sim::{FaultRule, MethodFilter, SimConfig, TaskType, Timing};
use serde_json::json;

use crate::common::{encode, start};

#[tokio::test]
async fn request_faults_fire_a_set_number_of_times() {
    let (sim, api) = start(SimConfig::default()).await;
    sim.faults().fail_requests(
        FaultRule::new(
            MethodFilter::Post,
            "/nodes/pve/qemu/9000/clone",
            596,
            "tls handshake failed",
        )
        .times(2),
    );
    for _ in 0..2 {
        let reply = api
            .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
            .await;
        assert_eq!(reply.status, 596);
        assert_eq!(reply.reason.as_deref(), Some("tls handshake failed"));
        assert_eq!(reply.body, "");
    }
    api.post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .ok();

    sim.faults()
        .fail_requests(FaultRule::config_lock_timeout("pve", 100));
    let reply = api
        .put("/nodes/pve/qemu/100/config", &[("cores", "2")])
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.message(),
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout\n"
    );
    api.put("/nodes/pve/qemu/100/config", &[("cores", "2")])
        .await
        .ok();

    sim.faults().fail_requests(FaultRule::new(
        MethodFilter::Get,
        "/version",
        500,
        "got timeout",
    ));
    assert_eq!(
        api.get("/version", &[]).await.reason.as_deref(),
        Some("got timeout")
    );
    assert_eq!(api.get("/version", &[]).await.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_scripted_clone_failure_frees_the_id() {
    let (sim, api) = start(SimConfig::default()).await;
    sim.faults().fail_next_task(TaskType::Clone, "out of space");
    let upid = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .upid();
    let status = api.wait_task(&upid).await;
    assert_eq!(status["exitstatus"], "clone failed: out of space");
    let log = api.task_log(&upid, &[]).await.data();
    let lines = log.as_array().unwrap();
    assert_eq!(
        lines[lines.len() - 1]["t"],
        "TASK ERROR: clone failed: out of space"
    );
    assert!(sim.vm(100).is_none());
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));

    sim.faults().warn_next_task(TaskType::Clone, 2);
    let upid = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .upid();
    assert_eq!(api.wait_task(&upid).await["exitstatus"], "WARNINGS: 2");
    assert!(sim.vm(100).is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn clones_beyond_the_storage_limit_queue_or_time_out() {
    let config = SimConfig {
        timing: Timing {
            clone: Duration::from_secs(4),
            storage_lock_timeout: Duration::from_secs(10),
            ..Timing::default()
        },
        clone_limit_per_storage: Some(1),
        ..SimConfig::default()
    };
    let (sim, api) = start(config).await;
    let clone = |id: &'static str| {
        let api = &api;
        async move {
            api.post("/nodes/pve/qemu/9000/clone", &[("newid", id)])
                .await
                .upid()
        }
    };
    // Three clones of 4 s on one slot: the second waits 4 s, the third 8 s, both within
    // the 10 s lock timeout; a fourth would wait 12 s and fails.
    let first = clone("100").await;
    let second = clone("101").await;
    let third = clone("102").await;
    let fourth = clone("103").await;
    let running = |sim: &pve_sim::Simulator| {
        sim.tasks()
            .iter()
            .filter(|t| t.running)
            .map(|t| t.upid.clone())
            .collect::<Vec<_>>()
    };
    sim.advance_clock(Duration::from_secs(4));
    assert_eq!(
        running(&sim),
        vec![second.clone(), third.clone(), fourth.clone()]
    );
    sim.advance_clock(Duration::from_secs(4));
    assert_eq!(running(&sim), vec![third.clone(), fourth.clone()]);
    sim.advance_clock(Duration::from_secs(2));
    assert_eq!(running(&sim), vec![third.clone()]);
    assert!(sim.vm(103).is_none());
    sim.advance_clock(Duration::from_secs(2));
    for upid in [&first, &second, &third] {
        assert_eq!(api.wait_task(upid).await["exitstatus"], "OK");
    }
    assert_eq!(
        api.wait_task(&fourth).await["exitstatus"],
        "clone failed: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
    );
    let finished: Vec<_> = sim.tasks().into_iter().filter(|t| !t.running).collect();
    assert_eq!(finished.len(), 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_nextid_race_hands_out_a_taken_id() {
    let (sim, api) = start(SimConfig::default()).await;
    sim.faults().set_nextid_race(true);
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));
    api.clone_vm(100, "first").await;
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("100"));
    let reply = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("unable to create VM 100: config file already exists")
    );
    assert_eq!(
        api.get("/cluster/nextid", &[("vmid", "100")]).await.status,
        400
    );
    sim.faults().set_nextid_race(false);
    assert_eq!(api.get("/cluster/nextid", &[]).await.data(), json!("101"));
    sim.shutdown().await;
}

#[tokio::test]
async fn new_tasks_can_be_invisible_for_the_first_polls() {
    let (sim, api) = start(SimConfig {
        task_invisible_polls: 2,
        ..SimConfig::default()
    })
    .await;
    let upid = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .upid();
    let path = format!("/nodes/pve/tasks/{}/status", encode(&upid));
    for _ in 0..2 {
        let reply = api.get(&path, &[]).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.error("upid"), "no such task");
    }
    assert_eq!(api.get(&path, &[]).await.ok().data()["status"], "stopped");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_token_without_privileges_gets_403_naming_path_and_privilege() {
    let mut config = SimConfig::default();
    config.tokens[0].acl = pve_sim::Acl::Grants(vec![
        pve_sim::Grant::new("/vms/9000", &["VM.Clone", "VM.Audit"]),
        pve_sim::Grant::new("/storage/local-lvm", &["Datastore.AllocateSpace"]),
    ]);
    let (sim, api) = start(config).await;
    let reply = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Permission check failed (/vms/100, VM.Allocate)")
    );
    let resources = api
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .data();
    assert_eq!(resources.as_array().unwrap().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_running_worker_holds_the_config_lock() {
    let (sim, api) = start(SimConfig {
        timing: Timing {
            start: Duration::from_secs(5),
            ..Timing::default()
        },
        ..SimConfig::default()
    })
    .await;
    api.clone_vm(100, "a").await;
    let upid = api
        .post("/nodes/pve/qemu/100/status/start", &[])
        .await
        .upid();
    let reply = api
        .put("/nodes/pve/qemu/100/config", &[("cores", "2")])
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout")
    );
    sim.advance_clock(Duration::from_secs(5));
    assert_eq!(api.wait_task(&upid).await["exitstatus"], "OK");
    api.put("/nodes/pve/qemu/100/config", &[("cores", "2")])
        .await
        .ok();
    sim.shutdown().await;
}
