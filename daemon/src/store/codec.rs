//! Rows ↔ records.

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use crate::model::{
    DEFAULT_FILE_MODE, EventRecord, HeldCredential, Phase, SessionKey, SessionRecord, TaskRecord, Upload,
};
use dlsession_proto::{
    Challenge, DurableEvent, ErrorCode, ErrorInfo, Header, LaunchSpec, SessionConfig, TaskId, TaskState, UploadMethod,
};

// Lists are stored as NUL-separated text: NUL cannot occur in a valid header, argv
// element or URL, and validation refuses it before anything reaches the store.
fn join_headers(headers: &[Header]) -> String {
    let mut out = String::new();
    for h in headers {
        out.push_str(&h.name);
        out.push('\0');
        out.push_str(&h.value);
        out.push('\0');
    }
    out
}

fn split_headers(text: &str) -> Vec<Header> {
    let mut parts = text.split('\0');
    let mut out = Vec::new();
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        out.push(Header::new(name, value));
    }
    out
}

fn launch_columns(launch: &Option<LaunchSpec>) -> (Option<&'static str>, Option<String>) {
    match launch {
        None => (None, None),
        Some(LaunchSpec::Command { argv }) => (Some("command"), Some(argv.join("\0"))),
        Some(LaunchSpec::SystemdUnit { unit }) => (Some("systemd_unit"), Some(unit.clone())),
        Some(LaunchSpec::DesktopApp { app_id }) => (Some("desktop_app"), Some(app_id.clone())),
    }
}

fn launch_from(kind: Option<String>, value: Option<String>) -> rusqlite::Result<Option<LaunchSpec>> {
    Ok(match (kind.as_deref(), value) {
        (None, None) => None,
        (Some("command"), Some(v)) => Some(LaunchSpec::Command { argv: v.split('\0').map(str::to_owned).collect() }),
        (Some("systemd_unit"), Some(v)) => Some(LaunchSpec::SystemdUnit { unit: v }),
        (Some("desktop_app"), Some(v)) => Some(LaunchSpec::DesktopApp { app_id: v }),
        // Never dropped: the session's app would silently never be relaunched.
        (kind, _) => return Err(unknown(3, "launch kind", kind.unwrap_or("(none, with a value)"))),
    })
}

fn error_columns(e: &Option<ErrorInfo>) -> (Option<&'static str>, Option<&str>, Option<u16>) {
    match e {
        None => (None, None, None),
        Some(e) => (Some(e.code.as_str()), Some(e.message.as_str()), e.http_status),
    }
}

fn error_from(
    column: usize,
    code: Option<String>,
    message: Option<String>,
    http: Option<u16>,
) -> rusqlite::Result<Option<ErrorInfo>> {
    let Some(code) = code else { return Ok(None) };
    let Some(known) = ErrorCode::from_name(&code) else { return Err(unknown(column, "error code", &code)) };
    // Through `new`: a message stored before messages were bounded is cut like a new one.
    Ok(Some(ErrorInfo { http_status: http, ..ErrorInfo::new(known, message.unwrap_or_default()) }))
}

fn state_name(state: TaskState) -> &'static str {
    // A running task is stored as queued: after a restart it queues again.
    match state {
        TaskState::Running => TaskState::Queued.as_str(),
        s => s.as_str(),
    }
}

/// Stores a resumed task as queued (see `Op::Queued`).
pub fn set_queued(tx: &Transaction<'_>, task: TaskId, resource_deadline: Option<u64>) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE tasks SET state = ?2, resource_deadline = ?3, retry_at = NULL WHERE id = ?1")?
        .execute(params![sat(task), state_name(TaskState::Queued), i64_opt(resource_deadline)])?;
    Ok(())
}

fn u64_opt(v: Option<i64>) -> Option<u64> {
    v.map(|v| v.max(0) as u64)
}

fn i64_opt(v: Option<u64>) -> Option<i64> {
    v.map(sat)
}

