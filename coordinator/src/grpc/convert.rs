//! Conversions between protobuf messages and domain types, checked once at the edge.

use homelab_proto::v1 as pb;

use crate::store::{
    EventRecord, Facts, HealthRecord, K3sHealthRecord, NodeRecord, NodeState, PhaseRecord,
};

/// Facts longer than this are cut; no honest field comes close.
const MAX_FACT_LEN: usize = 256;
const MAX_ADDRESSES: usize = 64;
/// A server's view lists every Node; more than this is not a homelab.
const MAX_NODES_IN_VIEW: usize = 10_000;

fn clip(s: String) -> String {
    if s.len() <= MAX_FACT_LEN {
        return s;
    }
    let mut end = MAX_FACT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

pub(super) fn facts_from_pb(facts: Option<pb::NodeFacts>) -> Facts {
    let f = facts.unwrap_or_default();
    Facts {
        hostname: clip(f.hostname),
        machine_id: clip(f.machine_id),
        product_uuid: clip(f.product_uuid),
        ip_addresses: f
            .ip_addresses
            .into_iter()
            .take(MAX_ADDRESSES)
            .map(clip)
            .collect(),
        os: clip(f.os),
        agent_version: clip(f.agent_version),
    }
}

pub(super) fn facts_to_pb(f: Facts) -> pb::NodeFacts {
    pb::NodeFacts {
        hostname: f.hostname,
        machine_id: f.machine_id,
        product_uuid: f.product_uuid,
        ip_addresses: f.ip_addresses,
        os: f.os,
        agent_version: f.agent_version,
    }
}

pub(super) fn phase_from_pb(p: pb::PhaseReport, at_unix: i64) -> PhaseRecord {
    let outcome = match pb::StepOutcome::try_from(p.outcome) {
        Ok(pb::StepOutcome::Started) => "started",
        Ok(pb::StepOutcome::Succeeded) => "succeeded",
        Ok(pb::StepOutcome::Failed) => "failed",
        _ => "unknown",
    };
    PhaseRecord {
        phase: clip(p.phase),
        step: clip(p.step),
        outcome: outcome.to_owned(),
        attempt: p.attempt,
        message: clip(p.message),
        at_unix,
        last_error: None,
    }
}

fn phase_to_pb(p: PhaseRecord) -> pb::PhaseReport {
    let outcome = match p.outcome.as_str() {
        "started" => pb::StepOutcome::Started,
        "succeeded" => pb::StepOutcome::Succeeded,
        "failed" => pb::StepOutcome::Failed,
        _ => pb::StepOutcome::Unspecified,
    };
    pb::PhaseReport {
        phase: p.phase,
        step: p.step,
        outcome: outcome as i32,
        attempt: p.attempt,
        message: p.message,
    }
}

pub(super) fn health_from_pb(h: pb::HealthReport) -> HealthRecord {
    HealthRecord {
        observed_at_unix: h.observed_at_unix,
        healthy: h.healthy,
        detail: clip(h.detail),
        certificate_not_after_unix: h.certificate_not_after_unix,
        agent_version: clip(h.agent_version),
        k3s: h.k3s.map(|k| K3sHealthRecord {
            role: clip(k.role),
            unit: clip(k.unit),
            unit_state: clip(k.unit_state),
            version: clip(k.version),
            applied_revision: k.applied_revision,
            api_ready: k.api_ready,
            cluster_ca_sha256: clip(k.cluster_ca_sha256),
            nodes: k
                .nodes
                .into_iter()
                .take(MAX_NODES_IN_VIEW)
                .map(|n| (clip(n.name), n.ready, clip(n.reason)))
                .collect(),
        }),
    }
}

fn health_to_pb(h: HealthRecord) -> pb::HealthReport {
    pb::HealthReport {
        observed_at_unix: h.observed_at_unix,
        healthy: h.healthy,
        detail: h.detail,
        certificate_not_after_unix: h.certificate_not_after_unix,
        agent_version: h.agent_version,
        k3s: h.k3s.map(|k| pb::K3sHealth {
            role: k.role,
            unit: k.unit,
            unit_state: k.unit_state,
            version: k.version,
            applied_revision: k.applied_revision,
            api_ready: k.api_ready,
            cluster_ca_sha256: k.cluster_ca_sha256,
            nodes: k
                .nodes
                .into_iter()
                .map(|(name, ready, reason)| pb::NodeCondition {
                    name,
                    ready,
                    reason,
                })
                .collect(),
        }),
    }
}

pub(super) fn node_to_pb(n: NodeRecord, connected: bool, role: Option<&str>) -> pb::Node {
    let state = match n.state {
        NodeState::Pending => pb::NodeState::Pending,
        NodeState::Enrolled => pb::NodeState::Enrolled,
        NodeState::Revoked => pb::NodeState::Revoked,
    };
    pb::Node {
        name: n.name,
        state: state as i32,
        connected,
        facts: n.facts.map(facts_to_pb),
        enrolled_at_unix: n.enrolled_at_unix.unwrap_or(0),
        last_seen_unix: n.last_seen_unix.unwrap_or(0),
        certificate_serial: n.certificate_serial.unwrap_or_default(),
        certificate_not_after_unix: n.certificate_not_after_unix.unwrap_or(0),
        last_error: n
            .last_phase
            .as_ref()
            .and_then(|p| p.last_error.clone())
            .unwrap_or_default(),
        last_phase: n.last_phase.map(phase_to_pb),
        last_health: n.last_health.map(health_to_pb),
        role: role.unwrap_or_default().to_owned(),
        ready: n.k3s_ready,
    }
}

pub(super) fn event_to_pb(e: EventRecord) -> pb::Event {
    pb::Event {
        id: e.id,
        at_unix_ms: e.at_unix_ms,
        node: e.node,
        kind: e.kind,
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_facts_are_clipped_on_a_char_boundary() {
        let facts = facts_from_pb(Some(pb::NodeFacts {
            hostname: "é".repeat(300),
            ip_addresses: vec!["10.0.0.1".into(); 100],
            ..Default::default()
        }));
        assert!(facts.hostname.len() <= MAX_FACT_LEN);
        assert_eq!(facts.ip_addresses.len(), MAX_ADDRESSES);
    }
}
