//! `Status`: the read-only operator API.

use std::{pin::Pin, sync::Arc};

use homelab_proto::v1::{
    ClusterStatus, Event, GetClusterRequest, GetNodeRequest, ListNodesRequest, ListNodesResponse,
    Node, WatchEventsRequest, status_server::Status as StatusApi,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::convert::{event_to_pb, node_to_pb};
use crate::{core::Coordinator, store::NodeState};

/// Events replayed per database query while a watcher catches up.
const REPLAY_BATCH: u32 = 500;

pub(super) struct StatusService {
    core: Arc<Coordinator>,
}

impl StatusService {
    pub(super) fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl StatusApi for StatusService {
    async fn get_cluster(
        &self,
        _request: Request<GetClusterRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let nodes = self.core.nodes()?;
        let connected = self.core.connected_nodes();
        let count = |state| nodes.iter().filter(|n| n.state == state).count();
        Ok(Response::new(ClusterStatus {
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            ca_fingerprint_sha256: self.core.ca().fingerprint(),
            nodes_total: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
            nodes_connected: u32::try_from(connected.len()).unwrap_or(u32::MAX),
            nodes_revoked: u32::try_from(count(NodeState::Revoked)).unwrap_or(u32::MAX),
            started_at_unix: self.core.started_at_unix(),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let roles = self.core.roles()?;
        let nodes = self.core.nodes()?;
        let connected = self
            .core
            .connected_among(nodes.iter().map(|n| n.name.as_str()));
        let nodes = nodes
            .into_iter()
            .zip(connected)
            .map(|(n, is_connected)| {
                let role = roles.get(&n.name).map(String::as_str);
                node_to_pb(n, is_connected, role)
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let name = request.into_inner().name;
        let node = self
            .core
            .node(&name)?
            .ok_or_else(|| Status::not_found(format!("no node named {name:?}")))?;
        let connected = self.core.is_connected(&name);
        let roles = self.core.roles()?;
        let role = roles.get(&name).map(String::as_str);
        Ok(Response::new(node_to_pb(node, connected, role)))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let request = request.into_inner();
        let node = Some(request.node).filter(|n| !n.is_empty());
        // Subscribe before replaying, so nothing recorded in between is missed; ids dedupe.
        let mut live = self.core.subscribe_events();
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let shutdown = core.shutdown_signal();
            tokio::pin!(shutdown);
            let mut last = if request.after_id < 0 {
                let newest = core.store().newest_event_id();
                match newest {
                    Ok(id) => id,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                }
            } else {
                request.after_id
            };
            // Replay from the database until caught up.
            loop {
                let batch = core
                    .store()
                    .events_after(last, node.as_deref(), REPLAY_BATCH);
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let done = batch.len() < REPLAY_BATCH as usize;
                for event in batch {
                    last = event.id;
                    if tx.send(Ok(event_to_pb(event))).await.is_err() {
                        return;
                    }
                }
                if done {
                    break;
                }
            }
            loop {
                tokio::select! {
                    received = live.recv() => {
                        let trigger = match received {
                            // The next event in sequence: send it as is.
                            Ok(event) if event.id == last + 1 => {
                                last = event.id;
                                if node.as_deref().is_none_or(|n| n == event.node)
                                    && tx.send(Ok(event_to_pb(event))).await.is_err()
                                {
                                    return;
                                }
                                continue;
                            }
                            Ok(event) if event.id <= last => continue,
                            // A gap: events that another process (the CLI) wrote, or that this
                            // watcher missed by lagging. The database has them all, in order.
                            Ok(event) => Some(event.id),
                            Err(RecvError::Lagged(_)) => None,
                            Err(RecvError::Closed) => return,
                        };
                        let batch = core.store().events_after(last, node.as_deref(), u32::MAX);
                        match batch {
                            Ok(batch) => {
                                for event in batch {
                                    last = event.id;
                                    if tx.send(Ok(event_to_pb(event))).await.is_err() {
                                        return;
                                    }
                                }
                                // With a node filter the batch may end before the event that
                                // triggered it; that event is covered too.
                                last = last.max(trigger.unwrap_or(last));
                            }
                            Err(e) => {
                                let _ = tx.send(Err(Status::from(e))).await;
                                return;
                            }
                        }
                    }
                    () = tx.closed() => return,
                    () = &mut shutdown => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