/// A u64 as SQLite's integer, saturating: values a client or server chose (a timeout of
/// `u64::MAX` ms, say) must not wrap to negative numbers and come back as zero.
pub fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Inserts or updates a session row (one statement for both, so the column lists cannot
/// drift). `next_seq` never goes backwards.
pub fn save_session(tx: &Transaction<'_>, s: &SessionRecord) -> rusqlite::Result<()> {
    let (kind, value) = launch_columns(&s.config.launch);
    let mut stmt = tx.prepare_cached(
        "INSERT INTO sessions (id, identifier, app_id, launch_kind, launch_value, http_headers,
            timeout_request_ms, timeout_resource_ms, max_conn_per_host, max_concurrent_tasks,
            bandwidth_limit, next_seq, invalidating, invalid, created_at, allows_metered, allows_battery,
            discretionary, waits_for_connectivity, notify, cancelling)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)
         ON CONFLICT(id) DO UPDATE SET app_id = excluded.app_id, launch_kind = excluded.launch_kind,
            launch_value = excluded.launch_value, http_headers = excluded.http_headers,
            timeout_request_ms = excluded.timeout_request_ms, timeout_resource_ms = excluded.timeout_resource_ms,
            max_conn_per_host = excluded.max_conn_per_host, max_concurrent_tasks = excluded.max_concurrent_tasks,
            bandwidth_limit = excluded.bandwidth_limit, next_seq = max(next_seq, excluded.next_seq),
            invalidating = excluded.invalidating, invalid = excluded.invalid,
            allows_metered = excluded.allows_metered, allows_battery = excluded.allows_battery,
            discretionary = excluded.discretionary, waits_for_connectivity = excluded.waits_for_connectivity,
            notify = excluded.notify, cancelling = excluded.cancelling",
    )?;
    stmt.execute(params![
        s.key,
        s.identifier,
        s.config.app_id,
        kind,
        value,
        join_headers(&s.config.http_headers),
        sat(s.config.timeout_for_request_ms),
        sat(s.config.timeout_for_resource_ms),
        s.config.max_connections_per_host,
        s.config.max_concurrent_tasks,
        i64_opt(s.config.bandwidth_limit),
        sat(s.next_seq),
        s.invalidating,
        s.invalid,
        sat(s.created_at),
        s.policy.allows_metered,
        s.policy.allows_battery,
        s.policy.discretionary,
        s.policy.waits_for_connectivity,
        s.policy.notify,
        s.cancelling,
    ])?;
    Ok(())
}

pub fn load_sessions(conn: &Connection) -> rusqlite::Result<Vec<SessionRecord>> {
    let mut stmt = conn.prepare(
        "SELECT id, identifier, app_id, launch_kind, launch_value, http_headers, timeout_request_ms,
            timeout_resource_ms, max_conn_per_host, max_concurrent_tasks, bandwidth_limit, next_seq,
            invalidating, invalid, created_at, allows_metered, allows_battery, discretionary,
            waits_for_connectivity, notify, cancelling
         FROM sessions WHERE substr(identifier, 1, 1) <> char(1) ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SessionRecord {
            key: r.get(0)?,
            identifier: r.get(1)?,
            config: SessionConfig {
                app_id: r.get(2)?,
                launch: launch_from(r.get(3)?, r.get(4)?)?,
                http_headers: split_headers(&r.get::<_, String>(5)?),
                timeout_for_request_ms: r.get::<_, i64>(6)?.max(0) as u64,
                timeout_for_resource_ms: r.get::<_, i64>(7)?.max(0) as u64,
                max_connections_per_host: r.get(8)?,
                max_concurrent_tasks: r.get(9)?,
                bandwidth_limit: u64_opt(r.get(10)?),
            },
            next_seq: r.get::<_, i64>(11)?.max(0) as u64,
            invalidating: r.get(12)?,
            cancelling: r.get(20)?,
            invalid: r.get(13)?,
            created_at: r.get::<_, i64>(14)?.max(0) as u64,
            policy: dlsession_proto::SessionPolicy {
                allows_metered: r.get(15)?,
                allows_battery: r.get(16)?,
                discretionary: r.get(17)?,
                waits_for_connectivity: r.get(18)?,
                notify: r.get(19)?,
            },
        })
    })?;
    rows.collect()
}

const TASK_COLUMNS: &str = "id, session_id, url, headers, description, priority, earliest_begin, expected_sha256,
    destination, overwrite, expected_size, created_at, state, phase, committed_offset, bytes_expected, etag,
    last_modified, final_url, response_status, response_headers, attempts, last_error_code, last_error_msg,
    last_error_http, retry_at, started_at, finished_at, resource_deadline, location, error_code, error_msg,
    error_http, resume_secret, retired, file_mode, bandwidth_limit, allows_metered, allows_battery, discretionary,
    waits_for_connectivity, upload_method, upload_file, upload_size, upload_mtime_ns, upload_idempotent,
    upload_resume_url, upload_truncated, upload_in_flight, challenge_scheme, challenge_realm, challenge_origin,
    challenge_proxy, challenge_round, unmarked, total_known, refetched";

