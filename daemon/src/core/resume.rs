//! Resume data: the opaque blob `cancel_producing_resume_data` hands out, and the
//! partial file it names, kept aside in the resume directory until a new task adopts it
//! or its retention runs out (docs/behaviour.md, "Resume data").

use serde::{Deserialize, Serialize};

use super::{After, Core};
use crate::model::TaskRecord;
use dlsession_proto::{ErrorCode, ErrorInfo, Header, TaskId, TaskSpec};

const RESUME_MAGIC: [u8; 4] = *b"DLRD";

/// What the blob holds. Its encoding is a contract with every blob handed out before
/// (`a_blob_handed_out_before_still_decodes` pins it): the layout never changes under this
/// magic. A new field needs a new layout under a new magic, chosen by the blob's first four
/// bytes (bincode writes the array first, byte by byte), with this one still decoded.
#[derive(Serialize, Deserialize)]
pub(super) struct ResumeData {
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

impl ResumeData {
    pub fn decode(blob: &[u8]) -> Result<ResumeData, ErrorInfo> {
        let bad =
            || ErrorInfo::new(ErrorCode::InvalidRequest, "the resume data is not valid (not produced by dlsessiond?)");
        let data: ResumeData = dlsession_proto::codec::decode(blob).map_err(|_| bad())?;
        if data.magic != RESUME_MAGIC {
            return Err(bad());
        }
        Ok(data)
    }

    /// The task it recreates.
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            url: self.url.clone(),
            headers: self.headers.clone(),
            description: self.description.clone(),
            priority: self.priority,
            earliest_begin: None,
            expected_sha256: self.expected_sha256,
            destination: self.destination.clone(),
            overwrite: self.overwrite,
            expected_size: self.bytes_expected,
        }
    }

    /// The kept file's name, if it is a plain name (never a path: the blob comes from a client).
    pub fn kept_file(&self) -> Option<&str> {
        self.file.as_deref().filter(|f| !f.is_empty() && !f.contains('/') && !f.starts_with('.'))
    }

    /// A new task that adopted the kept file continues where the old one stopped.
    pub fn continue_in(&self, rec: &mut TaskRecord) {
        rec.committed_offset = self.offset;
        rec.etag = self.etag.clone();
        rec.last_modified = self.last_modified.clone();
        rec.bytes_expected = self.bytes_expected;
        // The total the old task's server gave (made its `expected_size` too: equal to it,
        // it must not count as only a hint, or a range ending early would end the file).
        rec.total_known = Some(self.bytes_expected.is_some());
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
        let data = ResumeData {
            magic: RESUME_MAGIC,
            url: rec.url.clone(),
            headers: rec.headers.clone(),
            description: rec.description.clone(),
            priority: rec.priority,
            expected_sha256: rec.expected_sha256,
            destination: rec.destination.clone(),
            overwrite: rec.overwrite,
            offset: if file.is_some() { rec.committed_offset } else { 0 },
            bytes_expected: rec.bytes_expected,
            etag: rec.etag.clone(),
            last_modified: rec.last_modified.clone(),
            file,
        };
        if let Some(name) = &data.file {
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

    #[test]
    fn only_blobs_of_ours_with_plain_file_names_are_taken() {
        assert!(ResumeData::decode(b"not a blob").is_err());
        let mut data = ResumeData {
            magic: RESUME_MAGIC,
            url: "http://h/f".into(),
            headers: Vec::new(),
            description: None,
            priority: 0.5,
            expected_sha256: None,
            destination: None,
            overwrite: false,
            offset: 10,
            bytes_expected: Some(20),
            etag: Some("\"e\"".into()),
            last_modified: None,
            file: Some("../../etc/passwd".into()),
        };
        let blob = dlsession_proto::codec::encode(&data).unwrap();
        let back = ResumeData::decode(&blob).unwrap();
        assert_eq!(back.kept_file(), None, "a path is never followed");
        assert_eq!(back.spec().url, "http://h/f");
        data.magic = *b"XXXX";
        assert!(ResumeData::decode(&dlsession_proto::codec::encode(&data).unwrap()).is_err());
    }

    /// A blob an app kept from an earlier release (its bytes written out here once) must
    /// still make its task: a change to the layout fails this test.
    #[test]
    fn a_blob_handed_out_before_still_decodes() {
        let data = ResumeData {
            magic: RESUME_MAGIC,
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
        };
        let blob = dlsession_proto::codec::encode(&data).unwrap();
        let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN, "the resume-data layout changed: blobs handed out before would be refused");
        assert_eq!(&blob[..4], b"DLRD", "the magic leads, so a later layout can be told apart by it");
        let back = ResumeData::decode(&blob).unwrap();
        assert_eq!(back.spec().expected_size, Some(70_000));
        assert_eq!(back.kept_file(), Some("00000000000000ff.part"));
        assert_eq!((back.offset, back.etag.as_deref()), (300, Some("\"e\"")));
    }

    const GOLDEN: &str = concat!(
        "444c52440a687474703a2f2f682f660103582d4101620101640000003f0107070707070707070707070707",
        "0707070707070707070707070707070707070701062f746d702f6601fb2c0101fc701101000103226522",
        "000115303030303030303030303030303066662e70617274",
    );
}
