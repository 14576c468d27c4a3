//! Transport, authentication and the envelope.

use std::time::Duration;

use pve_sim::{SimConfig, Timing};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{self, Api, raw, raw_body, raw_with_cert, start, status_line};

#[tokio::test]
async fn token_auth_succeeds_and_bad_credentials_get_empty_401s() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api.get("/version", &[]).await.ok();
    assert_eq!(reply.data()["version"], "9.1.2");
    assert_eq!(reply.data()["release"], "9.1");

    let anonymous = Api { auth: None, ..api };
    let reply = anonymous.get("/version", &[]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.reason.as_deref(), Some("No ticket"));
    assert_eq!(reply.body, "");

    let wrong = Api {
        auth: Some(format!("PVEAPIToken={}=wrong", sim.token_id())),
        ..anonymous
    };
    let reply = wrong.get("/version", &[]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.reason.as_deref(), Some("Authentication failed!"));
    assert_eq!(reply.body, "");
    sim.shutdown().await;
}

#[tokio::test]
async fn every_401_waits_for_the_configured_delay() {
    let config = SimConfig {
        timing: Timing {
            auth_failure_delay: Duration::from_millis(300),
            ..Timing::default()
        },
        ..SimConfig::default()
    };
    let (sim, api) = start(config).await;
    let anonymous = Api { auth: None, ..api };
    let started = tokio::time::Instant::now();
    assert_eq!(anonymous.get("/nodes", &[]).await.status, 401);
    assert!(started.elapsed() >= Duration::from_millis(300));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_raw_client_sees_the_message_as_reason_phrase() {
    let (sim, api) = start(SimConfig::default()).await;
    let request = format!(
        "GET /api2/json/nodes/pve/qemu/777/config HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\r\n",
        sim.authorization()
    );
    let response = raw(&sim, request.as_bytes()).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 500 Configuration file 'nodes/pve/qemu-server/777.conf' does not exist"
    );
    assert!(
        response.contains("Server: pve-api-daemon/3.0")
            || response.contains("server: pve-api-daemon/3.0")
    );
    let body: serde_json::Value = serde_json::from_str(raw_body(&response)).unwrap();
    assert_eq!(
        body,
        json!({
            "data": null,
            "message": "Configuration file 'nodes/pve/qemu-server/777.conf' does not exist\n"
        })
    );

    // reqwest exposes the same phrase through hyper's extension.
    let reply = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "1")])
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Parameter verification failed.")
    );
    assert_eq!(reply.message(), "Parameter verification failed.\n");
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_are_not_implemented() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api.get("/nodes/pve/foo", &[]).await;
    assert_eq!(reply.status, 501);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Method 'GET /nodes/pve/foo' not implemented")
    );
    assert_eq!(reply.json()["data"], serde_json::Value::Null);
    let reply = api.put("/version", &[]).await;
    assert_eq!(
        reply.reason.as_deref(),
        Some("Method 'PUT /version' not implemented")
    );
    let reply = api.post("/nodes/pve/qemu/9000/status/current", &[]).await;
    assert_eq!(reply.status, 501);
    sim.shutdown().await;
}

#[tokio::test]
async fn http_layer_rejects_bodies_on_get_large_bodies_chunking_and_odd_types() {
    let (sim, api) = start(SimConfig::default()).await;
    let auth = sim.authorization();

    let reply = api
        .send(api.http.get(api.url("/version")).body("x=1"))
        .await;
    assert_eq!(reply.status, 501);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Unexpected content for method 'GET'")
    );
    assert_eq!(reply.body, "Unexpected content for method 'GET'");

    let big = format!("description={}", "a".repeat(70 * 1024));
    let reply = api
        .send(
            api.http
                .put(api.url("/nodes/pve/qemu/9000/config"))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(big),
        )
        .await;
    assert_eq!(reply.status, 501);
    assert_eq!(reply.reason.as_deref(), Some("for data too large"));

    let reply = api
        .send(
            api.http
                .put(api.url("/nodes/pve/qemu/9000/config"))
                .header("Content-Type", "text/plain")
                .body("cores=2"),
        )
        .await;
    assert_eq!(reply.status, 506);

    let chunked = format!(
        "PUT /api2/json/nodes/pve/qemu/9000/config HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ncores=2\r\n0\r\n\r\n"
    );
    let response = raw(&sim, chunked.as_bytes()).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 501 chunked transfer encoding not supported"
    );
    assert_eq!(sim.request_log().mutating_count(), 3);
    assert!(!sim.vm(9000).unwrap().config.contains_key("description"));
    sim.shutdown().await;
}

