//! Opening, checking and migrating the database file.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::error::StoreError;

/// `PRAGMA application_id`: "DLSD".
pub const APPLICATION_ID: i64 = 0x444c_5344;

/// Migrations, applied in order; `user_version` counts how many have run.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
     );
     CREATE TABLE sessions (
        id                   INTEGER PRIMARY KEY,
        identifier           TEXT NOT NULL UNIQUE,
        app_id               TEXT,
        launch_kind          TEXT,
        launch_value         TEXT,
        http_headers         TEXT NOT NULL,
        timeout_request_ms   INTEGER NOT NULL,
        timeout_resource_ms  INTEGER NOT NULL,
        max_conn_per_host    INTEGER NOT NULL,
        max_concurrent_tasks INTEGER,
        bandwidth_limit      INTEGER,
        next_seq             INTEGER NOT NULL,
        invalidating         INTEGER NOT NULL,
        invalid              INTEGER NOT NULL,
        created_at           INTEGER NOT NULL
     );
     CREATE TABLE tasks (
        id                INTEGER PRIMARY KEY,
        session_id        INTEGER NOT NULL REFERENCES sessions(id),
        url               TEXT NOT NULL,
        headers           TEXT NOT NULL,
        description       TEXT,
        priority          REAL NOT NULL,
        earliest_begin    INTEGER,
        expected_sha256   BLOB,
        destination       TEXT,
        overwrite         INTEGER NOT NULL,
        expected_size     INTEGER,
        created_at        INTEGER NOT NULL,
        state             TEXT NOT NULL,
        phase             TEXT NOT NULL,
        committed_offset  INTEGER NOT NULL,
        bytes_expected    INTEGER,
        etag              TEXT,
        last_modified     TEXT,
        final_url         TEXT,
        response_status   INTEGER,
        response_headers  TEXT NOT NULL,
        attempts          INTEGER NOT NULL,
        last_error_code   TEXT,
        last_error_msg    TEXT,
        last_error_http   INTEGER,
        retry_at          INTEGER,
        started_at        INTEGER,
        finished_at       INTEGER,
        resource_deadline INTEGER,
        location          TEXT,
        error_code        TEXT,
        error_msg         TEXT,
        error_http        INTEGER,
        resume_secret     INTEGER,
        retired           INTEGER NOT NULL
     );
     CREATE INDEX tasks_by_session ON tasks(session_id);
     CREATE INDEX tasks_live ON tasks(retired, id);
     CREATE TABLE events (
        session_id     INTEGER NOT NULL REFERENCES sessions(id),
        seq            INTEGER NOT NULL,
        kind           TEXT NOT NULL,
        task_id        INTEGER,
        byte_offset    INTEGER,
        expected_total INTEGER,
        location       TEXT,
        error_code     TEXT,
        error_msg      TEXT,
        error_http     INTEGER,
        created_at     INTEGER NOT NULL,
        PRIMARY KEY (session_id, seq)
     ) WITHOUT ROWID;",
    // 2: the mode finished files are handed over with (NULL: 0644, as before), and
    // indexes that keep pruning history cheap however much of it there is.
    "ALTER TABLE tasks ADD COLUMN file_mode INTEGER;
     CREATE INDEX tasks_retired_age ON tasks(retired, coalesce(finished_at, created_at));",
    // 3: a deleted session whose tasks stay in the history keeps its row as a tombstone
    // (identifier "\u{1}KEY\u{1}NAME", `codec::TOMBSTONE`). Nothing changes in the tables;
    // the version keeps an older daemon, which would list tombstones as sessions, out.
    "CREATE INDEX sessions_tombstones ON sessions(substr(identifier, 1, 1));",
    // 4: a task's own bandwidth limit (NULL: none).
    "ALTER TABLE tasks ADD COLUMN bandwidth_limit INTEGER;",
    // 5: a session's policy: metered networks, battery, discretionary.
    "ALTER TABLE sessions ADD COLUMN allows_metered INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE sessions ADD COLUMN allows_battery INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE sessions ADD COLUMN discretionary INTEGER NOT NULL DEFAULT 0;",
    // 6: more of it: waiting for a route, notifications.
    "ALTER TABLE sessions ADD COLUMN waits_for_connectivity INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE sessions ADD COLUMN notify INTEGER NOT NULL DEFAULT 0;",
    // 7: a task's own policy over its session's (NULL: as the session says).
    "ALTER TABLE tasks ADD COLUMN allows_metered INTEGER;
     ALTER TABLE tasks ADD COLUMN allows_battery INTEGER;
     ALTER TABLE tasks ADD COLUMN discretionary INTEGER;
     ALTER TABLE tasks ADD COLUMN waits_for_connectivity INTEGER;",
    // 8: a session's cookies (no row: kept, none yet). The jar is cookie_store's JSON.
    "CREATE TABLE cookie_jars (
        session_id INTEGER PRIMARY KEY,
        enabled    INTEGER NOT NULL,
        jar        TEXT NOT NULL
     );",
    // 9: a session's own proxy (no row: the daemon's environment; url NULL: direct).
    "CREATE TABLE session_proxies (
        session_id INTEGER PRIMARY KEY,
        url        TEXT,
        no_proxy   TEXT NOT NULL
     );",
    // 10: upload tasks (upload_method NULL: a download), and the response an upload's
    // event carries; authentication challenges (a task's, an event's), whether a session
    // answers them, and the credentials kept (task_id 0: the session's protection space);
    // sessions' client certificates (the files, never the key itself).
    "ALTER TABLE tasks ADD COLUMN upload_method TEXT;
     ALTER TABLE tasks ADD COLUMN upload_file TEXT;
     ALTER TABLE tasks ADD COLUMN upload_size INTEGER;
     ALTER TABLE tasks ADD COLUMN upload_mtime_ns INTEGER;
     ALTER TABLE tasks ADD COLUMN upload_idempotent INTEGER;
     ALTER TABLE tasks ADD COLUMN upload_resume_url TEXT;
     ALTER TABLE tasks ADD COLUMN upload_truncated INTEGER;
     ALTER TABLE tasks ADD COLUMN upload_in_flight INTEGER;
     ALTER TABLE events ADD COLUMN http_status INTEGER;
     ALTER TABLE events ADD COLUMN headers TEXT;
     ALTER TABLE events ADD COLUMN body_truncated INTEGER;
     ALTER TABLE events ADD COLUMN challenge_scheme TEXT;
     ALTER TABLE events ADD COLUMN challenge_realm TEXT;
     ALTER TABLE events ADD COLUMN challenge_proxy INTEGER;
     ALTER TABLE events ADD COLUMN challenge_round INTEGER;
     ALTER TABLE tasks ADD COLUMN challenge_scheme TEXT;
     ALTER TABLE tasks ADD COLUMN challenge_realm TEXT;
     ALTER TABLE tasks ADD COLUMN challenge_origin TEXT;
     ALTER TABLE tasks ADD COLUMN challenge_proxy INTEGER;
     ALTER TABLE tasks ADD COLUMN challenge_round INTEGER;
     CREATE TABLE session_challenges (
        session_id INTEGER PRIMARY KEY,
        answers    INTEGER NOT NULL
     );
     CREATE TABLE credentials (
        session_id INTEGER NOT NULL,
        task_id    INTEGER NOT NULL,
        origin     TEXT NOT NULL,
        proxy      INTEGER NOT NULL,
        name       TEXT NOT NULL,
        value      TEXT NOT NULL,
        PRIMARY KEY (session_id, task_id, origin, proxy)
     );
     CREATE TABLE session_client_certs (
        session_id INTEGER PRIMARY KEY,
        cert_file  TEXT NOT NULL,
        key_file   TEXT NOT NULL
     );",
    // 11: suspended tasks stay on disk until their session is touched; these find them,
    // and the others, without reading every row at start.
    "CREATE INDEX tasks_dormant ON tasks(session_id) WHERE retired = 0 AND state = 'suspended';
     CREATE INDEX tasks_awake ON tasks(id) WHERE retired = 0 AND state <> 'suspended';",
    // 12: a finished file that could not carry its task's mark (NULL: it could, or never
    // needed to).
    "ALTER TABLE tasks ADD COLUMN unmarked INTEGER;",
    // 13: `invalidate_and_cancel` was called (its answer goes before its running tasks have
    // stopped: a start cancels what is left of them).
    "ALTER TABLE sessions ADD COLUMN cancelling INTEGER NOT NULL DEFAULT 0;",
    // 14: which tasks a request sent `Once` created, under the client's key (16 bytes,
    // big-endian), kept a day.
    "CREATE TABLE creations (
        session_id INTEGER NOT NULL,
        key        BLOB NOT NULL,
        first_id   INTEGER NOT NULL,
        count      INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (session_id, key)
     ) WITHOUT ROWID;
     CREATE INDEX creations_age ON creations(created_at);",
    // 15: whether a task's `bytes_expected` was stated by a server (NULL: not recorded; a
    // length equal to the app's hint then counts as only the hint).
    "ALTER TABLE tasks ADD COLUMN total_known INTEGER;",
    // 16: a file assembled from more than one response failed its SHA-256 and was
    // downloaded again from zero (NULL: not yet; it happens at most once per task).
    "ALTER TABLE tasks ADD COLUMN refetched INTEGER;",
];