/// Inserts or replaces a task row (one statement for both, so the column lists cannot drift).
pub fn save_task(tx: &Transaction<'_>, t: &TaskRecord) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
            ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35,
            ?36, ?37, ?38, ?39, ?40, ?41, ?42, ?43, ?44, ?45, ?46, ?47, ?48, ?49, ?50, ?51, ?52, ?53, ?54, ?55, ?56, ?57)
         ON CONFLICT(id) DO UPDATE SET priority = excluded.priority, state = excluded.state,
            phase = excluded.phase, committed_offset = excluded.committed_offset,
            bytes_expected = excluded.bytes_expected, etag = excluded.etag, last_modified = excluded.last_modified,
            final_url = excluded.final_url, response_status = excluded.response_status,
            response_headers = excluded.response_headers, attempts = excluded.attempts,
            last_error_code = excluded.last_error_code, last_error_msg = excluded.last_error_msg,
            last_error_http = excluded.last_error_http, retry_at = excluded.retry_at,
            started_at = excluded.started_at, finished_at = excluded.finished_at,
            resource_deadline = excluded.resource_deadline, location = excluded.location,
            error_code = excluded.error_code, error_msg = excluded.error_msg, error_http = excluded.error_http,
            resume_secret = excluded.resume_secret, file_mode = excluded.file_mode,
            bandwidth_limit = excluded.bandwidth_limit, allows_metered = excluded.allows_metered,
            allows_battery = excluded.allows_battery, discretionary = excluded.discretionary,
            waits_for_connectivity = excluded.waits_for_connectivity,
            upload_resume_url = excluded.upload_resume_url, upload_truncated = excluded.upload_truncated,
            upload_in_flight = excluded.upload_in_flight, challenge_scheme = excluded.challenge_scheme,
            challenge_realm = excluded.challenge_realm, challenge_origin = excluded.challenge_origin,
            challenge_proxy = excluded.challenge_proxy, challenge_round = excluded.challenge_round,
            unmarked = excluded.unmarked, total_known = excluded.total_known, refetched = excluded.refetched"
    ))?;
    let up = t.upload.as_ref();
    let ch = t.challenge.as_ref();
    let (lec, lem, leh) = error_columns(&t.last_error);
    let (ec, em, eh) = error_columns(&t.error);
    stmt.execute(params![
        sat(t.id),
        t.session,
        t.url,
        join_headers(&t.headers),
        t.description,
        f64::from(t.priority),
        i64_opt(t.earliest_begin),
        t.expected_sha256.as_ref().map(|d| d.as_slice()),
        t.destination,
        t.overwrite,
        i64_opt(t.expected_size),
        sat(t.created_at),
        state_name(t.state),
        phase_name(t.phase),
        sat(t.committed_offset),
        i64_opt(t.bytes_expected),
        t.etag,
        t.last_modified,
        t.final_url,
        t.response_status,
        join_headers(&t.response_headers),
        t.attempts,
        lec,
        lem,
        leh,
        i64_opt(t.retry_at),
        i64_opt(t.started_at),
        i64_opt(t.finished_at),
        i64_opt(t.resource_deadline),
        t.location,
        ec,
        em,
        eh,
        t.resume_secret.map(|s| s as i64),
        t.retired,
        t.file_mode,
        i64_opt(t.bandwidth_limit),
        t.policy.allows_metered,
        t.policy.allows_battery,
        t.policy.discretionary,
        t.policy.waits_for_connectivity,
        up.map(|u| u.method.as_str()),
        up.map(|u| u.file.as_str()),
        up.map(|u| sat(u.size)),
        up.map(|u| u.mtime_ns),
        up.map(|u| u.idempotent),
        up.and_then(|u| u.resume_url.as_deref()),
        up.map(|u| u.truncated),
        up.map(|u| u.in_flight),
        ch.map(|c| c.scheme.as_str()),
        ch.and_then(|c| c.realm.as_deref()),
        ch.map(|c| c.origin.as_str()),
        ch.map(|c| c.proxy),
        ch.map(|c| c.round),
        t.unmarked.then_some(true),
        t.total_known,
        t.refetched.then_some(true),
    ])?;
    Ok(())
}

