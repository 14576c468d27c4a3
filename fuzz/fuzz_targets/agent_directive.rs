//! A message on the agent's link, as bytes off the wire: decoding it as a
//! `homelab.v1.CoordinatorMessage`, reading its directive and, for an Assignment, turning
//! the plan into the files the agent would write must return a value or an error, never
//! panic.

#![no_main]

use homelab_agent::{
    k3s::InstallPlan,
    link::{Request, read_directive},
};
use homelab_proto::v1::{CoordinatorMessage, coordinator_message::Body};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = CoordinatorMessage::decode(data) else {
        return;
    };
    let Some(Body::Directive(directive)) = message.body else {
        return;
    };
    // What the K3s task does with an Assignment: parse and check the plan, then derive the
    // files it would write and the fingerprint it tracks the plan by.
    if let (revision, Request::Assign(submission)) = read_directive(directive)
        && let Ok(plan) =
            InstallPlan::for_directive(revision, &submission.role, &submission.plan_json)
    {
        let _ = plan.config_hash();
        let _ = plan.fingerprint();
    }
});
