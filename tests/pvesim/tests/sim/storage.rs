//! Storage content, uploads and volume deletion.

use pve_sim::SimConfig;
use serde_json::Value;

use crate::common::{iso_bytes, raw, start, status_line};

#[tokio::test]
async fn an_iso_upload_runs_imgcopy_and_appears_in_the_content_list() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api
        .upload("local", "iso", "seed 100.iso", iso_bytes(7))
        .await;
    let upid = reply.upid();
    assert!(
        upid.contains(":imgcopy::homelab@pve!coordinator:"),
        "{upid}"
    );
    assert_eq!(api.wait_task(&upid).await["exitstatus"], "OK");
    let log = api.task_log(&upid, &[]).await.data();
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|l| l["t"] == "target file: /var/lib/vz/template/iso/seed_100.iso")
    );

    let list = api
        .get("/nodes/pve/storage/local/content", &[("content", "iso")])
        .await
        .ok()
        .data();
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(entry["volid"], "local:iso/seed_100.iso");
    assert_eq!(entry["format"], "iso");
    assert_eq!(entry["size"], 36 * 1024);
    assert_eq!(
        sim.volume_bytes("local:iso/seed_100.iso"),
        Some(iso_bytes(7))
    );
    let images = api
        .get(
            "/nodes/pve/storage/local-lvm/content",
            &[("content", "images")],
        )
        .await
        .data();
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["content"] == "images")
    );
    let logged = sim.request_log();
    let record = logged
        .matching("POST", "/nodes/pve/storage/local/upload")
        .next()
        .unwrap();
    assert_eq!(record.params["content"], "iso");
    assert_eq!(record.params["filename"], "seed 100.iso");

    // A second upload silently replaces the first.
    let again = api
        .upload("local", "iso", "seed 100.iso", vec![1; 100])
        .await
        .upid();
    api.wait_task(&again).await;
    let volumes = sim.storage_contents();
    let seeds: Vec<_> = volumes
        .iter()
        .filter(|v| v.volid == "local:iso/seed_100.iso")
        .collect();
    assert_eq!(seeds.len(), 1);
    assert_eq!(seeds[0].size, 100);
    sim.shutdown().await;
}

#[tokio::test]
async fn uploads_follow_pveproxys_rules() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api
        .upload("local", "snippets", "user.yaml", b"#cloud-config".to_vec())
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.error("content"),
        "value 'snippets' does not have a value in the enumeration 'iso, vztmpl, import'"
    );
    let reply = api.upload("local", "iso", "seed.txt", iso_bytes(0)).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error("filename"), "wrong file extension");
    let reply = api
        .upload("local-lvm", "iso", "seed.iso", iso_bytes(0))
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("can't upload to storage type 'lvmthin'")
    );

    let url = api.url("/nodes/pve/storage/local/upload");
    let reply = api
        .send(
            api.http
                .post(&url)
                .form(&[("content", "iso"), ("filename", "a.iso")]),
        )
        .await;
    assert_eq!(reply.status, 506);

    let chunked = format!(
        "POST /api2/json/nodes/pve/storage/local/upload HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        sim.authorization()
    );
    let response = raw(&sim, chunked.as_bytes()).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 501 chunked transfer encoding not supported"
    );
    assert!(
        !sim.storage_contents().iter().any(|v| v.content == "iso"),
        "nothing was stored"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_iso_check_fails_the_task_for_non_iso_bytes() {
    let (sim, api) = start(SimConfig {
        check_iso_magic: true,
        ..SimConfig::default()
    })
    .await;
    let upid = api
        .upload("local", "iso", "fake.iso", vec![0; 4096])
        .await
        .upid();
    let status = api.wait_task(&upid).await;
    assert_ne!(status["exitstatus"], "OK");
    assert!(sim.storage_contents().iter().all(|v| v.content != "iso"));
    let ok = api
        .upload("local", "iso", "real.iso", iso_bytes(0))
        .await
        .upid();
    assert_eq!(api.wait_task(&ok).await["exitstatus"], "OK");
    sim.shutdown().await;
}

#[tokio::test]
async fn volumes_are_deleted_by_the_rest_of_the_path() {
    let (sim, api) = start(SimConfig::default()).await;
    let upid = api
        .upload("local", "iso", "seed-1.iso", iso_bytes(0))
        .await
        .upid();
    api.wait_task(&upid).await;

    // Attaching needs the volume to exist.
    api.clone_vm(100, "a").await;
    let reply = api
        .put(
            "/nodes/pve/qemu/100/config",
            &[("ide3", "local:iso/missing.iso,media=cdrom")],
        )
        .await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("volume 'local:iso/missing.iso' does not exist")
    );

    let delete = api
        .delete("/nodes/pve/storage/local/content/local:iso/seed-1.iso", &[])
        .await
        .upid();
    assert!(delete.contains(":imgdel:local:"), "{delete}");
    assert_eq!(api.wait_task(&delete).await["exitstatus"], "OK");
    assert!(sim.volume_bytes("local:iso/seed-1.iso").is_none());

    // Deleting again only warns.
    let again = api
        .delete("/nodes/pve/storage/local/content/iso/seed-1.iso", &[])
        .await
        .upid();
    assert_eq!(api.wait_task(&again).await["exitstatus"], "WARNINGS: 1");

    let reply = api
        .delete(
            "/nodes/pve/storage/local/content/local:iso/seed-1.iso",
            &[("delay", "5")],
        )
        .await
        .ok();
    assert_eq!(reply.data(), Value::Null);
    sim.shutdown().await;
}
