//! Human formatting: sizes, speeds, durations, times, file names from
//! URLs, and the short and long explanations of why a task is not running.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use bytesize::ByteSize;
use dlsession_proto::{ErrorInfo, TaskCounts, TaskState, WaitReason};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `12.0 MiB`, `512 B`.
pub fn size(bytes: u64) -> String {
    ByteSize::b(bytes).display().iec().to_string()
}

/// `1.2 MiB/s`, or `-` when nothing is moving.
pub fn speed(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 { "-".into() } else { format!("{}/s", size(bytes_per_sec)) }
}

/// A compact duration: `<1 s`, `4 s`, `3 min 20 s`, `2 h 5 min`, `3 d 4 h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    if s == 0 {
        return "<1 s".into();
    }
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec} s"),
        (0, 0, _) if sec == 0 => format!("{m} min"),
        (0, 0, _) => format!("{m} min {sec} s"),
        (0, _, _) if m == 0 => format!("{h} h"),
        (0, _, _) => format!("{h} h {m} min"),
        _ if h == 0 => format!("{d} d"),
        _ => format!("{d} d {h} h"),
    }
}

/// Time left at the current speed, when it can be known.
pub fn eta(received: u64, expected: Option<u64>, speed: u64) -> Option<String> {
    let expected = expected?;
    if speed == 0 || expected < received {
        return None;
    }
    let left = expected - received;
    Some(duration_ms(left.saturating_mul(1000) / speed))
}

/// `12% 12.0 MiB / 100.0 MiB`, or `12.0 MiB / ?` when the size is unknown.
pub fn progress(received: u64, expected: Option<u64>) -> String {
    match expected {
        Some(total) if total > 0 => {
            let pct = (u128::from(received) * 100 / u128::from(total)).min(100);
            format!("{pct}% {} / {}", size(received), size(total))
        }
        Some(_) => format!("{} / {}", size(received), size(0)),
        None => format!("{} / ?", size(received)),
    }
}

/// An instant in local time: `$TZ` or `/etc/localtime`, through the system's zoneinfo
/// (UTC when neither can be read).
fn local(ms: u64) -> jiff::ZonedDateTime {
    static ZONE: std::sync::OnceLock<jiff::tz::TimeZone> = std::sync::OnceLock::new();
    let zone = ZONE.get_or_init(jiff::tz::TimeZone::system);
    let at = i64::try_from(ms).ok().and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok());
    at.unwrap_or(jiff::Timestamp::MAX).to_zoned_datetime(zone.clone())
}