fn upload_from(r: &Row<'_>) -> rusqlite::Result<Option<Upload>> {
    let Some(name) = r.get::<_, Option<String>>(41)? else { return Ok(None) };
    // An unknown method must not turn an upload into a download.
    let method = UploadMethod::from_name(&name).ok_or_else(|| unknown(41, "upload method", &name))?;
    Ok(Some(Upload {
        method,
        file: r.get::<_, Option<String>>(42)?.unwrap_or_default(),
        size: u64_opt(r.get(43)?).unwrap_or(0),
        mtime_ns: r.get::<_, Option<i64>>(44)?.unwrap_or(0),
        idempotent: r.get::<_, Option<bool>>(45)?.unwrap_or(false),
        resume_url: r.get(46)?,
        truncated: r.get::<_, Option<bool>>(47)?.unwrap_or(false),
        in_flight: r.get::<_, Option<bool>>(48)?.unwrap_or(false),
    }))
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Transfer => "transfer",
        Phase::Finishing => "finishing",
    }
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    let sha: Option<Vec<u8>> = r.get(7)?;
    let state: String = r.get(12)?;
    let phase: String = r.get(13)?;
    let id = r.get::<_, i64>(0)?;
    Ok(TaskRecord {
        id: u64::try_from(id).map_err(|_| unknown(0, "task id", &id.to_string()))?,
        session: r.get(1)?,
        url: r.get(2)?,
        headers: split_headers(&r.get::<_, String>(3)?),
        description: r.get(4)?,
        priority: r.get::<_, f64>(5)? as f32,
        earliest_begin: u64_opt(r.get(6)?),
        // A checksum of another length is never dropped: the check would silently not run.
        expected_sha256: sha
            .map(|v| {
                <[u8; 32]>::try_from(v.as_slice())
                    .map_err(|_| unknown(7, "expected_sha256 of length", &v.len().to_string()))
            })
            .transpose()?,
        destination: r.get(8)?,
        overwrite: r.get(9)?,
        expected_size: u64_opt(r.get(10)?),
        created_at: r.get::<_, i64>(11)?.max(0) as u64,
        state: TaskState::from_name(&state).ok_or_else(|| unknown(12, "task state", &state))?,
        phase: match phase.as_str() {
            "transfer" => Phase::Transfer,
            "finishing" => Phase::Finishing,
            other => return Err(unknown(13, "task phase", other)),
        },
        committed_offset: r.get::<_, i64>(14)?.max(0) as u64,
        bytes_expected: u64_opt(r.get(15)?),
        etag: r.get(16)?,
        last_modified: r.get(17)?,
        final_url: r.get(18)?,
        response_status: r.get(19)?,
        response_headers: split_headers(&r.get::<_, String>(20)?),
        attempts: r.get(21)?,
        last_error: error_from(22, r.get(22)?, r.get(23)?, r.get(24)?)?,
        retry_at: u64_opt(r.get(25)?),
        started_at: u64_opt(r.get(26)?),
        finished_at: u64_opt(r.get(27)?),
        resource_deadline: u64_opt(r.get(28)?),
        location: r.get(29)?,
        error: error_from(30, r.get(30)?, r.get(31)?, r.get(32)?)?,
        resume_secret: r.get::<_, Option<i64>>(33)?.map(|s| s as u64),
        retired: r.get(34)?,
        // None: a task from before modes were kept (migration 2). Wider than a mode: never
        // replaced by a guess.
        file_mode: match r.get::<_, Option<u32>>(35)? {
            None => DEFAULT_FILE_MODE,
            Some(m) if m <= 0o777 => m,
            Some(m) => return Err(unknown(35, "file mode", &format!("{m:o}"))),
        },
        bandwidth_limit: r.get::<_, Option<i64>>(36)?.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0),
        policy: dlsession_proto::TaskPolicy {
            allows_metered: r.get(37)?,
            allows_battery: r.get(38)?,
            discretionary: r.get(39)?,
            waits_for_connectivity: r.get(40)?,
        },
        upload: upload_from(r)?,
        challenge: match r.get::<_, Option<String>>(49)? {
            Some(scheme) => Some(Challenge {
                scheme,
                realm: r.get(50)?,
                origin: r.get::<_, Option<String>>(51)?.unwrap_or_default(),
                proxy: r.get::<_, Option<bool>>(52)?.unwrap_or(false),
                round: r.get::<_, Option<u32>>(53)?.unwrap_or(1),
            }),
            None => None,
        },
        unmarked: r.get::<_, Option<bool>>(54)?.unwrap_or(false),
        total_known: r.get(55)?,
        refetched: r.get::<_, Option<bool>>(56)?.unwrap_or(false),
    })
}

/// Live tasks that are not suspended (the ones the daemon works on or holds events for).
pub fn load_awake_tasks(conn: &Connection) -> rusqlite::Result<Vec<TaskRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_awake WHERE retired = 0 AND state <> 'suspended' ORDER BY id"
    ))?;
    let rows = stmt.query_map([], task_from_row)?;
    rows.collect()
}

