//! `400 Parameter verification failed.` with messages naming the parameter.

use pve_sim::SimConfig;
use serde_json::json;

use crate::common::start;

#[tokio::test]
async fn clone_parameters_are_checked_one_by_one() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[
                ("newid", "42"),
                ("name", "worker_01"),
                ("full", "true"),
                ("bogus", "1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Parameter verification failed.")
    );
    assert_eq!(
        reply.json()["errors"],
        json!({
            "newid": "invalid format - value does not look like a valid VM ID\n",
            "name": "invalid format - value does not look like a valid DNS name\n",
            "full": "type check ('boolean') failed - got 'true'",
            "bogus": "property is not defined in schema and the schema does not allow additional properties",
        })
    );
    let reply = api.post("/nodes/pve/qemu/9000/clone", &[]).await;
    assert_eq!(
        reply.error("newid"),
        "property is missing and it is not optional"
    );
    let reply = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "1000000000")])
        .await;
    assert_eq!(
        reply.error("newid"),
        "invalid format - value does not look like a valid VM ID\n"
    );
    let reply = api.get("/nodes/pve/qemu/abc/config", &[]).await;
    assert_eq!(
        reply.error("vmid"),
        "type check ('integer') failed - got 'abc'"
    );
    assert!(sim.vms().len() == 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn config_values_are_checked_against_their_formats() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let path = "/nodes/pve/qemu/100/config";

    let reply = api
        .put(path, &[("sshkeys", "ssh-ed25519 AAAA coord@ctl")])
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.error("sshkeys"),
        "invalid format - invalid urlencoded string: ssh-ed25519 AAAA coord@ctl\n"
    );
    let reply = api.put(path, &[("sshkeys", "not-a-key%20at%20all")]).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("SSH public key validation error")
    );

    let reply = api.put(path, &[("ipconfig0", "gw=10.0.0.1")]).await;
    assert_eq!(reply.status, 400);
    let error = reply.error("ipconfig0");
    assert!(
        error.starts_with("invalid format - format error\n"),
        "{error}"
    );
    assert!(
        error.contains("ipconfig0.ip: missing property - 'ipconfig0.gw' requires this property"),
        "{error}"
    );
    for bad in [
        "ip=10.0.0.5/7",
        "ip=10.0.0.5",
        "ip=10.0.0.5/24,gw=10.0.0.300",
        "mtu=1500",
    ] {
        let reply = api.put(path, &[("ipconfig0", bad)]).await;
        assert_eq!(reply.status, 400, "{bad} should be rejected");
        assert!(!reply.error("ipconfig0").is_empty());
    }
    api.put(path, &[("ipconfig0", "ip=dhcp")]).await.ok();

    let cases = [
        ("memory", "8", "memory"),
        ("cores", "0", "cores"),
        ("nameserver", "dns.example", "nameserver"),
        ("boot", "order=floppy0", "boot"),
        ("net0", "bridge=vmbr0", "net0"),
        ("net0", "virtio=01:00:00:00:00:00", "net0"),
        ("ide3", "local:iso/x.iso,media=dvd", "ide3"),
        ("onboot", "yes", "onboot"),
        ("name", "bad_name", "name"),
        ("delete", "Not-A-Key", "delete"),
    ];
    for (key, value, param) in cases {
        let reply = api.put(path, &[(key, value)]).await;
        assert_eq!(reply.status, 400, "{key}={value}: {reply:?}");
        assert!(!reply.error(param).is_empty(), "{key}={value}: {reply:?}");
    }
    assert_eq!(
        api.put(path, &[("cores", "0")]).await.error("cores"),
        "value must have a minimum value of 1"
    );
    api.put(
        path,
        &[
            ("nameserver", "192.168.10.1 1.1.1.1"),
            ("net0", "virtio,bridge=vmbr0,firewall=1,tag=20"),
            ("memory", "4096"),
        ],
    )
    .await
    .ok();
    let config = api.config(100).await;
    assert!(
        config["net0"]
            .as_str()
            .unwrap()
            .starts_with("virtio=BC:24:11:")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn json_bodies_take_real_booleans_and_forms_only_zero_or_one() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let url = api.url("/nodes/pve/qemu/100/config");
    api.send(
        api.http
            .put(&url)
            .json(&json!({"cores": 2, "onboot": true, "sshkeys": "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g"})),
    )
    .await
    .ok();
    let config = api.config(100).await;
    assert_eq!(config["onboot"], 1);
    assert_eq!(config["cores"], 2);
    let reply = api
        .put("/nodes/pve/qemu/100/config", &[("onboot", "true")])
        .await;
    assert_eq!(
        reply.error("onboot"),
        "type check ('boolean') failed - got 'true'"
    );
    let reply = api
        .send(api.http.put(&url).json(&json!({"onboot": "true"})))
        .await;
    assert_eq!(reply.status, 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn query_parameters_override_the_body_and_path_parameters_must_agree() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let url = api.url("/nodes/pve/qemu/100/config");
    api.send(
        api.http
            .put(&url)
            .query(&[("cores", "3")])
            .form(&[("cores", "2")]),
    )
    .await
    .ok();
    assert_eq!(api.config(100).await["cores"], 3);

    let reply = api
        .post(
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "101"), ("vmid", "9001")],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.error("vmid"),
        "duplicate parameter (already defined in URI) with conflicting values!"
    );
    api.post(
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "101"), ("vmid", "9000")],
    )
    .await
    .ok();
    sim.shutdown().await;
}

#[tokio::test]
async fn sshkeys_sent_in_a_form_are_stored_encoded_once() {
    let (sim, api) = start(SimConfig::default()).await;
    api.clone_vm(100, "a").await;
    let value = "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g%20coord%40ctl";
    // reqwest form-encodes `%` as `%25`: the double encoding PVE expects on the wire.
    api.put("/nodes/pve/qemu/100/config", &[("sshkeys", value)])
        .await
        .ok();
    assert_eq!(api.config(100).await["sshkeys"], value);
    assert_eq!(sim.vm(100).unwrap().config["sshkeys"], value);
    let logged = sim.request_log();
    let put = logged
        .matching("PUT", "/nodes/pve/qemu/100/config")
        .next()
        .unwrap();
    assert_eq!(put.params["sshkeys"], value);
    sim.shutdown().await;
}
