//! Resume data: the opaque blob `cancel_producing_resume_data` hands out, and the
//! partial file it names, kept aside in the resume directory until a new task adopts it
//! or its retention runs out (docs/behaviour.md, "Resume data").

use serde::{Deserialize, Serialize};

use super::{After, Core};
use crate::model::TaskRecord;
use dlsession_proto::{ErrorCode, ErrorInfo, Header, TaskId, TaskSpec};

/// The first layout: `bytes_expected` is the total a server stated or, without one, the
/// app's `expected_size` (which a resumed task then took for a stated total).
const MAGIC_V1: [u8; 4] = *b"DLRD";
/// The second: the first's fields, `bytes_expected` only a stated total, then the app's
/// `expected_size` on its own.
const MAGIC_V2: [u8; 4] = *b"DLR2";

/// What the blob holds, in the first layout's order. Its encoding is a contract with every
/// blob handed out before (`a_blob_handed_out_before_still_decodes` pins each layout): a
/// layout never changes under its magic. A new field needs a new layout under a new magic,
/// chosen by the blob's first four bytes (bincode writes the array first, byte by byte),
/// every older one still decoded.
#[derive(Serialize, Deserialize)]
struct Fields {
    magic: [u8; 4],
    url: String,
    headers: Vec<Header>,
    description: Option<String>,
    priority: f32,
    expected_sha256: Option<[u8; 32]>,
    destination: Option<String>,
    overwrite: bool,
    offset: u64,
    bytes_expected: Option<u64>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// The kept partial file, by name, in the resume directory.
    file: Option<String>,
}

/// The second layout: the first's fields (magic `DLR2`), then the app's hint.
#[derive(Serialize, Deserialize)]
struct FieldsV2 {
    fields: Fields,
    expected_size: Option<u64>,
}

/// A decoded blob.
pub(super) struct ResumeData {
    fields: Fields,
    /// The total a server stated, if known to be one.
    total: Option<u64>,
    /// The app's `expected_size`.
    expected_size: Option<u64>,
}

impl ResumeData {
    pub fn decode(blob: &[u8]) -> Result<ResumeData, ErrorInfo> {
        let bad =
            || ErrorInfo::new(ErrorCode::InvalidRequest, "the resume data is not valid (not produced by dlsessiond?)");
        match blob.get(..4) {
            Some(m) if m == MAGIC_V1 => {
                let fields: Fields = dlsession_proto::codec::decode(blob).map_err(|_| bad())?;
                // As that layout meant it: taken for a stated total.
                let (total, expected_size) = (fields.bytes_expected, fields.bytes_expected);
                Ok(ResumeData { fields, total, expected_size })
            }
            Some(m) if m == MAGIC_V2 => {
                let v2: FieldsV2 = dlsession_proto::codec::decode(blob).map_err(|_| bad())?;
                let total = v2.fields.bytes_expected;
                Ok(ResumeData { fields: v2.fields, total, expected_size: v2.expected_size })
            }
            _ => Err(bad()),
        }
    }

    /// The task it recreates.
    pub fn spec(&self) -> TaskSpec {
        let f = &self.fields;
        TaskSpec {
            url: f.url.clone(),
            headers: f.headers.clone(),
            description: f.description.clone(),
            priority: f.priority,
            earliest_begin: None,
            expected_sha256: f.expected_sha256,
            destination: f.destination.clone(),
            overwrite: f.overwrite,
            expected_size: self.expected_size,
        }
    }

    /// The kept file's name, if it is a plain name (never a path: the blob comes from a client).
    pub fn kept_file(&self) -> Option<&str> {
        self.fields.file.as_deref().filter(|f| !f.is_empty() && !f.contains('/') && !f.starts_with('.'))
    }