#[tokio::test]
async fn legacy_servers_send_no_message_and_empty_http_layer_bodies() {
    let (sim, api) = start(SimConfig {
        legacy_errors: true,
        ..SimConfig::default()
    })
    .await;
    let reply = api.get("/nodes/pve/qemu/777/config", &[]).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Configuration file 'nodes/pve/qemu-server/777.conf' does not exist")
    );
    assert_eq!(reply.json(), json!({"data": null}));

    let reply = api.get("/cluster/nextid", &[("vmid", "9000")]).await;
    assert_eq!(
        reply.json(),
        json!({"data": null, "errors": {"vmid": "VM 9000 already exists"}})
    );

    let reply = api
        .send(
            api.http
                .delete(api.url("/nodes/pve/qemu/9000"))
                .body("purge=1"),
        )
        .await;
    assert_eq!(reply.status, 501);
    assert_eq!(reply.body, "");

    sim.set_legacy_errors(false);
    let reply = api.get("/nodes/pve/qemu/777/config", &[]).await;
    assert!(reply.message().ends_with("does not exist\n"));
    sim.shutdown().await;
}

#[tokio::test]
async fn extjs_answers_errors_with_200_and_success_zero() {
    let (sim, api) = start(SimConfig::default()).await;
    let extjs = Api {
        base: api.base.replace("/api2/json", "/api2/extjs"),
        ..api
    };
    let reply = extjs.get("/cluster/nextid", &[("vmid", "9000")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({
            "data": null,
            "success": 0,
            "status": 400,
            "message": "Parameter verification failed.\n",
            "errors": {"vmid": "VM 9000 already exists"}
        })
    );
    let reply = extjs.get("/version", &[]).await;
    assert_eq!(reply.json()["success"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn total_appears_only_when_non_zero() {
    let (sim, api) = start(SimConfig::default()).await;
    let reply = api.get("/version", &[]).await;
    assert!(reply.json().get("total").is_none());
    let upid = api
        .post("/nodes/pve/qemu/9000/clone", &[("newid", "100")])
        .await
        .upid();
    api.wait_task(&upid).await;
    let log = api.task_log(&upid, &[]).await.ok();
    let total = log.json()["total"].as_u64().unwrap();
    assert!(total >= 3);
    assert_eq!(log.data().as_array().unwrap().len() as u64, total);
    assert_eq!(log.data()[total as usize - 1]["t"], "TASK OK");
    sim.shutdown().await;
}

#[tokio::test]
async fn ticket_login_and_csrf_protect_writes() {
    let (sim, api) = start(SimConfig::default()).await;
    let anonymous = Api {
        auth: None,
        http: common::http_client(&sim),
        base: api.base.clone(),
    };
    let reply = anonymous
        .post(
            "/access/ticket",
            &[("username", "root@pam"), ("password", "wrong")],
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.reason.as_deref(), Some("authentication failure"));
    assert_eq!(reply.json()["data"], serde_json::Value::Null);

    let login = anonymous
        .post(
            "/access/ticket",
            &[
                ("username", "root@pam"),
                ("password", pve_sim::DEFAULT_ROOT_PASSWORD),
            ],
        )
        .await
        .ok()
        .data();
    let ticket = login["ticket"].as_str().unwrap().to_owned();
    let csrf = login["CSRFPreventionToken"].as_str().unwrap().to_owned();
    assert!(ticket.starts_with("PVE:root@pam:"));

    let cookie = format!("PVEAuthCookie={}", common::encode(&ticket));
    let url = api.url("/nodes/pve/qemu/9000/config");
    let reply = anonymous
        .send(anonymous.http.get(&url).header("Cookie", &cookie))
        .await
        .ok();
    assert_eq!(reply.data()["name"], "ubuntu-noble");

    let reply = anonymous
        .send(
            anonymous
                .http
                .put(&url)
                .header("Cookie", &cookie)
                .form(&[("description", "x")]),
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.reason.as_deref(),
        Some("Permission denied - invalid csrf token")
    );

    anonymous
        .send(
            anonymous
                .http
                .put(&url)
                .header("Cookie", &cookie)
                .header("CSRFPreventionToken", &csrf)
                .form(&[("description", "x")]),
        )
        .await
        .ok();

    // Renewal: the ticket works as the password.
    anonymous
        .post(
            "/access/ticket",
            &[("username", "root@pam"), ("password", &ticket)],
        )
        .await
        .ok();

    // Tokens cannot log in.
    let reply = api
        .post(
            "/access/ticket",
            &[("username", "root@pam"), ("password", "x")],
        )
        .await;
    assert_eq!(reply.status, 403);
    sim.shutdown().await;
}

#[tokio::test]
async fn nodes_report_the_fingerprint_of_the_served_certificate() {
    let (sim, api) = start(SimConfig::default()).await;
    let nodes = api.get("/nodes", &[]).await.ok().data();
    assert_eq!(nodes[0]["node"], "pve");
    assert_eq!(nodes[0]["ssl_fingerprint"], sim.fingerprint());
    let request = format!(
        "GET /api2/json/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: {}\r\n\r\n",
        sim.authorization()
    );
    let (response, der) = raw_with_cert(&sim, request.as_bytes()).await;
    assert_eq!(status_line(&response), "HTTP/1.1 200 OK");
    let fingerprint = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(fingerprint, sim.fingerprint());
    sim.shutdown().await;
}