/// How many suspended live tasks each session has (read from an index only).
pub fn load_dormant_counts(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT session_id, count(*) FROM tasks INDEXED BY tasks_dormant
         WHERE retired = 0 AND state = 'suspended' GROUP BY session_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
    rows.collect()
}

/// The suspended live tasks of `sessions` (all sessions' when `None`).
pub fn load_dormant(conn: &Connection, sessions: Option<&[SessionKey]>) -> rusqlite::Result<Vec<TaskRecord>> {
    let Some(sessions) = sessions else {
        let mut stmt = conn.prepare(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_dormant WHERE retired = 0 AND state = 'suspended'"
        ))?;
        let rows = stmt.query_map([], task_from_row)?;
        return rows.collect();
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_dormant
         WHERE session_id = ?1 AND retired = 0 AND state = 'suspended' ORDER BY id"
    ))?;
    let mut out = Vec::new();
    for key in sessions {
        for rec in stmt.query_map(params![key], task_from_row)? {
            out.push(rec?);
        }
    }
    Ok(out)
}

/// The sessions that hold any of `tasks` as a suspended live task.
pub fn sessions_of_dormant(conn: &Connection, tasks: &[TaskId]) -> rusqlite::Result<Vec<SessionKey>> {
    let mut stmt =
        conn.prepare_cached("SELECT session_id FROM tasks WHERE id = ?1 AND retired = 0 AND state = 'suspended'")?;
    let mut out = Vec::new();
    for id in tasks {
        if let Some(key) = stmt.query_row(params![sat(*id)], |r| r.get::<_, SessionKey>(0)).optional()?
            && !out.contains(&key)
        {
            out.push(key);
        }
    }
    Ok(out)
}

/// Every suspended live task's id and session (for the start's sweep of the cache).
pub fn load_dormant_ids(conn: &Connection) -> rusqlite::Result<Vec<(TaskId, SessionKey)>> {
    let mut stmt = conn.prepare(
        "SELECT id, session_id FROM tasks INDEXED BY tasks_dormant WHERE retired = 0 AND state = 'suspended'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get(1)?)))?;
    rows.collect()
}

pub fn load_task(conn: &Connection, id: TaskId) -> Result<Option<(TaskRecord, String)>, super::error::StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?;
    let Some(rec) = stmt.query_row(params![sat(id)], task_from_row).optional()? else { return Ok(None) };
    let stored: Option<String> = conn
        .prepare_cached("SELECT identifier FROM sessions WHERE id = ?1")?
        .query_row(params![rec.session], |r| r.get(0))
        .optional()?;
    let session = match stored {
        // "\u{1}KEY\u{1}IDENTIFIER": see `TOMBSTONE`.
        Some(t) if t.starts_with(TOMBSTONE) => match t.splitn(3, TOMBSTONE).nth(2) {
            Some(name) => format!("{name} (invalidated)"),
            None => "(invalidated session)".into(),
        },
        Some(name) => name,
        None => "(invalidated session)".into(),
    };
    Ok(Some((rec, session)))
}

/// Marks the row of an ended session kept for its tasks' history: its identifier becomes
/// `TOMBSTONE KEY TOMBSTONE IDENTIFIER`, which no live identifier can be (control
/// characters are refused), so the name is free for a new session.
pub const TOMBSTONE: &str = "\u{1}";

/// Above the key of every session row, tombstones included (keys are never reused).
pub fn load_next_session_key(conn: &Connection) -> rusqlite::Result<i64> {
    // Above every row, and above every deleted session's key (`next_session_key`).
    conn.query_row(
        "SELECT max(coalesce((SELECT max(id) FROM sessions), 0) + 1,
                    coalesce((SELECT value FROM meta WHERE key = 'next_session_key'), 1))",
        [],
        |r| r.get(0),
    )
}