    /// A new task that adopted the kept file continues where the old one stopped.
    pub fn continue_in(&self, rec: &mut TaskRecord) {
        let f = &self.fields;
        rec.committed_offset = f.offset;
        rec.etag = f.etag.clone();
        rec.last_modified = f.last_modified.clone();
        rec.bytes_expected = self.total.or(self.expected_size);
        // A total the old task's server stated must hold (equal to `expected_size`, it must
        // not count as only a hint, or a range ending early would end the file); the app's
        // hint alone is no such total (taken for one, a server stating another length made
        // the kept bytes be thrown away).
        rec.total_known = Some(self.total.is_some());
    }
}

/// What the blob of `rec` holds, naming the kept `file`.
fn blob_of(rec: &TaskRecord, file: Option<String>) -> FieldsV2 {
    // Only a total a server stated (by the rule `start` uses), never the app's hint.
    let stated = rec.bytes_expected.filter(|&n| rec.total_known.unwrap_or(Some(n) != rec.expected_size));
    FieldsV2 {
        fields: Fields {
            magic: MAGIC_V2,
            url: rec.url.clone(),
            headers: rec.headers.clone(),
            description: rec.description.clone(),
            priority: rec.priority,
            expected_sha256: rec.expected_sha256,
            destination: rec.destination.clone(),
            overwrite: rec.overwrite,
            offset: if file.is_some() { rec.committed_offset } else { 0 },
            bytes_expected: stated,
            etag: rec.etag.clone(),
            last_modified: rec.last_modified.clone(),
            file,
        },
        expected_size: rec.expected_size,
    }
}

