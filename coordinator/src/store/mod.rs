//! The coordinator's durable state, in one SQLite database (`homelab.db` in the state
//! directory) that an operator can open with `sqlite3` to inspect.
//!
//! Tables: `nodes`, `tokens` (hashes only), `certificates` (serial, expiry, revocation) and
//! `events`. The schema is versioned with `PRAGMA user_version`; [`migrations`] lists every
//! step. Every multi-row change runs in one transaction, so a crash between two steps leaves
//! either the old state or the new one.

mod migrations;

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the state database {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database schema version {found} is newer than this homelab ({supported}); upgrade homelab"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("failed to migrate the state database to schema version {version}")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("stored JSON in {what} does not parse")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the enrollment token was used by a concurrent enrollment")]
    TokenRaced,
    #[error("no node named {0:?}")]
    UnknownNode(String),
}

/// A node's lifecycle state as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// A token was issued; the node has not enrolled.
    Pending,
    /// The node holds a certificate.
    Enrolled,
    /// Every certificate of the node is refused.
    Revoked,
}

impl NodeState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Enrolled => "enrolled",
            Self::Revoked => "revoked",
        }
    }

    fn parse(s: &str) -> Result<Self, rusqlite::Error> {
        match s {
            "pending" => Ok(Self::Pending),
            "enrolled" => Ok(Self::Enrolled),
            "revoked" => Ok(Self::Revoked),
            other => Err(rusqlite::Error::InvalidColumnType(
                0,
                format!("state {other:?}"),
                rusqlite::types::Type::Text,
            )),
        }
    }
}

/// Facts an agent reports about its machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub hostname: String,
    pub machine_id: String,
    pub product_uuid: String,
    pub ip_addresses: Vec<String>,
    pub os: String,
    pub agent_version: String,
}

/// The newest phase report of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: String,
    pub step: String,
    /// `started`, `succeeded` or `failed`.
    pub outcome: String,
    pub attempt: u32,
    pub message: String,
    pub at_unix: i64,
    /// The last failure, kept across retries until a step succeeds.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The newest health report of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub observed_at_unix: i64,
    pub healthy: bool,
    pub detail: String,
    pub certificate_not_after_unix: i64,
    pub agent_version: String,
    /// K3s as the node sees it, once it has a role.
    #[serde(default)]
    pub k3s: Option<K3sHealthRecord>,
}

/// The K3s part of a health report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sHealthRecord {
    pub role: String,
    pub unit: String,
    pub unit_state: String,
    pub version: String,
    pub applied_revision: u64,
    /// Servers only.
    pub api_ready: bool,
    /// Servers only: SHA-256 of the cluster CA as stored.
    pub cluster_ca_sha256: String,
    /// Servers only: (node, Ready, reason) for every Node the server sees.
    pub nodes: Vec<(String, bool, String)>,
}

impl NodeRecord {
    /// Whether the node can serve as a K3s server to join or to ask: its Node is Ready, or
    /// its unit is active and its API answers. The second case covers `flannel-backend:
    /// none`, where every Node stays NotReady until a CNI is installed through this very API.
    pub fn serves_api(&self) -> bool {
        self.k3s_ready
            || self
                .last_health
                .as_ref()
                .and_then(|h| h.k3s.as_ref())
                .is_some_and(|k| k.role == "server" && k.unit_state == "active" && k.api_ready)
    }
}

/// One row of `nodes`, with its newest certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub state: NodeState,
    pub facts: Option<Facts>,
    pub created_at_unix: i64,
    pub enrolled_at_unix: Option<i64>,
    pub last_seen_unix: Option<i64>,
    pub certificate_serial: Option<String>,
    pub certificate_not_after_unix: Option<i64>,
    pub last_phase: Option<PhaseRecord>,
    pub last_health: Option<HealthRecord>,
    /// Ready as a K3s server sees it.
    pub k3s_ready: bool,
}

/// One row of `tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub node: String,
    pub created_at_unix: i64,
    pub expires_at_unix: i64,
    pub used_at_unix: Option<i64>,
}

