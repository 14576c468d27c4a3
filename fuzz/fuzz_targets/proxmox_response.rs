//! A Proxmox VE answer, as whatever the host (or something posing as it) sends back: the
//! first two bytes choose the HTTP status, the rest is the body. Reading the envelope, the
//! error shapes and every typed value the coordinator takes from it must return a value or
//! an error, never panic.

#![no_main]

use std::collections::BTreeMap;

use homelab::proxmox::{
    ProxmoxError, Upid, VmConfig, VmResource, VmStatus, Volume, client::decode_response,
};
use libfuzzer_sys::fuzz_target;
use reqwest::{Method, StatusCode};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data {
        [a, b, rest @ ..] => (100 + u16::from_be_bytes([*a, *b]) % 500, rest),
        _ => (200, data),
    };
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    match decode_response(&Method::GET, "/fuzz", status, "", body) {
        Ok(data) => typed(data),
        Err(e) => error(&e),
    }
});

/// Every typed read the coordinator makes of a `data` value.
fn typed(data: Value) {
    if let Value::String(text) = &data {
        let _ = text.parse::<Upid>().map(|u| u.to_string());
    }
    let _ = serde_json::from_value::<Vec<VmResource>>(data.clone());
    let _ = serde_json::from_value::<VmStatus>(data.clone());
    let _ = serde_json::from_value::<Vec<Volume>>(data.clone());
    if let Ok(map) = serde_json::from_value::<BTreeMap<String, Value>>(data) {
        let config = VmConfig(map);
        let _ = config.number("memory");
        let _ = config.number("cores");
        let _ = config.digest();
        let _ = config.net0_mac();
        let _ = config.text("description");
    }
}

fn error(e: &ProxmoxError) {
    let _ = e.to_string();
    let _ = e.kind();
    let _ = e.is_not_found();
}
