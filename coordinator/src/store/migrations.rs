//! Schema migrations, applied in order; `PRAGMA user_version` records the last one applied.
//! Never edit a released step: append a new one.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: nodes, enrollment tokens (hashes only), certificates, events.
    "CREATE TABLE nodes (
        name             TEXT PRIMARY KEY,
        state            TEXT NOT NULL CHECK (state IN ('pending', 'enrolled', 'revoked')),
        created_at       INTEGER NOT NULL,
        enrolled_at      INTEGER,
        last_seen        INTEGER,
        facts_json       TEXT,
        last_phase_json  TEXT,
        last_health_json TEXT,
        directive_revision INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE tokens (
        hash       TEXT PRIMARY KEY,   -- SHA-256 of the token, hex; the token itself is never stored
        node       TEXT NOT NULL REFERENCES nodes (name),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER
    );
    CREATE INDEX tokens_node ON tokens (node);
    CREATE TABLE certificates (
        serial     TEXT PRIMARY KEY,   -- hex
        node       TEXT NOT NULL REFERENCES nodes (name),
        issued_at  INTEGER NOT NULL,
        not_after  INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX certificates_node ON certificates (node, issued_at);
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms   INTEGER NOT NULL,
        node    TEXT NOT NULL DEFAULT '',
        kind    TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_node ON events (node, id);",
    // 2: the K3s cluster: its secrets (generated before any VM exists), the desired nodes
    // and settings that `homelab apply` records, and what each node was last assigned.
    "CREATE TABLE cluster (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        server_token  TEXT NOT NULL,   -- K3s server token (short form); never leaves this file but to servers
        agent_token   TEXT NOT NULL,   -- K3s agent token (short form)
        ca_hash       TEXT,            -- SHA-256 of the first server's cluster CA, once reported
        settings_json TEXT             -- the spec's [k3s] settings, as orchestrated
    );
    CREATE TABLE desired_nodes (
        name     TEXT PRIMARY KEY,
        role     TEXT NOT NULL CHECK (role IN ('server', 'agent')),
        ip       TEXT NOT NULL,
        position INTEGER NOT NULL      -- spec order: the first server is the first by position
    );
    CREATE TABLE assignments (
        node        TEXT PRIMARY KEY,
        revision    INTEGER NOT NULL,  -- the directive revision it was pushed under
        digest      TEXT NOT NULL,     -- SHA-256 of the plan content, to skip identical re-pushes
        role        TEXT NOT NULL,
        assigned_at INTEGER NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN k3s_ready INTEGER NOT NULL DEFAULT 0;",
    // 3: a node that says hello is checked against every other node's machine-id and
    // hostname; these indexes keep that check from scanning all nodes.
    "CREATE INDEX nodes_machine_id ON nodes (json_extract(facts_json, '$.machine_id'));
    CREATE INDEX nodes_hostname ON nodes (json_extract(facts_json, '$.hostname'));",
    // 4: a row version per node, bumped by triggers on every change to the node or to its
    // certificates (whoever writes, this process or another), so a reader can keep parsed
    // nodes and refetch only the ones whose version moved.
    "ALTER TABLE nodes ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    CREATE TRIGGER nodes_version AFTER UPDATE ON nodes WHEN NEW.version = OLD.version
    BEGIN UPDATE nodes SET version = OLD.version + 1 WHERE name = NEW.name; END;
    CREATE TRIGGER certificates_insert_version AFTER INSERT ON certificates
    BEGIN UPDATE nodes SET version = version + 1 WHERE name = NEW.node; END;
    CREATE TRIGGER certificates_update_version AFTER UPDATE ON certificates
    BEGIN UPDATE nodes SET version = version + 1 WHERE name = NEW.node; END;
    CREATE TRIGGER certificates_delete_version AFTER DELETE ON certificates
    BEGIN UPDATE nodes SET version = version + 1 WHERE name = OLD.node; END;",
];

/// The schema version this build writes.
pub(super) const CURRENT: i64 = MIGRATIONS.len() as i64;

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > CURRENT {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: CURRENT,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step(conn).map_err(|source| StoreError::Migrate { version, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_refuse_newer_schemas() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, CURRENT);
        conn.pragma_update(None, "user_version", CURRENT + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::SchemaTooNew { .. })
        ));
    }
}
