//! The leader: one instance at a time runs maintenance (rescuing expired leases, archiving
//! finished jobs). Leadership is a session-level Postgres advisory lock held on a connection
//! of its own, so it ends when that connection does (the process died, the network broke, the
//! database restarted) and another instance takes it at its next try. No ZooKeeper, no
//! home-made election.

use sqlx::{Connection, PgConnection, PgPool};

/// Key of the leader's advisory lock (any fixed number; one per job table).
const LEADER_LOCK: i64 = 0x6a6f_625f_6c65_6164; // "job_lead"

pub struct Leadership {
    pool: PgPool,
    key: i64,
    role: &'static str,
    /// The connection that holds the lock while this instance leads.
    held: Option<PgConnection>,
}

impl Leadership {
    pub fn new(pool: PgPool) -> Self {
        Leadership::with_key(pool, LEADER_LOCK, "job leader")
    }

    /// Leadership of another role (its own advisory lock key), e.g. the outbox relay.
    pub fn with_key(pool: PgPool, key: i64, role: &'static str) -> Self {
        Leadership {
            pool,
            key,
            role,
            held: None,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.held.is_some()
    }

    /// Whether this instance leads now: checks that a held lock's connection is alive (else
    /// leadership is lost), or tries to take the lock. Never waits for it.
    pub async fn ensure(&mut self) -> bool {
        if let Some(conn) = self.held.as_mut() {
            if conn.ping().await.is_ok() {
                return true;
            }
            tracing::warn!(
                role = self.role,
                "lost the leader's connection: leadership lost"
            );
            self.held = None;
        }
        let Ok(conn) = self.pool.acquire().await else {
            return false;
        };
        // a connection of its own: the lock lives exactly as long as it does
        let mut conn = conn.detach();
        match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut conn)
            .await
        {
            Ok(true) => {
                tracing::info!(role = self.role, "became the leader");
                self.held = Some(conn);
                true
            }
            _ => false,
        }
    }

    /// The server process id of the connection holding the lock (for logs and tests).
    pub async fn backend_pid(&mut self) -> Option<i32> {
        let conn = self.held.as_mut()?;
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .ok()
    }

    /// Gives leadership up (shutdown): another instance takes it at its next try.
    pub async fn resign(&mut self) {
        if let Some(conn) = self.held.take() {
            let _ = conn.close().await;
        }
    }
}