impl Core {
    /// The resume-data blob of a task being cancelled. Its partial file, if it can be
    /// continued, is to be moved aside once the cancel commits (`After::Keep` in `after`,
    /// before the completion's own actions: the disk thread does them in order); the reply
    /// carrying the blob must wait for that (`After::ReplyAfterDisk`).
    pub(super) fn keep_for_resume(&mut self, task: TaskId, after: &mut Vec<After>) -> Vec<u8> {
        let Some(t) = self.tasks.get(&task) else { return Vec::new() };
        let rec = &t.rec;
        let resumable = rec.committed_offset > 0
            && crate::engine::http::can_resume(rec.etag.as_deref(), rec.last_modified.as_deref());
        let file = resumable.then(|| format!("{:016x}.part", super::secret()));
        let data = blob_of(rec, file);
        if let Some(name) = &data.fields.file {
            // Moved once the cancel is durable: moved before, a crash left the task queued
            // in the database with its partial file gone, downloading from 0 again.
            after.push(After::Keep { from: self.part_path(rec), to: self.resume_dir().join(name) });
        }
        // Every field is bounded (the app's limits, validators of at most 1 KiB), so this
        // cannot fail; if it ever did, an empty blob is refused as not ours when used.
        dlsession_proto::codec::encode(&data).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode resume data");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(magic: [u8; 4]) -> Fields {
        Fields {
            magic,
            url: "http://h/f".into(),
            headers: vec![Header { name: "X-A".into(), value: "b".into() }],
            description: Some("d".into()),
            priority: 0.5,
            expected_sha256: Some([7; 32]),
            destination: Some("/tmp/f".into()),
            overwrite: true,
            offset: 300,
            bytes_expected: Some(70_000),
            etag: Some("\"e\"".into()),
            last_modified: None,
            file: Some("00000000000000ff.part".into()),
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn only_blobs_of_ours_with_plain_file_names_are_taken() {
        assert!(ResumeData::decode(b"not a blob").is_err());
        assert!(ResumeData::decode(b"DLR").is_err());
        let mut data = fields(MAGIC_V1);
        data.file = Some("../../etc/passwd".into());
        let back = ResumeData::decode(&dlsession_proto::codec::encode(&data).unwrap()).unwrap();
        assert_eq!(back.kept_file(), None, "a path is never followed");
        assert_eq!(back.spec().url, "http://h/f");
        data.magic = *b"XXXX";
        assert!(ResumeData::decode(&dlsession_proto::codec::encode(&data).unwrap()).is_err());
        // A layout under another's magic is refused, not misread.
        data.magic = MAGIC_V2;
        assert!(ResumeData::decode(&dlsession_proto::codec::encode(&data).unwrap()).is_err());
    }

    /// A blob an app kept from an earlier release (its bytes written out here once) must
    /// still make its task: a change to a layout fails this test.
    #[test]
    fn a_blob_handed_out_before_still_decodes() {
        let blob = dlsession_proto::codec::encode(&fields(MAGIC_V1)).unwrap();
        assert_eq!(hex(&blob), GOLDEN_V1, "the first resume-data layout changed: blobs handed out would be refused");
        let back = ResumeData::decode(&blob).unwrap();
        assert_eq!(back.spec().expected_size, Some(70_000));
        assert_eq!(back.kept_file(), Some("00000000000000ff.part"));
        assert_eq!((back.fields.offset, back.fields.etag.as_deref()), (300, Some("\"e\"")));

        let v2 = FieldsV2 { fields: Fields { bytes_expected: None, ..fields(MAGIC_V2) }, expected_size: Some(9) };
        let blob = dlsession_proto::codec::encode(&v2).unwrap();
        assert_eq!(hex(&blob), GOLDEN_V2, "the second resume-data layout changed");
        assert_eq!(&blob[..4], b"DLR2", "the magic leads, so a layout is told apart by it");
        let back = ResumeData::decode(&blob).unwrap();
        assert_eq!((back.total, back.spec().expected_size), (None, Some(9)));
    }

    /// The app's hint is no stated total: a task resumed from a blob of a download whose
    /// server stated none must take the length its server states then.
    #[test]
    fn a_hint_is_kept_apart_from_a_stated_total() {
        let spec = TaskSpec { expected_size: Some(10_000_000), ..TaskSpec::get("http://h/f") };
        let mut rec = TaskRecord::new(1, 1, spec.clone(), 0, 0o644);
        rec.committed_offset = 5_000_000;
        rec.bytes_expected = Some(10_000_000); // the hint only: no Content-Length came
        rec.total_known = Some(false);
        rec.etag = Some("\"e\"".into());
        let file = Some("00000000000000aa.part".to_owned());
        let blob = dlsession_proto::codec::encode(&blob_of(&rec, file.clone())).unwrap();
        let back = ResumeData::decode(&blob).unwrap();
        let mut again = TaskRecord::new(2, 1, back.spec(), 0, 0o644);
        back.continue_in(&mut again);
        assert_eq!(again.expected_size, Some(10_000_000), "the hint stays a hint");
        assert_eq!(again.total_known, Some(false), "and is not taken for a stated total");
        assert_eq!(again.committed_offset, 5_000_000);
        // A length its server stated travels as one.
        rec.bytes_expected = Some(12_000_000);
        rec.total_known = Some(true);
        let blob = dlsession_proto::codec::encode(&blob_of(&rec, file)).unwrap();
        let mut stated = TaskRecord::new(3, 1, spec, 0, 0o644);
        ResumeData::decode(&blob).unwrap().continue_in(&mut stated);
        assert_eq!((stated.bytes_expected, stated.total_known), (Some(12_000_000), Some(true)));
    }

    const GOLDEN_V1: &str = concat!(
        "444c52440a687474703a2f2f682f660103582d4101620101640000003f0107070707070707070707070707",
        "0707070707070707070707070707070707070701062f746d702f6601fb2c0101fc701101000103226522",
        "000115303030303030303030303030303066662e70617274",
    );

    const GOLDEN_V2: &str = concat!(
        "444c52320a687474703a2f2f682f660103582d4101620101640000003f0107070707070707070707070707",
        "0707070707070707070707070707070707070701062f746d702f6601fb2c01000103226522000115303030",
        "303030303030303030303066662e706172740109",
    );
}