/// `2026-11-25 18:27:46` in local time.
pub fn timestamp(ms: u64) -> String {
    local(ms).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// `2026-11-25 18:27:46 CET`: local time with the zone's abbreviation.
pub fn timestamp_zoned(ms: u64) -> String {
    local(ms).strftime("%Y-%m-%d %H:%M:%S %Z").to_string().trim_end().to_owned()
}

/// `18:27:46` when `ms` is today (local time), else the full timestamp.
pub fn clock(ms: u64, now: u64) -> String {
    let at = local(ms);
    if at.date() == local(now).date() { at.strftime("%H:%M:%S").to_string() } else { timestamp(ms) }
}

/// `in 12 s`, `3 min ago`, `now`.
pub fn relative(ms: u64, now: u64) -> String {
    if ms.abs_diff(now) < 1000 {
        "now".into()
    } else if ms > now {
        format!("in {}", duration_ms(ms - now))
    } else {
        format!("{} ago", duration_ms(now - ms))
    }
}

/// `2026-11-25 18:27:46 CET (in 12 s)`.
pub fn when(ms: u64, now: u64) -> String {
    format!("{} ({})", timestamp_zoned(ms), relative(ms, now))
}

/// An error as `code: message` (plus the HTTP status when the message lacks it).
pub fn error(e: &ErrorInfo) -> String {
    match e.http_status {
        Some(status) if !e.message.contains(&status.to_string()) => format!("{e} (HTTP {status})"),
        _ => e.to_string(),
    }
}

/// `2 running, 5 queued` (states with zero tasks left out), or `none`.
pub fn task_counts(c: &TaskCounts) -> String {
    let parts: Vec<String> = [TaskState::Running, TaskState::Waiting, TaskState::Queued, TaskState::Suspended]
        .into_iter()
        .chain([TaskState::Completed])
        .filter(|s| c.get(*s) > 0)
        .map(|s| format!("{} {}", c.get(s), s.as_str()))
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

/// Why a task is not running, in a few words (the `tasks` table's WHY column).
pub fn wait_short(w: &WaitReason, now: u64) -> String {
    match w {
        WaitReason::Suspended => "suspended".into(),
        WaitReason::GlobalLimit { limit } => format!("global limit ({limit})"),
        WaitReason::HostLimit { host, limit } => format!("host limit ({host}, {limit})"),
        WaitReason::SessionLimit { limit } => format!("session limit ({limit})"),
        WaitReason::EarliestBegin { at } => format!("not before {}", clock(*at, now)),
        WaitReason::Backoff { until, attempt, last_error } => {
            format!("backoff until {} (attempt {attempt}: {})", clock(*until, now), error(last_error))
        }
        WaitReason::EventsPending { .. } => "events pending".into(),
        WaitReason::DestinationUnavailable { error: e, next_try, .. } => match next_try {
            Some(at) => format!("cannot move to destination, retry at {} ({})", clock(*at, now), error(e)),
            None => format!("cannot move to destination ({})", error(e)),
        },
        WaitReason::StorageFull { error: e } => format!("held: daemon storage unavailable ({})", error(e)),
        WaitReason::NoNetwork { since } => format!("no network since {}", clock(*since, now)),
        WaitReason::MeteredNetwork => "metered network".into(),
        WaitReason::OnBattery => "on battery".into(),
        WaitReason::Discretionary => "discretionary: waits for better conditions".into(),
        WaitReason::AuthRequired { challenge: c } => format!("credentials wanted ({} at {})", c.scheme, c.origin),
    }
}

/// Why a task is not running and until when, as a sentence (for `show`).
pub fn wait_sentence(w: &WaitReason, task: u64, now: u64) -> String {
    match w {
        WaitReason::Suspended => {
            format!("suspended: created or paused and not resumed (`dlsessionctl resume {task}` starts it)")
        }
        WaitReason::GlobalLimit { limit } => {
            format!("queued: dlsessiond already runs its limit of {limit} downloads at once")
        }
        WaitReason::HostLimit { host, limit } => {
            format!("queued: the session's limit of {limit} connections to {host} is reached")
        }
        WaitReason::SessionLimit { limit } => {
            format!("queued: the session's limit of {limit} concurrent tasks is reached")
        }
        WaitReason::EarliestBegin { at } => format!("scheduled: not before {}", when(*at, now)),
        WaitReason::Backoff { until, attempt, last_error } => format!(
            "backing off after attempt {attempt} until {} ({}); last error: {}",
            clock(*until, now),
            relative(*until, now),
            error(last_error)
        ),
        WaitReason::EventsPending { next_wake } => {
            let wake = match next_wake {
                Some(at) => format!("next wake of the app {}", relative(*at, now)),
                None => "no wake scheduled".into(),
            };
            format!("completed; its events wait for the app to collect them ({wake})")
        }
        WaitReason::DestinationUnavailable { error: e, attempt, next_try } => {
            let next = match next_try {
                Some(at) => format!("tried {attempt} time(s); next try {}", relative(*at, now)),
                None => format!("tried {attempt} time(s)"),
            };
            format!(
                "downloaded, but the file cannot be moved to its destination: {}; the data is kept ({next}; \
                 `dlsessionctl resume {task}` tries now)",
                error(e)
            )
        }
        WaitReason::StorageFull { error: e } => format!(
            "held at its last checkpoint: dlsessiond cannot write its database ({}); it goes on by itself when \
             it can",
            error(e)
        ),
        WaitReason::NoNetwork { since } => format!(
            "no route to the server since {} ({}); it goes on as soon as the network is back, spending no \
             attempts meanwhile",
            clock(*since, now),
            relative(*since, now)
        ),
        WaitReason::MeteredNetwork => {
            "queued: the network is metered and its policy does not allow it (it goes on on an unmetered one; \
             see `dlsessionctl policy`)"
                .into()
        }
        WaitReason::OnBattery => {
            "queued: the machine runs on battery and its policy does not allow it (it goes on on AC power; see \
             `dlsessionctl policy`)"
                .into()
        }
        WaitReason::Discretionary => format!(
            "queued: discretionary (its policy): it waits for an unmetered network and AC power or a battery \
             at {} % or more",
            dlsession_proto::DISCRETIONARY_BATTERY_PERCENT
        ),
        WaitReason::AuthRequired { challenge: c } => {
            let realm = c.realm.as_deref().map(|r| format!(" realm {r:?}")).unwrap_or_default();
            let who = if c.proxy { "the proxy" } else { "the server" };
            format!(
                "waiting for credentials: {who} {} asked ({}{realm}, round {}); its app answers, or \
                 `dlsessionctl auth {task} …`",
                c.origin, c.scheme, c.round
            )
        }
    }
}

/// The name used when a URL gives none (`https://host/`, `…/..`).
pub const FALLBACK_FILE_NAME: &str = "download";

/// Longest file name produced, in bytes (file systems allow 255).
const MAX_FILE_NAME: usize = 200;

/// A safe file name: no `/`, NUL or control characters, not empty, `.` or `..`, at most
/// 200 bytes.
pub fn sanitize_file_name(name: &str) -> String {
    let mut out: String = name.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
    if out.len() > MAX_FILE_NAME {
        let mut cut = MAX_FILE_NAME;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if out.trim().is_empty() || out == "." || out == ".." { FALLBACK_FILE_NAME.into() } else { out }
}

/// The file name a URL suggests: its last path segment, percent-decoded and sanitized.
/// `None` if the string is not a URL.
pub fn file_name_from_url(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    let last = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default();
    let decoded = String::from_utf8_lossy(&dlsession_proto::redact::percent_decode(last)).into_owned();
    Some(sanitize_file_name(&decoded))
}

/// Parses `Name: value` (split at the first colon, both sides trimmed).
pub fn parse_header(raw: &str) -> Result<(String, String), String> {
    let Some((name, value)) = raw.split_once(':') else {
        return Err(format!("header {raw:?} has no ':'; write it as 'Name: value'"));
    };
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() {
        return Err(format!("header {raw:?} has an empty name; write it as 'Name: value'"));
    }
    // The daemon's own rules, before it is contacted: a usage error like the rest.
    dlsession_proto::validate::header(name, value).map_err(|e| e.message)?;
    Ok((name.to_owned(), value.to_owned()))
}

/// Shortens `s` to at most `max` characters by cutting out its middle.
pub fn truncate_middle(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max || max < 5 {
        return s.to_owned();
    }
    let keep = max - 1;
    let head = keep / 2;
    let tail = keep - head;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

/// Whether to colour stdout: a terminal (not a dumb one), and `NO_COLOR` unset or empty.
pub fn color_stdout() -> bool {
    use_color(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// The colour decision (<https://no-color.org>): only on a terminal, never when `NO_COLOR`
/// is set to anything but the empty string, never on `TERM=dumb`.
pub fn use_color(is_terminal: bool, no_color: Option<&std::ffi::OsStr>, term: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

/// ANSI colouring of a task state (already padded), or the text as is.
pub fn paint_state(text: &str, state: TaskState, failed: bool, color: bool) -> String {
    if !color {
        return text.to_owned();
    }
    let code = match state {
        TaskState::Running => "32",
        TaskState::Waiting => "33",
        TaskState::Queued => "36",
        TaskState::Suspended => "2",
        TaskState::Completed if failed => "31",
        TaskState::Completed => "32;2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::ErrorCode;

    #[test]
    fn sizes_and_speeds() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(speed(0), "-");
        assert_eq!(speed(1536), "1.5 KiB/s");
        assert_eq!(progress(12 << 20, Some(100 << 20)), "12% 12.0 MiB / 100.0 MiB");
        assert_eq!(progress(5, None), "5 B / ?");
        assert_eq!(progress(200, Some(100)), "100% 200 B / 100 B");
    }

    #[test]
    fn durations_and_etas() {
        assert_eq!(duration_ms(0), "<1 s");
        assert_eq!(duration_ms(4_000), "4 s");
        assert_eq!(duration_ms(200_000), "3 min 20 s");
        assert_eq!(duration_ms(180_000), "3 min");
        assert_eq!(duration_ms(7_500_000), "2 h 5 min");
        assert_eq!(duration_ms(7_200_000), "2 h");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000 + 5), "3 d 4 h");
        assert_eq!(eta(0, Some(1000), 100), Some("10 s".into()));
        assert_eq!(eta(0, None, 100), None);
        assert_eq!(eta(0, Some(1000), 0), None);
        assert_eq!(relative(10_000, 22_000), "12 s ago");
        assert_eq!(relative(22_000, 10_000), "in 12 s");
        assert_eq!(relative(10_000, 10_500), "now");
    }

    #[test]
    fn timestamps_have_the_documented_shape() {
        let t = timestamp(1_795_631_266_000);
        assert_eq!(t.len(), "2026-11-25 18:27:46".len());
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
        assert_eq!(clock(1_795_631_266_000, 1_795_631_266_000).len(), "18:27:46".len());
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name_from_url("https://h/dir/a.bin").as_deref(), Some("a.bin"));
        assert_eq!(file_name_from_url("https://h/dir/my%20file.iso?x=1").as_deref(), Some("my file.iso"));
        assert_eq!(file_name_from_url("https://h/a%2Fb").as_deref(), Some("a_b"));
        assert_eq!(file_name_from_url("https://h/").as_deref(), Some(FALLBACK_FILE_NAME));
        assert_eq!(file_name_from_url("https://h").as_deref(), Some(FALLBACK_FILE_NAME));
        assert_eq!(file_name_from_url("https://h/x/%2E%2E").as_deref(), Some(FALLBACK_FILE_NAME));
        assert_eq!(file_name_from_url("https://h/x/%00y").as_deref(), Some("_y"));
        assert_eq!(file_name_from_url("nope"), None);
        assert!(file_name_from_url(&format!("https://h/{}", "é".repeat(300))).unwrap().len() <= 200);
        assert_eq!(sanitize_file_name("."), FALLBACK_FILE_NAME);
        assert_eq!(sanitize_file_name(""), FALLBACK_FILE_NAME);
    }

    #[test]
    fn headers_parse_at_the_first_colon() {
        assert_eq!(parse_header("Accept: text/plain"), Ok(("Accept".into(), "text/plain".into())));
        assert_eq!(parse_header("X-Time:  12:30 "), Ok(("X-Time".into(), "12:30".into())));
        assert_eq!(parse_header("X-Empty:"), Ok(("X-Empty".into(), String::new())));
        assert!(parse_header("NoColon").is_err());
        assert!(parse_header(": v").is_err());
        // The daemon's rules, checked here (a usage error before it is contacted).
        assert!(parse_header("Bad Name: v").unwrap_err().contains("invalid header name"));
        assert!(parse_header("Range: bytes=0-").unwrap_err().contains("managed by dlsessiond"));
        assert!(parse_header("X-A: a\rb").unwrap_err().contains("control character"));
    }

    #[test]
    fn wait_reasons() {
        let now = 1_000_000;
        let backoff = WaitReason::Backoff {
            until: now + 4_000,
            attempt: 3,
            last_error: ErrorInfo::new(ErrorCode::Network, "connection reset"),
        };
        let short = wait_short(&backoff, now);
        assert!(short.starts_with("backoff until "), "{short}");
        assert!(short.ends_with("(attempt 3: network: connection reset)"), "{short}");
        let long = wait_sentence(&backoff, 7, now);
        assert!(long.starts_with("backing off after attempt 3 until "), "{long}");
        assert!(long.ends_with("(in 4 s); last error: network: connection reset"), "{long}");
        assert_eq!(wait_short(&WaitReason::HostLimit { host: "h:443".into(), limit: 6 }, now), "host limit (h:443, 6)");
        assert_eq!(wait_short(&WaitReason::GlobalLimit { limit: 16 }, now), "global limit (16)");
    }

    #[test]
    fn counts_and_truncation() {
        let mut c = TaskCounts::default();
        assert_eq!(task_counts(&c), "none");
        c.running = 2;
        c.queued = 5;
        assert_eq!(task_counts(&c), "2 running, 5 queued");
        assert_eq!(truncate_middle("abcdefghij", 5), "ab…ij");
        assert_eq!(truncate_middle("abc", 5), "abc");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        let set = |s: &'static str| Some(OsStr::new(s));
        assert!(use_color(true, None, set("xterm-256color")));
        assert!(use_color(true, None, None));
        assert!(use_color(true, set(""), set("xterm")), "an empty NO_COLOR does not count");
        assert!(!use_color(false, None, set("xterm")), "not a terminal");
        assert!(!use_color(true, set("1"), set("xterm")));
        assert!(!use_color(true, set("0"), set("xterm")), "any non-empty value turns colour off");
        assert!(!use_color(true, None, set("dumb")));
        assert!(!use_color(false, set("1"), None));
        assert_eq!(paint_state("running", TaskState::Running, false, false), "running");
        assert_eq!(paint_state("running", TaskState::Running, false, true), "\x1b[32mrunning\x1b[0m");
    }

    #[test]
    fn http_errors_show_their_status() {
        assert_eq!(
            error(&ErrorInfo::http(404, "server answered 404 Not Found")),
            "http_status: server answered 404 Not Found"
        );
        assert_eq!(error(&ErrorInfo::http(404, "not found")), "http_status: not found (HTTP 404)");
    }
}
