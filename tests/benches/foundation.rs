//! Foundation benchmarks: enrollment throughput, directive push latency and `ListNodes`
//! latency against an in-process coordinator over loopback mTLS. Prints a table.
//!
//! Run: `cargo bench -p homelab-tests --bench foundation` (counts via BENCH_ENROLLMENTS,
//! BENCH_PUSHES, BENCH_NODES).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{InProcess, key_and_csr};
use homelab::core::{Directive, PushOutcome, Settings};
use homelab_proto::v1::{
    self as pb, AgentMessage, EnrollRequest, ListNodesRequest, agent_link_client::AgentLinkClient,
    agent_message::Body as Up, coordinator_message::Body as Down,
    enrollment_client::EnrollmentClient, status_client::StatusClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let enrollments = count("BENCH_ENROLLMENTS", 500);
    let pushes = count("BENCH_PUSHES", 1000);
    let nodes = count("BENCH_NODES", 1000);
    let c = InProcess::start(Settings::default()).await;
    let mut rows: Vec<(String, String)> = Vec::new();

    // Enrollment: CSRs are made up front, as each agent makes its own.
    let requests: Vec<EnrollRequest> = (0..enrollments)
        .map(|i| {
            let node = format!("bench-{i}");
            let (_, csr) = key_and_csr(&node);
            EnrollRequest {
                token: c.token(&node, 3600),
                node_name: node,
                csr_pem: csr,
                facts: None,
            }
        })
        .collect();
    let channel = c.channel(None).await.unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let concurrency = 16;
    let mut chunks: Vec<Vec<EnrollRequest>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        chunks[i % concurrency].push(r);
    }
    for chunk in chunks {
        let mut client = EnrollmentClient::new(channel.clone());
        tasks.spawn(async move {
            for r in chunk {
                client.enroll(r).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();
    rows.push((
        format!("Enrollments ({enrollments}, 16 concurrent)"),
        format!(
            "{:.0} per second",
            enrollments as f64 / elapsed.as_secs_f64()
        ),
    ));

    // Directive push: from Coordinator::push to the agent's stream.
    let node = "bench-push";
    let token = c.token(node, 3600);
    let (key, csr) = key_and_csr(node);
    let chain = EnrollmentClient::new(channel.clone())
        .enroll(EnrollRequest {
            token,
            node_name: node.into(),
            csr_pem: csr,
            facts: None,
        })
        .await
        .unwrap()
        .into_inner()
        .certificate_chain_pem;
    let link_channel = c.channel(Some((&chain, &key))).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        body: Some(Up::Hello(pb::Hello::default())),
    })
    .await
    .unwrap();
    let mut down = AgentLinkClient::new(link_channel)
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        down.message().await.unwrap().and_then(|m| m.body),
        Some(Down::Welcome(_))
    ));
    let mut latencies = Vec::with_capacity(pushes);
    for _ in 0..pushes {
        let t0 = Instant::now();
        let outcome = c.core.push(node, Directive::RenewCertificate).unwrap();
        assert!(matches!(outcome, PushOutcome::Sent(_)), "{outcome:?}");
        loop {
            let message = down.message().await.unwrap().unwrap();
            if matches!(message.body, Some(Down::Directive(_))) {
                break;
            }
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    rows.push((
        format!("Directive push to a connected agent ({pushes})"),
        format!(
            "p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1]
        ),
    ));

    // ListNodes with `nodes` enrolled nodes (the enrollments above count).
    for i in enrollments..nodes {
        let name = format!("bench-{i}");
        let hash = homelab::token::hash_token(&name);
        let mut store = c.core.store();
        store.insert_token(&hash, &name, 0, i64::MAX).unwrap();
        store
            .complete_enrollment(
                &hash,
                &name,
                &Default::default(),
                &format!("{i:032x}"),
                i64::MAX,
                1,
            )
            .unwrap();
    }
    let total = c.core.nodes().unwrap().len();
    let mut status = StatusClient::new(c.operator_channel().await);
    let mut latencies = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let listed = status
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .len();
        latencies.push(t0.elapsed());
        assert_eq!(listed, total);
    }
    latencies.sort();
    rows.push((
        format!("ListNodes at {total} nodes (50 calls)"),
        format!(
            "p50 {:.2?}, p99 {:.2?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        ),
    ));

    c.stop().await;
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("{:<width$}  Result", "What");
    for (what, result) in rows {
        println!("{what:<width$}  {result}");
    }
}