pub fn insert_event(tx: &Transaction<'_>, e: &EventRecord) -> rusqlite::Result<()> {
    let (kind, task, offset, total, location, err) = match &e.event {
        DurableEvent::ResumedAtOffset { task, offset, expected_total } => {
            ("resumed_at_offset", Some(*task), Some(*offset), *expected_total, None, &None)
        }
        DurableEvent::FinishedDownloading { task, location } => {
            ("finished_downloading", Some(*task), None, None, Some(location.as_str()), &None)
        }
        DurableEvent::Completed { task, error } => ("completed", Some(*task), None, None, None, error),
        DurableEvent::DidBecomeInvalid { error } => ("did_become_invalid", None, None, None, None, error),
        DurableEvent::UploadResponse { task, body, .. } => {
            ("upload_response", Some(*task), None, None, Some(body.as_str()), &None)
        }
        // The origin goes in `location`.
        DurableEvent::Challenge { task, challenge } => {
            ("challenge", Some(*task), None, None, Some(challenge.origin.as_str()), &None)
        }
    };
    let ch = match &e.event {
        DurableEvent::Challenge { challenge, .. } => Some(challenge),
        _ => None,
    };
    let (status, headers, truncated) = match &e.event {
        DurableEvent::UploadResponse { status, headers, body_truncated, .. } => {
            (Some(*status), Some(join_headers(headers)), Some(*body_truncated))
        }
        _ => (None, None, None),
    };
    let (ec, em, eh) = error_columns(err);
    let mut stmt = tx.prepare_cached(
        "INSERT INTO events (session_id, seq, kind, task_id, byte_offset, expected_total, location, error_code,
            error_msg, error_http, created_at, http_status, headers, body_truncated, challenge_scheme,
            challenge_realm, challenge_proxy, challenge_round)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?;
    stmt.execute(params![
        e.session,
        sat(e.seq),
        kind,
        i64_opt(task),
        i64_opt(offset),
        i64_opt(total),
        location,
        ec,
        em,
        eh,
        sat(e.created_at),
        status,
        headers,
        truncated,
        ch.map(|c| c.scheme.as_str()),
        ch.and_then(|c| c.realm.as_deref()),
        ch.map(|c| c.proxy),
        ch.map(|c| c.round),
    ])?;
    Ok(())
}

/// Raises a session's next event number past `seq` (once per session and transaction: the
/// events of one commit raise it together).
pub fn raise_next_seq(tx: &Transaction<'_>, session: SessionKey, seq: u64) -> rusqlite::Result<()> {
    // Cached: a commit or more per finished download, and parsing this cost more than running it.
    tx.prepare_cached("UPDATE sessions SET next_seq = max(next_seq, ?2) WHERE id = ?1")?
        .execute(params![session, sat(seq.saturating_add(1))])?;
    Ok(())
}

/// A stored value this daemon cannot read: an error naming it, never a guess.
fn unknown(column: usize, what: &str, value: &str) -> rusqlite::Error {
    let message = format!("unknown {what} {value:?} in the database");
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, message.into())
}

pub fn load_events(conn: &Connection) -> rusqlite::Result<Vec<EventRecord>> {
    let mut stmt = conn.prepare(
        "SELECT session_id, seq, kind, task_id, byte_offset, expected_total, location, error_code, error_msg,
            error_http, created_at, http_status, headers, body_truncated, challenge_scheme, challenge_realm,
            challenge_proxy, challenge_round
         FROM events ORDER BY session_id, seq",
    )?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(2)?;
        let task_id = r.get::<_, Option<i64>>(3)?;
        // Every kind but `did_become_invalid` names its task: none, or a negative one, is
        // never taken for task 0.
        let task = match task_id {
            Some(t) if t >= 0 => t as u64,
            _ if kind == "did_become_invalid" => 0,
            other => return Err(unknown(3, "event task id", &format!("{other:?}"))),
        };
        let error = error_from(7, r.get(7)?, r.get(8)?, r.get(9)?)?;
        let event = match kind.as_str() {
            "resumed_at_offset" => DurableEvent::ResumedAtOffset {
                task,
                offset: r.get::<_, Option<i64>>(4)?.unwrap_or(0).max(0) as u64,
                expected_total: u64_opt(r.get(5)?),
            },
            "finished_downloading" => {
                DurableEvent::FinishedDownloading { task, location: r.get::<_, Option<String>>(6)?.unwrap_or_default() }
            }
            "completed" => DurableEvent::Completed { task, error },
            "upload_response" => DurableEvent::UploadResponse {
                task,
                status: r.get::<_, Option<u16>>(11)?.unwrap_or(0),
                headers: split_headers(&r.get::<_, Option<String>>(12)?.unwrap_or_default()),
                body: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                body_truncated: r.get::<_, Option<bool>>(13)?.unwrap_or(false),
            },
            "challenge" => DurableEvent::Challenge {
                task,
                challenge: Challenge {
                    scheme: r.get::<_, Option<String>>(14)?.unwrap_or_default(),
                    realm: r.get(15)?,
                    origin: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                    proxy: r.get::<_, Option<bool>>(16)?.unwrap_or(false),
                    round: r.get::<_, Option<u32>>(17)?.unwrap_or(1),
                },
            },
            "did_become_invalid" => DurableEvent::DidBecomeInvalid { error },
            // Never taken for another kind (this one would tell the app its session ended).
            other => return Err(unknown(2, "event kind", other)),
        };
        Ok(EventRecord {
            session: r.get(0)?,
            seq: r.get::<_, i64>(1)?.max(0) as u64,
            event,
            created_at: r.get::<_, i64>(10)?.max(0) as u64,
        })
    })?;
    rows.collect()
}

