//! The `pve-sim` binary: one JSON line on stdout, then serve until SIGTERM.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

use crate::common::WAIT;

#[tokio::test]
async fn the_binary_prints_its_details_serves_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pve-sim"))
        .args(["--listen", "127.0.0.1:0", "--clone-delay", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pve-sim starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = timeout(WAIT, lines.next_line())
        .await
        .expect("a line within the bound")
        .expect("stdout reads")
        .expect("one line");
    let details: Value = serde_json::from_str(&line).expect("the line is JSON");
    let url = details["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("https://127.0.0.1:") && url.ends_with("/api2/json"),
        "{url}"
    );
    assert_eq!(details["token_id"], "homelab@pve!coordinator");
    assert_eq!(details["fingerprint"].as_str().unwrap().len(), 32 * 3 - 1);
    let ca_path = details["ca_pem_path"].as_str().unwrap().to_owned();
    let ca = std::fs::read(&ca_path).expect("CA file exists");

    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let auth = format!(
        "PVEAPIToken={}={}",
        details["token_id"].as_str().unwrap(),
        details["token_secret"].as_str().unwrap()
    );
    let version: Value = timeout(
        WAIT,
        client
            .get(format!("{url}/version"))
            .header("Authorization", &auth)
            .send(),
    )
    .await
    .expect("answer within the bound")
    .expect("request succeeds")
    .json()
    .await
    .expect("JSON body");
    assert_eq!(version["data"]["version"], "9.1.2");

    let pid = child.id().expect("child runs").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(status.success());
    let exit = timeout(WAIT, child.wait())
        .await
        .expect("exits within the bound")
        .expect("exit status");
    assert!(exit.success(), "{exit:?}");
    assert!(
        !std::path::Path::new(&ca_path).exists(),
        "the temporary CA file is removed at exit"
    );
}