pub const LATEST_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens the database, refusing files that are not SQLite, foreign or from a newer
/// schema, and applies pending migrations; says whether `quick_check` is still due.
pub fn open(path: &Path) -> Result<(Connection, Check), StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
    let corrupt = |detail: String| StoreError::Corrupt { path: path.to_path_buf(), detail };
    // Created private before SQLite sees it (its journal files take the same mode): the
    // database holds request headers, credentials among them.
    create_private(path).map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)
        .map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;

    // The first read is where SQLite notices a file that is not a database at all.
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
            corrupt("the file is not an SQLite database".into())
        }
        e => open_err(e),
    })?;
    let app_id: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(open_err)?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(StoreError::Foreign { path: path.to_path_buf(), found: app_id });
    }
    if version > LATEST_VERSION {
        return Err(StoreError::TooNew { path: path.to_path_buf(), found: version, known: LATEST_VERSION });
    }
    // A migration writes: a file about to be migrated is checked first, so a corrupt one
    // stays untouched. Otherwise the check runs on a thread of its own beside the first
    // answers, and nothing is committed before it passed (`store::start_check`).
    let check = if version > 0 && version < LATEST_VERSION {
        quick_check(&conn, path)?;
        Check::Passed
    } else if version > 0 {
        Check::Due
    } else {
        Check::Passed
    };

    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_err(rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal"))));
    }
    // FULL: a commit is on disk before we acknowledge anything that depends on it.
    conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(open_err)?;
    // The WAL grows to the largest transaction between checkpoints (a batch of 10,000 tasks,
    // a prune of the history) and would stay that size for the daemon's life.
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT).map_err(open_err)?;
    Ok((migrate(conn, version, path)?, check))
}