/// Sets a counter in `meta` to `value` unless it is higher already.
pub fn raise_meta(tx: &Transaction<'_>, key: &str, value: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
    )?
    .execute(params![key, i64::try_from(value).unwrap_or(i64::MAX)])?;
    Ok(())
}

/// The first event sequence number of a new session: above every number a session that
/// was deleted ever used, and at least 1.
pub fn load_seq_floor(conn: &Connection) -> rusqlite::Result<u64> {
    let stored: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'seq_floor'", [], |r| r.get(0)).optional()?;
    Ok(stored.unwrap_or(1).max(1) as u64)
}

/// The daemon-wide bandwidth limit last set at run time: `None` if never (the config's
/// applies), `Some(None)` if lifted.
pub fn load_global_limit(conn: &Connection) -> rusqlite::Result<Option<Option<u64>>> {
    let stored: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'global_bandwidth_limit'", [], |r| r.get(0)).optional()?;
    Ok(stored.map(|v| u64::try_from(v).ok().filter(|v| *v > 0)))
}

/// Stores the daemon-wide bandwidth limit set at run time (0: lifted).
pub fn set_global_limit(tx: &Transaction<'_>, rate: Option<u64>) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('global_bandwidth_limit', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![i64::try_from(rate.unwrap_or(0)).unwrap_or(i64::MAX)])?;
    Ok(())
}

pub fn load_cookie_jars(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, bool, super::JarJson)>> {
    let mut stmt = conn.prepare("SELECT session_id, enabled, jar FROM cookie_jars")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, super::JarJson(r.get(2)?))))?;
    rows.collect()
}

pub fn save_cookie_jar(tx: &Transaction<'_>, session: SessionKey, enabled: bool, jar: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO cookie_jars(session_id, enabled, jar) VALUES (?1, ?2, ?3)
         ON CONFLICT(session_id) DO UPDATE SET enabled = excluded.enabled, jar = excluded.jar",
    )?
    .execute(params![session, enabled, jar])?;
    Ok(())
}

pub fn load_session_proxies(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, dlsession_proto::SessionProxy)>> {
    let mut stmt = conn.prepare("SELECT session_id, url, no_proxy FROM session_proxies")?;
    let rows =
        stmt.query_map([], |r| Ok((r.get(0)?, dlsession_proto::SessionProxy { url: r.get(1)?, no_proxy: r.get(2)? })))?;
    rows.collect()
}

pub fn save_session_proxy(
    tx: &Transaction<'_>,
    session: SessionKey,
    proxy: Option<&dlsession_proto::SessionProxy>,
) -> rusqlite::Result<()> {
    match proxy {
        None => {
            tx.prepare_cached("DELETE FROM session_proxies WHERE session_id = ?1")?.execute(params![session])?;
        }
        Some(p) => {
            tx.prepare_cached(
                "INSERT INTO session_proxies(session_id, url, no_proxy) VALUES (?1, ?2, ?3)
                 ON CONFLICT(session_id) DO UPDATE SET url = excluded.url, no_proxy = excluded.no_proxy",
            )?
            .execute(params![session, p.url, p.no_proxy])?;
        }
    }
    Ok(())
}

pub fn load_next_task_id(conn: &Connection) -> rusqlite::Result<TaskId> {
    let stored: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'next_task_id'", [], |r| r.get(0)).optional()?;
    let max_id: Option<i64> = conn.query_row("SELECT max(id) FROM tasks", [], |r| r.get(0))?;
    // The last id SQLite can hold has no next: new ids would collide with stored ones.
    let after_max =
        max_id.unwrap_or(0).checked_add(1).ok_or_else(|| unknown(0, "task id", "9223372036854775807 (the last)"))?;
    Ok((stored.unwrap_or(1).max(after_max)).max(1) as u64)
}

