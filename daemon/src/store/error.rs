//! What can go wrong with the database, and which of it is worth waiting out.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "the database {path} has schema version {found}, newer than this dlsessiond understands ({known}); \
         refusing to start (upgrade dlsessiond, or move the file away to start empty)"
    )]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("{path} is not a dlsessiond database (application_id {found:#x}); refusing to start")]
    Foreign { path: PathBuf, found: i64 },
    #[error(
        "the database {path} is corrupt ({detail}); refusing to start. Move it away to start empty, \
         or restore a backup"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot check the database {path} ({detail}); refusing to start rather than write to it unchecked")]
    Unchecked { path: PathBuf, detail: String },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
}

impl StoreError {
    /// The file system refuses writes for now (full, quota, I/O error): worth waiting out,
    /// unlike a corrupt, foreign, newer or read-only database.
    pub fn is_weather(&self) -> bool {
        let sqlite = |e: &rusqlite::Error| match e {
            rusqlite::Error::SqliteFailure(f, _) => {
                matches!(f.code, rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure)
            }
            rusqlite::Error::ToSqlConversionFailure(inner) => {
                inner.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT, rustix::io::Errno::IO]
                        .iter()
                        .any(|e| io.raw_os_error() == Some(e.raw_os_error()))
                })
            }
            _ => false,
        };
        match self {
            StoreError::Open { source, .. } | StoreError::Sql(source) => sqlite(source),
            _ => false,
        }
    }
}