/// The size the WAL is cut back to after a checkpoint, in bytes.
pub const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// Whether the file still has to pass `PRAGMA quick_check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Due,
    Passed,
}

/// `PRAGMA quick_check`: `Corrupt` unless it says "ok", or SQLite finds the file damaged
/// while checking. A check that cannot run (an I/O error, a lock held too long, no memory)
/// is `Unchecked`: the file may be sound, and nobody should be told to move it away.
pub fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.to_path_buf(), detail };
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) =>
        {
            corrupt(e.to_string())
        }
        _ => StoreError::Unchecked { path: path.to_path_buf(), detail: e.to_string() },
    })?;
    if check == "ok" { Ok(()) } else { Err(corrupt(check)) }
}

/// Creates an empty file with mode 0600 unless one exists.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens the database again for writing (after an I/O error), with the settings of
/// [`open`] and no checks or migrations: the same file was opened and migrated at start.
pub fn reopen(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(open_err)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT).map_err(open_err)?;
    Ok(conn)
}

fn migrate(mut conn: Connection, from: i64, path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(from.max(0) as usize) {
        let version = index as i64 + 1;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(open_err)?;
        tx.execute_batch(sql).map_err(open_err)?;
        if version == 12 {
            // Daemons before 12 never marked a finished file: one finishing then (its move
            // cut short by a crash) is recognised by its size, as it was, not refused as
            // unmarked and downloaded again.
            tx.execute("UPDATE tasks SET unmarked = 1 WHERE phase = 'finishing'", []).map_err(open_err)?;
        }
        tx.pragma_update(None, "user_version", version).map_err(open_err)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        tracing::info!(version, "database migrated");
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task finishing when a daemon before schema 12 stopped (it marked no file) is
    /// unmarked after the upgrade; one still downloading is not (the new writer marks it).
    #[test]
    fn a_finishing_task_from_before_marks_is_recognised_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..11] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 11).unwrap();
        conn.execute_batch(
            "INSERT INTO sessions (id, identifier, http_headers, timeout_request_ms, timeout_resource_ms,
                 max_conn_per_host, next_seq, invalidating, invalid, created_at)
             VALUES (1, 's', '[]', 1, 1, 1, 1, 0, 0, 0);",
        )
        .unwrap();
        for (id, phase) in [(1, "finishing"), (2, "transfer")] {
            conn.execute(
                "INSERT INTO tasks (id, session_id, url, headers, priority, overwrite, created_at, state, phase,
                     committed_offset, response_headers, attempts, retired)
                 VALUES (?1, 1, 'http://x/', '[]', 0.5, 0, 0, 'running', ?2, 0, '[]', 1, 0)",
                rusqlite::params![id, phase],
            )
            .unwrap();
        }
        let conn = migrate(conn, 11, &path).unwrap();
        let unmarked = |id: i64| -> Option<bool> {
            conn.query_row("SELECT unmarked FROM tasks WHERE id = ?1", [id], |r| r.get(0)).unwrap()
        };
        assert_eq!(unmarked(1), Some(true), "finishing when marks did not exist");
        assert_eq!(unmarked(2), None, "still downloading: its file gets its mark");
    }

    /// A check kept off by another connection's lock says it could not check, not that the
    /// file is corrupt (which told the user to move a sound database away).
    #[test]
    fn a_check_that_cannot_run_is_not_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("CREATE TABLE t (x); PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;").unwrap();
        holder.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let checker = Connection::open(&path).unwrap();
        checker.busy_timeout(Duration::from_millis(100)).unwrap();
        match quick_check(&checker, &path) {
            Err(StoreError::Unchecked { detail, .. }) => assert!(detail.contains("locked"), "{detail}"),
            other => panic!("expected Unchecked, got {other:?}"),
        }
        holder.execute_batch("COMMIT").unwrap();
        drop(holder);
        quick_check(&checker, &path).unwrap();
    }
}