/// Sessions that answer challenges (a session without a row does not).
pub fn load_session_challenges(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, bool)>> {
    let mut stmt = conn.prepare("SELECT session_id, answers FROM session_challenges")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Credentials kept (task 0: the session's protection space).
pub fn load_credentials(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, HeldCredential)>> {
    let mut stmt = conn.prepare("SELECT session_id, task_id, origin, proxy, name, value FROM credentials")?;
    let rows = stmt.query_map([], |r| {
        let task = r.get::<_, i64>(1)?;
        Ok((
            r.get(0)?,
            HeldCredential {
                task: (task > 0).then_some(task as u64),
                origin: r.get(2)?,
                proxy: r.get(3)?,
                name: r.get(4)?,
                value: r.get(5)?,
                kept: true,
            },
        ))
    })?;
    rows.collect()
}

pub fn save_credential(tx: &Transaction<'_>, session: SessionKey, c: &HeldCredential) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO credentials (session_id, task_id, origin, proxy, name, value)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![session, c.task.map_or(0, sat), c.origin, c.proxy, c.name, c.value])?;
    Ok(())
}

pub fn load_client_certs(conn: &Connection) -> rusqlite::Result<Vec<(SessionKey, dlsession_proto::ClientCertificate)>> {
    let mut stmt = conn.prepare("SELECT session_id, cert_file, key_file FROM session_client_certs")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, dlsession_proto::ClientCertificate { cert_file: r.get(1)?, key_file: r.get(2)? }))
    })?;
    rows.collect()
}

/// Stores what a request sent `Once` created, and forgets keys older than a day.
pub fn save_creation(tx: &Transaction<'_>, c: &crate::model::Creation) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO creations (session_id, key, first_id, count, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![c.session, c.key.to_be_bytes(), sat(c.first), sat(c.count), sat(c.created_at)])?;
    let before = c.created_at.saturating_sub(crate::model::CREATION_KEPT_MS);
    tx.prepare_cached("DELETE FROM creations WHERE created_at < ?1")?.execute(params![sat(before)])?;
    Ok(())
}

/// Creation keys made at or after `since`, the newest `CREATIONS_MOST`, oldest first (a key
/// that is not 16 bytes is not one this daemon wrote, and is skipped).
pub fn load_creations(conn: &Connection, since: u64) -> rusqlite::Result<Vec<crate::model::Creation>> {
    let mut stmt = conn.prepare(
        "SELECT * FROM (SELECT session_id, key, first_id, count, created_at FROM creations
            WHERE created_at >= ?1 ORDER BY created_at DESC LIMIT ?2) ORDER BY created_at",
    )?;
    let most = i64::try_from(crate::model::CREATIONS_MOST).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![sat(since), most], |r| {
        let key: Vec<u8> = r.get(1)?;
        let Ok(key) = <[u8; 16]>::try_from(key.as_slice()) else { return Ok(None) };
        Ok(Some(crate::model::Creation {
            session: r.get(0)?,
            key: u128::from_be_bytes(key),
            first: r.get::<_, i64>(2)?.max(0) as u64,
            count: r.get::<_, i64>(3)?.max(0) as u64,
            created_at: r.get::<_, i64>(4)?.max(0) as u64,
        }))
    })?;
    rows.filter_map(Result::transpose).collect()
}

/// The id at and below which retired tasks are past the newest `keep` (none if there are
/// not that many).
pub fn history_cutoff(conn: &Connection, keep: u64) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT id FROM tasks WHERE retired = 1 ORDER BY id DESC LIMIT 1 OFFSET ?1",
        params![sat(keep)],
        |r| r.get(0),
    )
    .optional()
}

/// Deletes at most `limit` retired tasks that finished (or, never started, were created) at
/// or before `before`; returns how many went (through `tasks_retired_age`).
pub fn prune_aged(tx: &Transaction<'_>, before: u64, limit: u64) -> rusqlite::Result<u64> {
    let deleted = tx.execute(
        "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks
            WHERE retired = 1 AND coalesce(finished_at, created_at) <= ?1 LIMIT ?2)",
        params![sat(before), sat(limit)],
    )?;
    Ok(deleted as u64)
}

/// Deletes at most `limit` retired tasks whose id is at or below `cutoff`; returns how many
/// went (through `tasks_live`).
pub fn prune_beyond(tx: &Transaction<'_>, cutoff: i64, limit: u64) -> rusqlite::Result<u64> {
    let deleted = tx.execute(
        "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE retired = 1 AND id <= ?1 LIMIT ?2)",
        params![cutoff, sat(limit)],
    )?;
    Ok(deleted as u64)
}

/// Deletes ended sessions kept for the history once none of their tasks is left.
pub fn drop_ended_sessions(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM sessions WHERE substr(identifier, 1, 1) = ?1
            AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.session_id = sessions.id)",
        params![TOMBSTONE],
    )?;
    Ok(())
}