/// One row of `certificates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    pub serial: String,
    pub node: String,
    pub issued_at_unix: i64,
    pub not_after_unix: i64,
    pub revoked_at_unix: Option<i64>,
}

/// One row of `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    pub id: i64,
    pub at_unix_ms: i64,
    pub node: String,
    pub kind: String,
    pub message: String,
}

/// The event log keeps the newest this many events; older ones are pruned.
pub const EVENTS_KEPT: i64 = 100_000;
/// Pruning runs once per this many appended events.
const EVENT_PRUNE_EVERY: i64 = 1_000;

/// How long a writer waits for another process (the CLI, the daemon) holding the lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The state database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL lets `homelab token create` write while the daemon reads; NORMAL sync is durable
        // across process crashes, which is the failure that matters here.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        let mut store = Self { conn };
        migrations::migrate(&mut store.conn)?;
        Ok(store)
    }

    /// Opens a private in-memory database, for unit tests of code above the store.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let mut conn = Connection::open_in_memory()?;
        migrations::migrate(&mut conn)?;
        Ok(Self { conn })
    }

    /// Runs SQLite's `PRAGMA integrity_check`; returns its findings, empty when sound.
    pub fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    // ---- tokens -------------------------------------------------------------------------

    /// Stores the hash of a new enrollment token for `node`, creating the node as pending if
    /// it is new.
    pub fn insert_token(
        &mut self,
        token_hash: &str,
        node: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO nodes (name, state, created_at) VALUES (?1, 'pending', ?2)
             ON CONFLICT (name) DO NOTHING",
            params![node, now],
        )?;
        tx.execute(
            "INSERT INTO tokens (hash, node, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![token_hash, node, now, expires_at],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Looks up a token by its hash.
    pub fn token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT node, created_at, expires_at, used_at FROM tokens WHERE hash = ?1",
                [token_hash],
                |r| {
                    Ok(TokenRecord {
                        node: r.get(0)?,
                        created_at_unix: r.get(1)?,
                        expires_at_unix: r.get(2)?,
                        used_at_unix: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Completes an enrollment in one transaction: marks the token used (failing with
    /// [`StoreError::TokenRaced`] if another enrollment got there first), records the
    /// certificate, and marks the node enrolled with its facts.
    pub fn complete_enrollment(
        &mut self,
        token_hash: &str,
        node: &str,
        facts: &Facts,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let facts_json = to_json(facts);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let claimed = tx.execute(
            "UPDATE tokens SET used_at = ?2 WHERE hash = ?1 AND used_at IS NULL",
            params![token_hash, now],
        )?;
        if claimed != 1 {
            return Err(StoreError::TokenRaced);
        }
        tx.execute(
            "INSERT INTO nodes (name, state, created_at, facts_json, enrolled_at)
             VALUES (?1, 'enrolled', ?2, ?3, ?2)
             ON CONFLICT (name) DO UPDATE SET state = 'enrolled', facts_json = ?3, enrolled_at = ?2",
            params![node, now, facts_json],
        )?;
        // A new enrollment replaces the node's identity: its older certificates are void.
        tx.execute(
            "UPDATE certificates SET revoked_at = ?2 WHERE node = ?1 AND revoked_at IS NULL",
            params![node, now],
        )?;
        tx.execute(
            "INSERT INTO certificates (serial, node, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            params![serial, node, now, not_after],
        )?;
        tx.commit()?;
        Ok(())
    }

    // ---- certificates -------------------------------------------------------------------

    /// Records a certificate issued by in-band renewal.
    pub fn insert_certificate(
        &mut self,
        node: &str,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO certificates (serial, node, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            params![serial, node, now, not_after],
        )?;
        Ok(())
    }

    /// Looks up an issued certificate by serial.
    pub fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT serial, node, issued_at, not_after, revoked_at FROM certificates
                 WHERE serial = ?1",
                [serial],
                |r| {
                    Ok(CertificateRecord {
                        serial: r.get(0)?,
                        node: r.get(1)?,
                        issued_at_unix: r.get(2)?,
                        not_after_unix: r.get(3)?,
                        revoked_at_unix: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Revokes the node and every certificate it holds. Returns how many certificates were
    /// newly revoked.
    pub fn revoke_node(&mut self, node: &str, now: i64) -> Result<u32, StoreError> {
        let tx = self.conn.transaction()?;
        let changed = tx.execute("UPDATE nodes SET state = 'revoked' WHERE name = ?1", [node])?;
        if changed == 0 {
            return Err(StoreError::UnknownNode(node.to_owned()));
        }
        let revoked = tx.execute(
            "UPDATE certificates SET revoked_at = ?2 WHERE node = ?1 AND revoked_at IS NULL",
            params![node, now],
        )?;
        // A revoked node's unused tokens must not let it back in.
        tx.execute(
            "UPDATE tokens SET used_at = ?2 WHERE node = ?1 AND used_at IS NULL",
            params![node, now],
        )?;
        tx.commit()?;
        Ok(u32::try_from(revoked).unwrap_or(u32::MAX))
    }

    // ---- nodes --------------------------------------------------------------------------

    /// Allocates the node's next directive revision. Revisions only rise, across restarts.
    pub fn next_directive_revision(&mut self, node: &str) -> Result<u64, StoreError> {
        let revision: Option<i64> = self
            .conn
            .query_row(
                "UPDATE nodes SET directive_revision = directive_revision + 1 WHERE name = ?1
                 RETURNING directive_revision",
                [node],
                |r| r.get(0),
            )
            .optional()?;
        let revision = revision.ok_or_else(|| StoreError::UnknownNode(node.to_owned()))?;
        Ok(u64::try_from(revision).unwrap_or(0))
    }

    /// Records that a node connected or reported, with the facts it sent.
    pub fn touch_node(
        &mut self,
        node: &str,
        facts: Option<&Facts>,
        now: i64,
    ) -> Result<(), StoreError> {
        match facts {
            Some(facts) => self.conn.execute(
                "UPDATE nodes SET last_seen = ?2, facts_json = ?3 WHERE name = ?1",
                params![node, now, to_json(facts)],
            )?,
            None => self.conn.execute(
                "UPDATE nodes SET last_seen = ?2 WHERE name = ?1",
                params![node, now],
            )?,
        };
        Ok(())
    }

    /// Stores a node's newest phase report.
    pub fn set_last_phase(&mut self, node: &str, phase: &PhaseRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET last_phase_json = ?2, last_seen = ?3 WHERE name = ?1",
            params![node, to_json(phase), phase.at_unix],
        )?;
        Ok(())
    }

    /// Stores a node's newest health report.
    pub fn set_last_health(
        &mut self,
        node: &str,
        health: &HealthRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        // Every agent reports periodically: keep the statement prepared.
        self.conn
            .prepare_cached(
                "UPDATE nodes SET last_health_json = ?2, last_seen = ?3 WHERE name = ?1",
            )?
            .execute(params![node, to_json(health), now])?;
        Ok(())
    }

    /// A node's newest health report alone; `None` if it has none or does not exist.
    pub fn last_health(&self, node: &str) -> Result<Option<HealthRecord>, StoreError> {
        let json: Option<Option<String>> = self
            .conn
            .prepare_cached("SELECT last_health_json FROM nodes WHERE name = ?1")?
            .query_row([node], |r| r.get(0))
            .optional()?;
        from_json(json.flatten(), "nodes.last_health_json")
    }

    /// One node with its newest certificate.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{NODE_SELECT} WHERE n.name = ?1"))?;
        let row = stmt.query_row([name], node_from_row).optional()?;
        row.map(NodeRow::into_record).transpose()
    }

    /// Every node's name and row version, by name. The version moves on every change to
    /// the node or its certificates (triggers of migration 4).
    pub fn node_versions(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, version FROM nodes ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One node with its row version, read together.
    pub fn node_versioned(&self, name: &str) -> Result<Option<(i64, NodeRecord)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{NODE_SELECT} WHERE n.name = ?1"))?;
        let row = stmt
            .query_row([name], |r| Ok((r.get(11)?, node_from_row(r)?)))
            .optional()?;
        row.map(|(version, row)| Ok((version, row.into_record()?)))
            .transpose()
    }

    /// All nodes with their row versions, by name.
    pub fn nodes_versioned(&self) -> Result<Vec<(i64, NodeRecord)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{NODE_SELECT} ORDER BY n.name"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(11)?, node_from_row(r)?)))?
            .collect::<Result<Vec<(i64, NodeRow)>, _>>()?;
        rows.into_iter()
            .map(|(version, row)| Ok((version, row.into_record()?)))
            .collect()
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{NODE_SELECT} ORDER BY n.name"))?;
        let rows = stmt
            .query_map([], node_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(NodeRow::into_record).collect()
    }

    /// The first enrolled node, by name, other than `node` whose stored facts have this
    /// machine-id or this hostname; an empty value matches nothing. Indexed (migration 3).
    pub fn enrolled_twin(
        &self,
        node: &str,
        machine_id: &str,
        hostname: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(TWIN_SELECT)?;
        let name: Option<String> = stmt
            .query_row(params![node, machine_id, hostname], |r| r.get(0))
            .optional()?;
        match name {
            Some(name) => self.node(&name),
            None => Ok(None),
        }
    }

    // ---- the K3s cluster ----------------------------------------------------------------

    /// The cluster's tokens and CA hash; created with `generate` on first use, then stable.
    pub fn cluster_secrets(
        &mut self,
        generate: impl FnOnce() -> (String, String),
    ) -> Result<ClusterRecord, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = tx
            .query_row(
                "SELECT server_token, agent_token, ca_hash, settings_json FROM cluster WHERE id = 1",
                [],
                cluster_from_row,
            )
            .optional()?;
        let record = match existing {
            Some(record) => record,
            None => {
                let (server_token, agent_token) = generate();
                tx.execute(
                    "INSERT INTO cluster (id, server_token, agent_token) VALUES (1, ?1, ?2)",
                    params![server_token, agent_token],
                )?;
                ClusterRecord {
                    server_token,
                    agent_token,
                    ca_hash: None,
                    settings_json: None,
                }
            }
        };
        tx.commit()?;
        Ok(record)
    }

    /// Records the first server's cluster CA hash.
    pub fn set_ca_hash(&mut self, hash: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE cluster SET ca_hash = ?1 WHERE id = 1", [hash])?;
        Ok(())
    }

    /// Replaces the desired cluster: nodes in spec order and the K3s settings.
    pub fn set_desired_cluster(
        &mut self,
        nodes: &[(String, String, String)],
        settings_json: &str,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM desired_nodes", [])?;
        for (position, (name, role, ip)) in nodes.iter().enumerate() {
            tx.execute(
                "INSERT INTO desired_nodes (name, role, ip, position) VALUES (?1, ?2, ?3, ?4)",
                params![name, role, ip, i64::try_from(position).unwrap_or(i64::MAX)],
            )?;
        }
        tx.execute(
            "UPDATE cluster SET settings_json = ?1 WHERE id = 1",
            [settings_json],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The desired nodes in spec order: (name, role, ip).
    pub fn desired_nodes(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, role, ip FROM desired_nodes ORDER BY position")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Forgets what K3s state a node had, after its VM was destroyed: not Ready, nothing
    /// assigned; if it was the first server, its cluster CA is gone too, so joins wait for the
    /// next first server's hash.
    pub fn forget_k3s_node(&mut self, node: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE nodes SET k3s_ready = 0 WHERE name = ?1", [node])?;
        tx.execute("DELETE FROM assignments WHERE node = ?1", [node])?;
        let first_server: Option<String> = tx
            .query_row(
                "SELECT name FROM desired_nodes WHERE role = 'server' ORDER BY position LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if first_server.as_deref() == Some(node) {
            tx.execute("UPDATE cluster SET ca_hash = NULL WHERE id = 1", [])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Drops a node from the desired cluster and forgets its assignment.
    pub fn remove_desired_node(&mut self, node: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM desired_nodes WHERE name = ?1", [node])?;
        tx.execute("DELETE FROM assignments WHERE node = ?1", [node])?;
        tx.commit()?;
        Ok(())
    }

    /// Records what a node was last assigned.
    pub fn record_assignment(
        &mut self,
        node: &str,
        revision: u64,
        digest: &str,
        role: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO assignments (node, revision, digest, role, assigned_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (node) DO UPDATE SET revision = ?2, digest = ?3, role = ?4, assigned_at = ?5",
            params![node, i64::try_from(revision).unwrap_or(i64::MAX), digest, role, now],
        )?;
        Ok(())
    }

    /// What a node was last assigned: (revision, digest).
    pub fn assignment(&self, node: &str) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT revision, digest FROM assignments WHERE node = ?1",
                [node],
                |r| Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?)),
            )
            .optional()?)
    }

    /// Records whether K3s reports the node Ready.
    pub fn set_k3s_ready(&mut self, node: &str, ready: bool) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET k3s_ready = ?2 WHERE name = ?1",
            params![node, ready],
        )?;
        Ok(())
    }

    // ---- events -------------------------------------------------------------------------

    /// Appends an event and returns it with its id.
    pub fn append_event(
        &mut self,
        node: &str,
        kind: &str,
        message: &str,
        at_unix_ms: i64,
    ) -> Result<EventRecord, StoreError> {
        self.conn.execute(
            "INSERT INTO events (at_ms, node, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![at_unix_ms, node, kind, message],
        )?;
        let id = self.conn.last_insert_rowid();
        if id % EVENT_PRUNE_EVERY == 0 {
            self.conn
                .execute("DELETE FROM events WHERE id <= ?1", [id - EVENTS_KEPT])?;
        }
        Ok(EventRecord {
            id,
            at_unix_ms,
            node: node.to_owned(),
            kind: kind.to_owned(),
            message: message.to_owned(),
        })
    }

    /// The id of the newest event, 0 when there is none.
    pub fn newest_event_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
    }

    /// Events with an id above `after_id`, oldest first, optionally for one node.
    pub fn events_after(
        &self,
        after_id: i64,
        node: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at_ms, node, kind, message FROM events
             WHERE id > ?1 AND (?2 IS NULL OR node = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![after_id, node, limit], |r| {
                Ok(EventRecord {
                    id: r.get(0)?,
                    at_unix_ms: r.get(1)?,
                    node: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// The `cluster` row. `Debug` hides the tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterRecord {
    pub server_token: String,
    pub agent_token: String,
    pub ca_hash: Option<String>,
    pub settings_json: Option<String>,
}

impl std::fmt::Debug for ClusterRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRecord")
            .field("server_token", &"<redacted>")
            .field("agent_token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

fn cluster_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClusterRecord> {
    Ok(ClusterRecord {
        server_token: r.get(0)?,
        agent_token: r.get(1)?,
        ca_hash: r.get(2)?,
        settings_json: r.get(3)?,
    })
}

/// Used by [`Store::enrolled_twin`]; both lookups are served by the indexes of migration 3.
const TWIN_SELECT: &str = "SELECT name FROM nodes
    WHERE name <> ?1 AND state = 'enrolled'
      AND ((?2 <> '' AND json_extract(facts_json, '$.machine_id') = ?2)
        OR (?3 <> '' AND json_extract(facts_json, '$.hostname') = ?3))
    ORDER BY name LIMIT 1";

/// Column 11 is the row version (see [`Store::node_versions`]).
const NODE_SELECT: &str = "SELECT n.name, n.state, n.facts_json, n.created_at, n.enrolled_at,
        n.last_seen, c.serial, c.not_after, n.last_phase_json, n.last_health_json, n.k3s_ready,
        n.version
    FROM nodes n
    LEFT JOIN certificates c ON c.serial = (
        SELECT serial FROM certificates WHERE node = n.name ORDER BY issued_at DESC, rowid DESC LIMIT 1)";

struct NodeRow {
    name: String,
    state: NodeState,
    facts_json: Option<String>,
    created_at: i64,
    enrolled_at: Option<i64>,
    last_seen: Option<i64>,
    serial: Option<String>,
    not_after: Option<i64>,
    phase_json: Option<String>,
    health_json: Option<String>,
    k3s_ready: bool,
}

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        name: r.get(0)?,
        state: NodeState::parse(&r.get::<_, String>(1)?)?,
        facts_json: r.get(2)?,
        created_at: r.get(3)?,
        enrolled_at: r.get(4)?,
        last_seen: r.get(5)?,
        serial: r.get(6)?,
        not_after: r.get(7)?,
        phase_json: r.get(8)?,
        health_json: r.get(9)?,
        k3s_ready: r.get(10)?,
    })
}

impl NodeRow {
    fn into_record(self) -> Result<NodeRecord, StoreError> {
        Ok(NodeRecord {
            name: self.name,
            state: self.state,
            facts: from_json(self.facts_json, "nodes.facts_json")?,
            created_at_unix: self.created_at,
            enrolled_at_unix: self.enrolled_at,
            last_seen_unix: self.last_seen,
            certificate_serial: self.serial,
            certificate_not_after_unix: self.not_after,
            last_phase: from_json(self.phase_json, "nodes.last_phase_json")?,
            last_health: from_json(self.health_json, "nodes.last_health_json")?,
            k3s_ready: self.k3s_ready,
        })
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Invariant: the types stored here are plain structs of strings and numbers, which
    // serde_json always serializes.
    serde_json::to_string(value).expect("plain struct serializes")
}

fn from_json<T: for<'de> Deserialize<'de>>(
    json: Option<String>,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    json.map(|j| serde_json::from_str(&j).map_err(|source| StoreError::Json { what, source }))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            hostname: "k3s-control".into(),
            machine_id: "abc".into(),
            ..Facts::default()
        }
    }

    fn version(store: &Store, name: &str) -> i64 {
        let versions = store.node_versions().unwrap();
        let (_, version) = versions.iter().find(|(n, _)| n == name).unwrap();
        let (read, node) = store.node_versioned(name).unwrap().unwrap();
        assert_eq!((read, node.name.as_str()), (*version, name));
        *version
    }

    #[test]
    fn a_node_version_moves_on_every_change_to_the_node_or_its_certificates_from_any_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homelab.db");
        let mut store = Store::open(&path).unwrap();
        store.insert_token("h1", "k3s-control", 100, 200).unwrap();
        store.insert_token("h2", "k3s-node-1", 100, 200).unwrap();
        let mut last = version(&store, "k3s-control");
        let mut moved = |store: &Store, what: &str| {
            let now = version(store, "k3s-control");
            assert!(
                now > last,
                "{what} did not move the version ({last} -> {now})"
            );
            last = now;
        };
        store
            .complete_enrollment("h1", "k3s-control", &facts(), "01ab", 1000, 150)
            .unwrap();
        moved(&store, "enrollment");
        let untouched = version(&store, "k3s-node-1");
        store
            .set_last_health("k3s-control", &HealthRecord::default(), 160)
            .unwrap();
        moved(&store, "a health report");
        store
            .set_last_phase("k3s-control", &PhaseRecord::default())
            .unwrap();
        moved(&store, "a phase report");
        store
            .insert_certificate("k3s-control", "02ab", 2000, 170)
            .unwrap();
        moved(&store, "a renewed certificate");
        // Another connection to the same file (another `homelab` process) moves it too.
        let mut other = Store::open(&path).unwrap();
        other.touch_node("k3s-control", None, 180).unwrap();
        moved(&store, "a write by another connection");
        assert_eq!(version(&store, "k3s-node-1"), untouched);
        // What nodes_versioned reads agrees with the single reads.
        for (version, node) in store.nodes_versioned().unwrap() {
            assert_eq!(
                store.node_versioned(&node.name).unwrap().unwrap().0,
                version
            );
            assert_eq!(store.node(&node.name).unwrap().unwrap(), node);
        }
    }

    #[test]
    fn enrollment_consumes_the_token_exactly_once() {
        let mut store = Store::open_in_memory().unwrap();
        store.insert_token("h1", "k3s-control", 100, 200).unwrap();
        assert_eq!(
            store.node("k3s-control").unwrap().unwrap().state,
            NodeState::Pending
        );
        store
            .complete_enrollment("h1", "k3s-control", &facts(), "01ab", 1000, 150)
            .unwrap();
        let err = store
            .complete_enrollment("h1", "k3s-control", &facts(), "02ab", 1000, 151)
            .unwrap_err();
        assert!(matches!(err, StoreError::TokenRaced));
        let node = store.node("k3s-control").unwrap().unwrap();
        assert_eq!(node.state, NodeState::Enrolled);
        assert_eq!(node.certificate_serial.as_deref(), Some("01ab"));
        assert_eq!(node.facts, Some(facts()));
        assert_eq!(store.token("h1").unwrap().unwrap().used_at_unix, Some(150));
        assert!(
            store.certificate("02ab").unwrap().is_none(),
            "failed enrollment left nothing"
        );
    }

    #[test]
    fn revocation_covers_every_certificate_and_unused_token() {
        let mut store = Store::open_in_memory().unwrap();
        store.insert_token("h1", "n1", 100, 200).unwrap();
        store
            .complete_enrollment("h1", "n1", &facts(), "aa", 1000, 150)
            .unwrap();
        store.insert_certificate("n1", "bb", 2000, 160).unwrap();
        store.insert_token("h2", "n1", 170, 300).unwrap();
        assert_eq!(store.revoke_node("n1", 180).unwrap(), 2);
        assert_eq!(
            store.certificate("aa").unwrap().unwrap().revoked_at_unix,
            Some(180)
        );
        assert_eq!(
            store.certificate("bb").unwrap().unwrap().revoked_at_unix,
            Some(180)
        );
        assert!(store.token("h2").unwrap().unwrap().used_at_unix.is_some());
        let node = store.node("n1").unwrap().unwrap();
        assert_eq!(node.state, NodeState::Revoked);
        assert_eq!(
            node.certificate_serial.as_deref(),
            Some("bb"),
            "newest certificate shown"
        );
        assert!(matches!(
            store.revoke_node("nope", 1),
            Err(StoreError::UnknownNode(_))
        ));
    }

    #[test]
    fn re_enrollment_voids_older_certificates() {
        let mut store = Store::open_in_memory().unwrap();
        store.insert_token("h1", "n1", 1, 100).unwrap();
        store
            .complete_enrollment("h1", "n1", &facts(), "aa", 1000, 2)
            .unwrap();
        store.insert_token("h2", "n1", 3, 100).unwrap();
        store
            .complete_enrollment("h2", "n1", &facts(), "bb", 1000, 4)
            .unwrap();
        assert_eq!(
            store.certificate("aa").unwrap().unwrap().revoked_at_unix,
            Some(4)
        );
        assert_eq!(
            store.certificate("bb").unwrap().unwrap().revoked_at_unix,
            None
        );
    }

    #[test]
    fn cluster_secrets_are_generated_once_and_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homelab.db");
        let first = {
            let mut store = Store::open(&path).unwrap();
            let first = store
                .cluster_secrets(|| ("s1".into(), "a1".into()))
                .unwrap();
            store.set_ca_hash("ab").unwrap();
            first
        };
        let mut store = Store::open(&path).unwrap();
        let again = store
            .cluster_secrets(|| panic!("must not generate twice"))
            .unwrap();
        assert_eq!(again.server_token, first.server_token);
        assert_eq!(again.ca_hash.as_deref(), Some("ab"));
        assert!(!format!("{again:?}").contains("s1"));
        store
            .set_desired_cluster(
                &[
                    ("b".into(), "server".into(), "10.0.0.2".into()),
                    ("a".into(), "agent".into(), "10.0.0.1".into()),
                ],
                "{}",
            )
            .unwrap();
        let desired = store.desired_nodes().unwrap();
        assert_eq!(desired[0].0, "b", "spec order, not name order");
        store.record_assignment("b", 3, "d1", "server", 1).unwrap();
        store.record_assignment("b", 4, "d2", "server", 2).unwrap();
        assert_eq!(store.assignment("b").unwrap(), Some((4, "d2".into())));
        // Destroying the first server's VM forgets its assignment and its cluster CA.
        store.forget_k3s_node("b").unwrap();
        assert_eq!(store.assignment("b").unwrap(), None);
        let after = store.cluster_secrets(|| unreachable!()).unwrap();
        assert_eq!(after.ca_hash, None);
        assert_eq!(after.server_token, first.server_token, "the tokens stay");
    }

    #[test]
    fn the_event_log_is_bounded() {
        let mut store = Store::open_in_memory().unwrap();
        store.append_event("n", "old", "m", 0).unwrap();
        store.append_event("n", "old", "m", 0).unwrap();
        // Jump the id sequence to just before a pruning point.
        store
            .conn
            .execute(
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'events'",
                [EVENTS_KEPT + EVENT_PRUNE_EVERY - 3],
            )
            .unwrap();
        for i in 0..5 {
            store.append_event("n", "new", "m", i).unwrap();
        }
        let kept = store.events_after(0, None, u32::MAX).unwrap();
        assert_eq!(kept.len(), 5, "the two old events were pruned");
        assert!(kept.iter().all(|e| e.kind == "new"));
    }

    #[test]
    fn events_replay_in_order_and_filter_by_node() {
        let mut store = Store::open_in_memory().unwrap();
        let a = store.append_event("n1", "node.enrolled", "x", 1).unwrap();
        store.append_event("n2", "node.enrolled", "y", 2).unwrap();
        store.append_event("n1", "node.connected", "z", 3).unwrap();
        let all = store.events_after(0, None, 100).unwrap();
        assert_eq!(all.len(), 3);
        let n1 = store.events_after(a.id, Some("n1"), 100).unwrap();
        assert_eq!(n1.len(), 1);
        assert_eq!(n1[0].kind, "node.connected");
    }

    #[test]
    fn twins_are_found_by_machine_id_or_hostname_through_the_index() {
        let mut store = Store::open_in_memory().unwrap();
        let enroll = |store: &mut Store, name: &str, machine_id: &str, hostname: &str| {
            let facts = Facts {
                hostname: hostname.into(),
                machine_id: machine_id.into(),
                ..Facts::default()
            };
            store.insert_token(name, name, 1, 1000).unwrap();
            store
                .complete_enrollment(name, name, &facts, name, 1000, 2)
                .unwrap();
        };
        enroll(&mut store, "a", "m-a", "h-a");
        enroll(&mut store, "b", "m-b", "");
        let twin = |store: &Store, node: &str, m: &str, h: &str| {
            store.enrolled_twin(node, m, h).unwrap().map(|n| n.name)
        };
        assert_eq!(twin(&store, "c", "m-a", "x").as_deref(), Some("a"));
        assert_eq!(twin(&store, "c", "x", "h-a").as_deref(), Some("a"));
        assert_eq!(
            twin(&store, "a", "m-a", "h-a"),
            None,
            "a node is not its own twin"
        );
        assert_eq!(twin(&store, "c", "", ""), None, "empty facts match nothing");
        store.revoke_node("a", 3).unwrap();
        assert_eq!(
            twin(&store, "c", "m-a", "h-a"),
            None,
            "only enrolled nodes count"
        );
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {TWIN_SELECT}"))
            .unwrap()
            .query_map(params!["c", "x", "y"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("nodes_machine_id") && plan.contains("nodes_hostname"),
            "{plan}"
        );
    }

    #[test]
    fn reopening_keeps_state_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homelab.db");
        {
            let mut store = Store::open(&path).unwrap();
            store.insert_token("h1", "n1", 1, 2).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.token("h1").unwrap().is_some());
        assert!(store.integrity_check().unwrap().is_empty());
    }
}
