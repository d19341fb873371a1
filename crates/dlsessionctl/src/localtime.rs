//! Local time without a time-zone library: the UTC offset comes from the TZif file of
//! `$TZ` (a zone name or `:path`) or `/etc/localtime`. Anything unreadable means UTC.
//!
//! Only the transition table is used; for instants after the last transition (2037 in
//! "fat" zone files, earlier in "slim" ones) the last known offset applies, which is
//! the "local-ish" time this tool needs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One local time type: offset from UTC and its abbreviation (`CET`, `CEST`…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub offset_secs: i64,
    pub abbreviation: String,
}

impl Zone {
    fn utc() -> Zone {
        Zone { offset_secs: 0, abbreviation: "UTC".into() }
    }
}

/// A parsed zone: transitions (UTC seconds, index into `types`) and the types.
#[derive(Debug, Clone, Default)]
pub struct TzData {
    transitions: Vec<(i64, usize)>,
    types: Vec<Zone>,
}

impl TzData {
    /// The zone in effect at `unix_secs` (UTC if the data is empty).
    pub fn zone_at(&self, unix_secs: i64) -> Zone {
        let idx = self.transitions.partition_point(|(at, _)| *at <= unix_secs);
        let ty = match idx.checked_sub(1).and_then(|i| self.transitions.get(i)) {
            Some((_, ty)) => self.types.get(*ty),
            // Before the first transition: the first non-DST type, per RFC 8536 §3.2.
            None => self.types.first(),
        };
        ty.cloned().unwrap_or_else(Zone::utc)
    }

    /// Parses a TZif file (RFC 8536), preferring the 64-bit data of version 2+.
    pub fn parse(data: &[u8]) -> Option<TzData> {
        let v1 = Header::parse(data)?;
        let v1_len = v1.data_len(4);
        if v1.version >= b'2' {
            let rest = data.get(44 + v1_len..)?;
            let v2 = Header::parse(rest)?;
            return v2.read(rest.get(44..)?, 8);
        }
        v1.read(data.get(44..)?, 4)
    }
}

struct Header {
    version: u8,
    isutcnt: usize,
    isstdcnt: usize,
    leapcnt: usize,
    timecnt: usize,
    typecnt: usize,
    charcnt: usize,
}

fn be_u32(data: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

impl Header {
    fn parse(data: &[u8]) -> Option<Header> {
        if data.get(..4)? != b"TZif" {
            return None;
        }
        let n = |i: usize| be_u32(data, 20 + 4 * i).map(|v| v as usize);
        Some(Header {
            version: *data.get(4)?,
            isutcnt: n(0)?,
            isstdcnt: n(1)?,
            leapcnt: n(2)?,
            timecnt: n(3)?,
            typecnt: n(4)?,
            charcnt: n(5)?,
        })
    }

    fn data_len(&self, time_size: usize) -> usize {
        self.timecnt * time_size
            + self.timecnt
            + self.typecnt * 6
            + self.charcnt
            + self.leapcnt * (time_size + 4)
            + self.isstdcnt
            + self.isutcnt
    }

    fn read(&self, body: &[u8], time_size: usize) -> Option<TzData> {
        let times = body.get(..self.timecnt * time_size)?;
        let mut pos = times.len();
        let indices = body.get(pos..pos + self.timecnt)?;
        pos += self.timecnt;
        let ttinfos = body.get(pos..pos + self.typecnt * 6)?;
        pos += ttinfos.len();
        let chars = body.get(pos..pos + self.charcnt)?;
        let mut types = Vec::with_capacity(self.typecnt);
        for info in ttinfos.chunks_exact(6) {
            let offset = i32::from_be_bytes(info.get(..4)?.try_into().ok()?);
            let abbr_start = usize::from(*info.get(5)?);
            let abbr = chars.get(abbr_start..).unwrap_or_default();
            let end = abbr.iter().position(|&b| b == 0).unwrap_or(abbr.len());
            let abbreviation = String::from_utf8_lossy(abbr.get(..end).unwrap_or_default()).into_owned();
            types.push(Zone { offset_secs: i64::from(offset), abbreviation });
        }
        let mut transitions = Vec::with_capacity(self.timecnt);
        for (chunk, &ty) in times.chunks_exact(time_size).zip(indices) {
            let at = if time_size == 8 {
                i64::from_be_bytes(chunk.try_into().ok()?)
            } else {
                i64::from(i32::from_be_bytes(chunk.try_into().ok()?))
            };
            let ty = usize::from(ty);
            if ty >= types.len() {
                return None;
            }
            transitions.push((at, ty));
        }
        Some(TzData { transitions, types })
    }
}

fn zone_file() -> Option<PathBuf> {
    match std::env::var("TZ") {
        Ok(tz) if !tz.is_empty() => {
            let tz = tz.strip_prefix(':').unwrap_or(&tz);
            if tz.starts_with('/') {
                Some(PathBuf::from(tz))
            } else if tz.split('/').any(|part| part == ".." || part.is_empty()) {
                None
            } else {
                let dir = std::env::var_os("TZDIR").map(PathBuf::from);
                Some(dir.unwrap_or_else(|| PathBuf::from("/usr/share/zoneinfo")).join(tz))
            }
        }
        _ => Some(PathBuf::from("/etc/localtime")),
    }
}

fn load(path: &Path) -> Option<TzData> {
    TzData::parse(&std::fs::read(path).ok()?)
}

/// The local zone, loaded once.
pub fn local() -> &'static TzData {
    static LOCAL: OnceLock<TzData> = OnceLock::new();
    LOCAL.get_or_init(|| zone_file().and_then(|p| load(&p)).unwrap_or_default())
}

/// A calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Converts seconds since the epoch (already shifted to local time) to a calendar date
/// (Howard Hinnant's `civil_from_days`).
pub fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month: month as u32,
        day: day as u32,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), Civil { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0 });
        // 2026-11-25 18:27:46 UTC
        assert_eq!(civil(1_795_631_266), Civil { year: 2026, month: 11, day: 25, hour: 18, minute: 27, second: 46 });
        // A leap day.
        assert_eq!(civil(951_782_400), Civil { year: 2000, month: 2, day: 29, hour: 0, minute: 0, second: 0 });
        assert_eq!(civil(-1).year, 1969);
    }

    #[test]
    fn garbage_is_not_a_zone() {
        assert!(TzData::parse(b"").is_none());
        assert!(TzData::parse(b"TZif2 short").is_none());
        assert_eq!(TzData::default().zone_at(0), Zone::utc());
    }

    #[test]
    fn system_zone_files_parse() {
        // Only where the system has a zone database (it does on the usual Linux setups).
        let berlin = Path::new("/usr/share/zoneinfo/Europe/Berlin");
        if let Some(tz) = load(berlin) {
            // 2026-01-15 12:00 UTC is winter time, 2026-07-15 summer time.
            assert_eq!(tz.zone_at(1_768_478_400), Zone { offset_secs: 3600, abbreviation: "CET".into() });
            assert_eq!(tz.zone_at(1_784_116_800), Zone { offset_secs: 7200, abbreviation: "CEST".into() });
        }
    }
}
