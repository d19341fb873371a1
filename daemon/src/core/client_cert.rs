//! Sessions' client certificates (docs/behaviour.md, "HTTP"): read and checked off the
//! core's thread when set, stored as file names, read again at start; their downloads
//! present them to servers that ask (mutual TLS).

use std::sync::Arc;

use tracing::{info, warn};

use super::requests::{Answer, DiskCheck, Handled};
use super::sessions::ClientCert;
use super::{After, Core};
use crate::conn::ConnId;
use crate::core::disk::Prepared;
use crate::engine::http::{CertState, ClientCertError, ClientIdentity};
use crate::model::SessionKey;
use crate::store::Op;
use dlsession_proto::{ClientCertificate, ErrorCode, ErrorInfo, Request, Response, TaskState};

/// How long the start waits for stored client certificates to be read.
const CERT_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Threads reading them at start.
const CERT_READERS: usize = 4;

impl Core {
    /// At start: each stored certificate is read again, off this thread (`CERT_READERS`
    /// threads share the list), for at most `CERT_READ_LIMIT` in all: a hung file system
    /// must not stop the daemon from starting. One that cannot be read is kept with the
    /// reason, which its session's downloads then fail with; one not read in time is
    /// `Reading` (its downloads are retried) until it comes to `on_late_client_cert`;
    /// setting the files again reads them again.
    pub(super) fn restore_client_certs(&mut self, stored: Vec<(SessionKey, ClientCertificate)>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut pending = std::collections::HashMap::new();
        let queue: std::collections::VecDeque<(SessionKey, ClientCertificate)> = stored.into_iter().collect();
        for (key, files) in &queue {
            pending.insert(*key, ClientCert { files: files.clone(), identity: CertState::Reading });
        }
        // A few readers share the list: one stuck on a hung file system holds up only the
        // certificates behind it on its thread.
        let readers = queue.len().min(CERT_READERS);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        let mut started = 0;
        for _ in 0..readers {
            let (tx, queue) = (tx.clone(), queue.clone());
            let spawned = std::thread::Builder::new().name("dl-cert-read".into()).spawn(move || {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                    let Some((key, files)) = next else { return };
                    let identity = ClientIdentity::load(&files.cert_file, &files.key_file).map(Arc::new);
                    if tx.send((key, files, identity.map_err(|e| e.to_string()))).is_err() {
                        return;
                    }
                }
            });
            started += usize::from(spawned.is_ok());
        }
        if started == 0 && readers > 0 {
            for cert in pending.values_mut() {
                cert.identity = CertState::Unusable("cannot start a thread to read it".into());
            }
        }
        drop(tx);
        let deadline = std::time::Instant::now() + CERT_READ_LIMIT;
        let mut left = pending.len();
        while left > 0 {
            let Ok((key, _, identity)) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            else {
                break;
            };
            left -= 1;
            if let Some(c) = pending.get_mut(&key) {
                c.identity = identity.into();
            }
        }
        // What is still being read reaches the core when it is (see `on_late_client_cert`).
        if left > 0 {
            let core = self.tx.clone();
            let _ = std::thread::Builder::new().name("dl-cert-late".into()).spawn(move || {
                for (session, files, identity) in rx {
                    let _ = core.send(super::CoreMsg::LateClientCert { session, files, identity });
                }
            });
        }
        for (key, cert) in pending {
            let session = self.sessions.identifier(key);
            match &cert.identity {
                CertState::Ready(_) => {}
                CertState::Reading => {
                    warn!(%session, limit_s = CERT_READ_LIMIT.as_secs(), "the session's client certificate is still being read; its downloads wait for it")
                }
                CertState::Unusable(e) => {
                    warn!(%session, error = %e, "the session's client certificate cannot be read")
                }
            }
            if let Some(s) = self.sessions.get_mut(&key) {
                s.client_cert = Some(cert);
            }
        }
    }

    /// A stored certificate read at start after `CERT_READ_LIMIT`: the session takes it if it
    /// still names the same files and has nothing better (setting files meanwhile wins).
    pub(super) fn on_late_client_cert(
        &mut self,
        key: SessionKey,
        files: ClientCertificate,
        identity: Result<Arc<ClientIdentity>, String>,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let Some(cert) = s.client_cert.as_mut() else { return };
        if cert.files != files || !matches!(cert.identity, CertState::Reading) {
            return;
        }
        match &identity {
            Ok(_) => {
                info!(session = %s.rec.identifier, "the session's client certificate was read after all; its downloads present it from now on")
            }
            Err(e) => warn!(session = %s.rec.identifier, error = %e, "the session's client certificate cannot be read"),
        }
        let ready = identity.is_ok();
        cert.identity = identity.into();
        if !ready {
            return;
        }
        // Its downloads that back off, waiting for it, go now.
        let waiting: Vec<_> = self
            .tasks
            .values()
            .filter(|t| {
                t.rec.session == key
                    && t.state == TaskState::Waiting
                    && t.rec.retry_at.is_some()
                    && t.rec.last_error.as_ref().is_some_and(|e| e.code == ErrorCode::Tls)
            })
            .map(|t| t.rec.id)
            .collect();
        for id in waiting {
            self.retry_now(id, true, Vec::new());
        }
        self.schedule();
    }

    pub(super) fn set_session_client_cert(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        cert: Option<ClientCertificate>,
        check: DiskCheck,
    ) -> Handled {
        let key = self.sessions.key_of(&identifier)?;
        let current = self.sessions.get(&key).and_then(|s| s.client_cert.as_ref()).map(|c| c.files.clone());
        if let Some(c) = &cert {
            for path in [&c.cert_file, &c.key_file] {
                if !std::path::Path::new(path).is_absolute() || path.contains('\0') {
                    return Err(ErrorInfo::new(
                        ErrorCode::InvalidRequest,
                        format!("a client certificate file must be an absolute path, got {path:?}"),
                    ));
                }
            }
        }
        let identity = match (&cert, check) {
            (None, _) if current.is_none() => return self.ok_unchanged(conn, id),
            (None, _) => None,
            (Some(_), DiskCheck::Done(Prepared { client_cert: Some(identity), .. })) => Some(identity),
            // Read (again, also when the files are the same: a renewed certificate at the
            // same path) off the core's thread; the request comes back with it.
            (Some(c), _) => {
                let (cert_file, key_file) = (c.cert_file.clone(), c.key_file.clone());
                let request = Request::SetSessionClientCert { identifier, cert };
                let paths = vec![cert_file.clone().into(), key_file.clone().into()];
                self.check_on_disk(conn, id, request, paths, move || {
                    let identity = ClientIdentity::load(&cert_file, &key_file).map_err(|e| match e {
                        ClientCertError::Read(m) => ErrorInfo::new(ErrorCode::FileError, format!("cannot read {m}")),
                        ClientCertError::Invalid(m) => ErrorInfo::new(ErrorCode::InvalidRequest, m),
                    })?;
                    Ok(Prepared { resume: None, uploads: Vec::new(), client_cert: Some(Arc::new(identity)) })
                });
                return Ok(Answer::Later);
            }
        };
        let changed = current != cert;
        // The same files read again: nothing to store, so it is answered even while the
        // database refuses writes.
        if changed && let Some(e) = &self.life.storage {
            return Err(e.clone());
        }
        if let Some(s) = self.sessions.get_mut(&key) {
            s.client_cert = cert
                .clone()
                .zip(identity)
                .map(|(files, identity)| ClientCert { files, identity: CertState::Ready(identity) });
        }
        if !changed {
            return self.ok_unchanged(conn, id);
        }
        info!(session = %identifier, set = cert.is_some(), "session client certificate changed");
        self.commit(
            vec![Op::SaveClientCert { session: key, cert }],
            vec![After::Reply { conn, id, response: Response::Ok }],
        );
        Ok(Answer::Later)
    }

    pub(super) fn session_client_cert(&self, identifier: &str) -> Result<Option<ClientCertificate>, ErrorInfo> {
        let key = self.sessions.key_of(identifier)?;
        Ok(self.sessions.get(&key).and_then(|s| s.client_cert.as_ref()).map(|c| c.files.clone()))
    }

    /// What a job of session `key` presents to servers that ask for a certificate.
    pub(super) fn client_identity(&self, key: SessionKey) -> Option<CertState> {
        self.sessions.get(&key).and_then(|s| s.client_cert.as_ref()).map(|c| c.identity.clone())
    }
}
